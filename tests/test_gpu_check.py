"""`make gpu-check`'s CPU path: the same functions a GPU run uses, on the tiny preset (no GPU needed)."""

from __future__ import annotations

import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.encoder import Encoder
from model.presets import get_preset
from workers import gpu_check


def test_step_flops_match_torch_flop_counter():
    """The MFU numerator: our analytic ViT FLOPs vs torch's own count of one encoder forward."""
    cfg = get_preset("vision", "tiny")
    enc = Encoder(cfg.model).eval()
    x = torch.randn(2, 3, cfg.model.frontend.image_size, cfg.model.frontend.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc(x)
    counted = counter.get_total_flops()  # (2 images, one forward)
    ours = gpu_check.step_flops(cfg, 2) / 4  # step = student fwd+bwd (3x) + teacher fwd (1x)
    assert abs(ours - counted) / counted < 0.05, (ours, counted)


def test_gpu_check_cpu_path(tmp_path):
    out = tmp_path / "gpu-check.json"
    rc = gpu_check.main(["--device", "cpu", "--preset", "tiny", "--batch", "4", "--steps", "3", "--skip-ray",
                         "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["matmul_peak_tflops"] > 0
    v1 = result["v1"]
    assert v1["status"] == "ok" and v1["steps_per_s"] > 0 and 0 < v1["mfu"] < 1
    ddp = result["ddp"]
    assert ddp["backend"] == "gloo" and ddp["checkpoint"].startswith("step_")
    assert ddp["checkpoint_loads_on_cpu"] and ddp["cpu_vs_device_max_abs"] == 0.0
    assert not torch.distributed.is_initialized()
