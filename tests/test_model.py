"""The model package: purity, shapes, attention against a hand-written reference, and learning."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import apply_overrides
from model.data2vec import Batch, Data2Vec, data2vec_loss
from model.encoder import Encoder
from model.frontends import audio_frames
from model.layers import Attention
from model.masking import block_mask, span_mask_batch, text_span_mask
from model.presets import get_preset
from model.teacher import EMATeacher, ema_decay

ROOT = Path(__file__).resolve().parent.parent


def test_model_package_imports_no_infrastructure():
    """STYLE principle 4: model/ is pure PyTorch. Import every module and inspect sys.modules; torch itself
    loads torch.distributed, so for that one the import statements in the source are checked."""
    mods = sorted(p.stem for p in (ROOT / "model").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys, importlib\n"
        f"for m in {mods!r}: importlib.import_module('model.' + m)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'webdataset', 'pipelines', 'workers')]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"model/ pulled in: {out.stdout}"
    src = "\n".join((ROOT / "model" / f"{m}.py").read_text() for m in mods)
    for banned in ("import ray", "import mlflow", "import webdataset", "torch.distributed", "from pipelines",
                   "from workers"):
        assert banned not in src, banned


def make_batch(cfg, batch_size=4, seed=0) -> Batch:
    """A fixed batch with masks built by model.masking, for each modality."""
    g = torch.Generator().manual_seed(seed)
    m, f = cfg.model.modality, cfg.model.frontend
    if m == "vision":
        # smooth images (a few low-frequency gratings): masked patches are predictable from their context
        yy, xx = torch.meshgrid(torch.linspace(0, 1, f.image_size), torch.linspace(0, 1, f.image_size), indexing="ij")
        freq, phase = torch.rand(batch_size, 3, 2, generator=g) * 4, torch.rand(batch_size, 3, 1, 1, generator=g) * 6
        x = torch.sin(2 * math.pi * (freq[..., :1, None] * xx + freq[..., 1:, None] * yy) + phase)  # (B, 3, H, W)
        mk = cfg.masking
        mask = torch.stack([block_mask(f.grid, f.grid, mk.num_masked, mk.min_block, mk.max_block, mk.min_aspect,
                                       generator=g) for _ in range(batch_size)])
        return Batch(x, mask)
    if m == "audio":
        t = torch.linspace(0, 1, 16000)
        x = torch.stack([torch.sin(2 * math.pi * (200 + 50 * i) * t) + 0.1 * torch.randn(16000, generator=g)
                         for i in range(batch_size)])
        frames = audio_frames(16000, f.conv_layers)
        mk = cfg.masking
        mask = span_mask_batch([frames] * batch_size, frames, mk.mask_prob, mk.span_length, mk.min_spans, generator=g)
        return Batch(x, mask)
    T = 24
    ids = torch.randint(5, f.vocab_size, (batch_size, T), generator=g)
    ids[:, 0], ids[:, -1] = f.bos_id, f.eos_id
    rows = [text_span_mask(ids[b], f.mask_id, cfg.masking.mask_prob, cfg.masking.span_length, 1,
                           generator=g) for b in range(batch_size)]
    return Batch(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), None, ids)


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_student_shapes_and_finite(modality):
    cfg = get_preset(modality, "tiny")
    b = make_batch(cfg)
    student = Data2Vec(cfg.model)
    pred, (feats, pad) = student(b.inputs, b.mask, b.padding_mask)
    assert pred.shape == (int(b.mask.sum()), cfg.model.trunk.dim)
    assert feats.shape[:2] == b.mask.shape and torch.isfinite(pred).all()


@pytest.mark.parametrize("qkv_bias", ["qkv", "qv", "none"])
def test_fused_attention_equals_manual_softmax_attention(qkv_bias):
    torch.manual_seed(0)
    dim, heads, T = 32, 4, 7
    attn = Attention(dim, heads, qkv_bias, 0.0).eval().double()
    for p in attn.parameters():
        p.data.normal_()
    x = torch.randn(2, T, dim, dtype=torch.float64)
    bias = torch.randn(1, heads, T, T, dtype=torch.float64)
    w = attn.qkv.weight
    b = attn.qkv.bias if qkv_bias == "qkv" else torch.zeros(3 * dim, dtype=torch.float64)
    if qkv_bias == "qv":
        b = torch.cat([attn.q_bias, torch.zeros(dim, dtype=torch.float64), attn.v_bias])
    q, k, v = (F.linear(x, w, b).view(2, T, 3, heads, dim // heads).permute(2, 0, 3, 1, 4))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + bias, dim=-1)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(2, T, dim))
    torch.testing.assert_close(attn(x, bias), ref, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_unpadded_tokens():
    cfg = get_preset("text", "tiny")
    enc = Encoder(cfg.model).eval()
    ids = torch.randint(5, 100, (1, 10))
    padded = torch.cat([ids, torch.full((1, 4), cfg.model.frontend.pad_id)], dim=1)
    torch.testing.assert_close(enc(padded).last[:, :10], enc(ids).last, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("modality", ["vision", "audio", "text"])
def test_optimisation_lowers_loss_on_a_fixed_batch(modality):
    cfg = apply_overrides(get_preset(modality, "tiny"), ["model.trunk.drop_path=0.0"] if modality == "vision" else [])
    torch.manual_seed(0)
    b = make_batch(cfg, batch_size=4)
    student = Data2Vec(cfg.model).train()
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    losses = []
    for step in range(40):
        loss, _, _ = data2vec_loss(student, teacher.model, cfg, b)
        loss.backward()
        opt.step()
        opt.zero_grad()
        teacher.update(student.encoder, ema_decay(step + 1, 0.999, 0.9999, 1000))
        losses.append(float(loss.detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # vision starts slowest: layer scale 1e-4 and a zero relative-position table make every masked patch
    # look alike until attention learns where to look; its loss still falls steadily
    assert last < {"vision": 0.95, "audio": 0.7, "text": 0.7}[modality] * first, (first, last)
    assert all(math.isfinite(v) for v in losses)


def test_teacher_reuses_student_features_only_when_front_end_is_shared():
    """Speech (scope 'layers'): targets from the student's unmasked features equal a full teacher pass."""
    from model.data2vec import teacher_targets

    cfg = get_preset("audio", "tiny")
    b = make_batch(cfg)
    student = Data2Vec(cfg.model).eval()
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    _, feats = student(b.inputs, b.mask)
    reused = teacher_targets(teacher.model, cfg, b, feats)
    full = teacher_targets(teacher.model, cfg, b, None)
    torch.testing.assert_close(reused, full, atol=1e-5, rtol=1e-5)
