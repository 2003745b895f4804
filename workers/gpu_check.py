"""`make gpu-check`: one prepared check of d2v on a CUDA GPU, a few minutes, one JSON line at the end.

    python -m workers.gpu_check [--device cuda|cpu] [--steps N] [--batch B] [--out FILE.json]

What it measures, all in the same run (so ratios need no outside reference):
- `bf16_matmul_tflops`: the bf16 8192^3 matmul peak of this GPU (the MFU denominator; fp32 on CPU).
- per training version (v1, and v2 where `model.presets` has it): the real training loop
  (`workers.train.train`, bf16 autocast on GPU) on vision-base synthetic batches: steps/s, samples/s,
  MFU (model matmul FLOPs / step time / the peak above) and peak GPU memory.
- `ddp`: the same loop wrapped in DistributedDataParallel on a 1-rank process group (NCCL on GPU, gloo on
  CPU) for a few steps, with a checkpoint written through the loop's report hook; the checkpoint is then
  loaded on the CPU (safetensors, nothing unpickled) and its encoder must give the same outputs on CPU
  as on the device (max abs difference reported, bf16/TF32-level tolerance).
- `ray_train`: where Ray is installed, the same few steps as a 1-worker Ray Train run with
  `use_gpu=True` (Train sets up NCCL itself); where it is not (a bare GPU image), "skipped" with the reason.

Never needed by `make test`; tests run the CPU path of the same functions (`--device cpu`, tiny preset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from model.config import Config, apply_overrides
from model.data2vec import Batch
from model.masking import block_mask
from model.presets import get_preset


def matmul_peak_tflops(device: torch.device, n: int = 8192, runs: int = 10) -> float:
    """Peak dense matmul TFLOP/s measured now: bf16 on GPU, fp32 (n=1024) on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(runs):
        a @ b
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - t0) / 1e12


def synthetic_batches(cfg: Config, batch: int, seed: int = 0):
    """An endless stream of vision batches (random pixels, BEiT block masks): the step's cost, not the data's."""
    f, m = cfg.model.frontend, cfg.masking
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, f.image_size, f.image_size, generator=g)  # (B, 3, H, W)
    mask = torch.stack([block_mask(f.grid, f.grid, m.num_masked, m.min_block, m.max_block, m.min_aspect,
                                   generator=g) for _ in range(batch)])  # (B, N)
    while True:
        yield Batch(pixels, mask)


def step_flops(cfg: Config, batch: int) -> float:
    """Matmul FLOPs of one v1 step: student fwd+bwd (3x forward) + teacher forward, on `batch` images."""
    from .bench import vit_forward_flops

    f, t = cfg.model.frontend, cfg.model.trunk
    n = f.grid**2
    fwd = vit_forward_flops(t.dim, t.depth, t.ffn_dim, n + 1, f.in_chans * f.patch_size**2, n)
    return 4 * batch * fwd


def run_loop(cfg: Config, device: torch.device, batch: int, steps: int, warmup: int, prepare=None,
             report=None) -> dict[str, Any]:
    """The real training loop for warmup + steps updates; steps/s is timed from the end of the warm-up."""
    from .train import Hooks, train

    cfg = apply_overrides(cfg, [f"train.max_steps={warmup + steps}", f"train.log_every={warmup}",
                                f"train.checkpoint_every={warmup + steps}", f"train.batch_size={batch}",
                                "train.collapse_after=100000000",
                                f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}"])
    marks: list[float] = []

    def progress(msg: str) -> None:
        _sync(device)
        marks.append(time.perf_counter())

    hooks = Hooks(device=device, progress=progress, **({"prepare_model": prepare} if prepare else {}),
                  **({"report": report} if report else {}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = train(cfg, lambda start: synthetic_batches(cfg, batch), hooks)
    if out.get("stopped"):
        raise RuntimeError(f"training stopped: {out['stopped']}")
    dt = marks[-1] - marks[0]  # progress at step `warmup` and at the last step
    res = {"steps_per_s": steps / dt, "samples_per_s": steps * batch / dt, "loss": out.get("loss")}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def check_ddp_and_checkpoint(cfg: Config, device: torch.device, batch: int, steps: int) -> dict[str, Any]:
    """1-rank DDP (NCCL on GPU) through the loop; its checkpoint loads on CPU and matches the device model."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from model.checkpoint import load_encoder

    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory(prefix="d2v-gpu-check-") as tmp:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=0, world_size=1)
        saved: list[str] = []

        def report(metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
            if ckpt_dir:  # the loop deletes its temp dir after report: copy it out, as Ray Train does
                import shutil

                dst = Path(tmp) / str(name)
                shutil.copytree(ckpt_dir, dst)
                saved.append(str(dst))

        try:
            ids = [device.index] if device.type == "cuda" else None
            res = run_loop(cfg, device, batch, steps, warmup=1, report=report,
                           prepare=lambda m: DDP(m, device_ids=ids))
        finally:
            dist.destroy_process_group()
        if not saved:
            raise RuntimeError("the loop reported no checkpoint")
        ckpt_cfg, enc_cpu = load_encoder(Path(saved[-1]), map_location="cpu")
        x = next(synthetic_batches(ckpt_cfg, 2, seed=1)).inputs
        with torch.no_grad():
            ref = enc_cpu.eval()(x).last
            enc_dev = enc_cpu.to(device)
            dev = enc_dev(x.to(device)).last.float().cpu()
        diff = float((ref - dev).abs().max())
    return {"backend": backend, **res, "checkpoint": Path(saved[-1]).name,
            "cpu_vs_device_max_abs": diff, "checkpoint_loads_on_cpu": diff < 5e-2}


def check_ray_train(device: torch.device, steps: int) -> dict[str, Any]:
    """A 1-worker Ray Train run (use_gpu on GPU) of a few steps on generated shards, if Ray is installed."""
    try:
        import ray  # noqa: F401
        import mlflow  # noqa: F401
    except ImportError as err:
        return {"status": f"skipped: {err.name} is not installed in this Python"}
    import numpy as np
    from PIL import Image

    from pipelines.shard import run_shard

    from .pretrain import pretrain

    with tempfile.TemporaryDirectory(prefix="d2v-gpu-check-ray-") as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        rng = np.random.default_rng(0)
        for i in range(64):  # a tiny image folder -> real shards (stats.json, manifest) as pretrain expects
            d = Path(tmp, "src", f"class_{i % 4}")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(d / f"{i:03d}.png")
        t0 = time.perf_counter()
        run_shard("vision", f"{tmp}/src", f"{tmp}/shards", samples_per_shard=32)
        out = pretrain("vision", f"{tmp}/shards", preset="tiny", workers=1,
                       gpus_per_worker=1 if device.type == "cuda" else 0, storage=f"{tmp}/runs",
                       overrides=[f"train.max_steps={steps}", f"train.checkpoint_every={steps}"], register=False)
        return {"status": "ok", "wall_s": time.perf_counter() - t0, "step": out.get("step")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="base", help="vision preset for the throughput rows (tiny for a smoke run)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray Train run")
    p.add_argument("--out", help="also write the JSON result here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch; run with --device cpu for the smoke path", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__}
    peak = matmul_peak_tflops(device)
    result["matmul_peak_tflops"] = peak
    for version in ("v1", "v2"):
        try:
            cfg = get_preset("vision", a.preset, version)
        except Exception as err:  # v2 presets may not exist in this build
            result[version] = {"status": f"skipped: {err}"}
            continue
        _log(f"{version} vision-{a.preset}: {a.steps} steps of batch {a.batch} on {device}")
        try:
            r = run_loop(cfg, device, a.batch, a.steps, warmup=3)
            if version == "v1":
                r["mfu"] = step_flops(cfg, a.batch) * r["steps_per_s"] / (peak * 1e12)
            result[version] = {"status": "ok", **r}
        except Exception as err:
            result[version] = {"status": f"failed: {type(err).__name__}: {err}"}
    _log("1-rank DDP + checkpoint written on the device, loaded on CPU")
    result["ddp"] = check_ddp_and_checkpoint(get_preset("vision", "tiny"), device, 8, 4)
    if not a.skip_ray:
        _log("1-worker Ray Train run")
        try:
            result["ray_train"] = check_ray_train(device, 4)
        except Exception as err:
            result["ray_train"] = {"status": f"failed: {type(err).__name__}: {err}"}
    line = json.dumps(result, default=float)
    if a.out:
        tmp = a.out + ".tmp"
        Path(tmp).write_text(line + "\n")
        os.replace(tmp, a.out)
    print(line)
    return 0 if result["ddp"]["checkpoint_loads_on_cpu"] else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
