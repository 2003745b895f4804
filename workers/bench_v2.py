"""data2vec 2.0 rows for `make bench`: student step cost, time to v1's accuracy, EMA share of a step.

    python -m workers.bench --only v2_student_step_vs_v1 v2_time_to_v1_accuracy ema_share

Each function returns bench.Row objects (same table / JSON line as the other keys); every ratio is taken
between two figures measured in the same run on the same machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .bench import Row, median_times_interleaved


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ v2 vs v1 student step
def _v2_vision_base_batch(batch: int, seed: int = 0):
    """v2 vision base config, pixels (B, 3, 224, 224) and the preset's masks (B, M, 196) as the loader makes them."""
    from model.masking_v2 import make_masks
    from model.presets import get_preset

    cfg = get_preset("vision", "base", "v2")
    g = torch.Generator().manual_seed(seed)
    f = cfg.model.frontend
    mask = torch.stack([make_masks(cfg.masking, cfg.v2.clone_batch, f.grid**2, generator=g) for _ in range(batch)])
    pixels = torch.randn(batch, 3, f.image_size, f.image_size, generator=g)
    return cfg, pixels, mask


def bench_v2_student_step(warmup: int, runs: int, batch: int = 8) -> list[Row]:
    """ViT-B/16 224^2: one v2 student step (M masked copies per sample, encoder on the visible tokens + conv
    decoder, fwd+bwd+AdamW step) per sample-mask vs one v1 student step (mask embedding, all 197 tokens,
    regression head, fwd+bwd+AdamW step) per sample. Teachers are left out of both (a student step)."""
    from model.data2vec import Data2Vec
    from model.data2vec2 import Data2Vec2, clone_masks

    from .bench import _vision_base_batch

    cfg1, px1, mask1 = _vision_base_batch(batch)
    cfg2, px2, mask2 = _v2_vision_base_batch(batch)
    M = cfg2.v2.clone_batch
    flat = clone_masks(mask2, M)  # (B*M, 196)
    v1 = Data2Vec(cfg1.model).train()
    v2 = Data2Vec2(cfg2.model, cfg2.v2).train()
    opt1 = torch.optim.AdamW(v1.parameters(), lr=1e-4)
    opt2 = torch.optim.AdamW([p for p in v2.parameters() if p.requires_grad], lr=1e-4)

    def step_v1():
        pred, _ = v1(px1, mask1)  # (N, D) at the masked patches
        pred.float().square().mean().backward()
        opt1.step()
        opt1.zero_grad(set_to_none=True)

    def step_v2():
        out = v2(px2, flat)  # pred (B*M, 196, D), cls (B*M, D)
        (out.pred[flat].float().square().mean() + 0.01 * out.cls.float().square().mean()).backward()
        opt2.step()
        opt2.zero_grad(set_to_none=True)

    t1, t2 = median_times_interleaved([step_v1, step_v2], warmup, runs)
    per1, per2 = t1 / batch, t2 / (batch * M)
    kept = int((~flat[0]).sum())
    flops = _flops(step_v2) / (batch * M) / (_flops(step_v1) / batch)  # what the time ratio can't beat
    return [Row("v2_student_step_vs_v1", per2, per1, per2 / per1, "s/sample", "<= 0.25",
                f"ViT-B/16 224^2 batch {batch}, fwd+bwd+AdamW: v2 {t2:.2f} s/step = {batch}x{M} sample-masks "
                f"({kept}+1 of 197 tokens encoded, 6-layer conv decoder) vs v1 {t1:.2f} s/step "
                f"({int(mask1[0].sum())}/196 masked, all 197 encoded); ours = v2 per sample-mask, reference = v1 "
                f"per sample; FLOP ratio (matmul, conv, attention; torch FlopCounterMode) {flops:.3f}")]


def _flops(step) -> int:
    """FLOPs of one call of `step` (fwd+bwd) as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


# ------------------------------------------------------------------------------------------ EMA share
def bench_ema_share(warmup: int, runs: int, batch: int = 8) -> list[Row]:
    """ViT-B/16 v1 vision base: the EMA teacher update alone vs a whole training step that includes it
    (student fwd+bwd, teacher fwd, AdamW step, EMA update), timed interleaved."""
    from model.data2vec import Batch, Data2Vec, data2vec_loss
    from model.teacher import EMATeacher, ema_decay

    from .bench import _vision_base_batch

    cfg, pixels, mask = _vision_base_batch(batch)
    student = Data2Vec(cfg.model).train()
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    b = Batch(pixels, mask)
    tau = ema_decay(0, cfg.teacher.tau0, cfg.teacher.tau_end, cfg.teacher.tau_steps)

    def ema():
        teacher.update(student.encoder, tau)

    def step():
        loss, _, _ = data2vec_loss(student, teacher.model, cfg, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema()

    t_ema, t_step = median_times_interleaved([ema, step], warmup, runs)
    n = sum(p.numel() for p in student.encoder.parameters())
    return [Row("ema_share", t_ema, t_step, t_ema / t_step, "s", "<= 0.03",
                f"ViT-B/16 v1 batch {batch}: EMA update of {n / 1e6:.1f}M fp32 params vs the whole step incl. it")]


# ------------------------------------------------------------------------------ v2 time to v1 accuracy
def _demo_shards(root: Path, size: str) -> tuple[Path, list[str], int]:
    """`d2v demo-data vision` (size) under root, its pretrain images as webdataset shards (what `d2v shard`
    writes for them: the PNG bytes and a json with source and label) -> (labelled dir, shards, samples)."""
    import json

    import webdataset as wds

    from pipelines.demo import build_demo

    demo = root / "demo"
    build_demo("vision", demo, size=size)
    files = sorted((demo / "pretrain").rglob("*.png"))
    shards, per = [], 256
    for i in range(0, len(files), per):
        path = root / f"vision-{i // per:06d}.tar"
        with wds.TarWriter(str(path)) as tw:
            for j, f in enumerate(files[i : i + per], start=i):
                src = str(f.relative_to(demo / "pretrain"))
                tw.write({"__key__": f"{j:08d}", "png": f.read_bytes(),
                          "json": json.dumps({"source": src, "label": f.parent.name}).encode()})
        shards.append(str(path))
    return demo / "labelled", shards, len(files)


class _Reached(Exception):
    """Raised from the report hook to end a training run once the target accuracy is reached."""


def _train_and_probe(cfg, shards: list[str], n: int, probe, stop_at: float | None) -> list[tuple[int, float, float]]:
    """Train in this process (workers.train.train, no Ray) and probe the encoder of every checkpoint.

    -> [(step, training wall time up to that checkpoint, probe accuracy)]. Probe time is excluded from the
    wall time; checkpoint writes are included. Stops at the first checkpoint whose accuracy >= stop_at.
    """
    from model.checkpoint import load_encoder

    from .loader import build_loader
    from .train import Hooks, train

    points: list[tuple[int, float, float]] = []
    paused = 0.0  # seconds spent in the hook (loading + probing), not training
    t0 = time.perf_counter()

    def report(metrics: dict, ckpt: str | None, _name: str | None) -> None:
        nonlocal paused
        entered = time.perf_counter()
        wall = entered - t0 - paused
        _, enc = load_encoder(ckpt)
        acc = probe(enc, cfg)
        points.append((int(metrics["step"]), wall, acc))
        _log(f"{cfg.preset} step {metrics['step']}: {wall:.1f} s training, probe {acc:.3f}")
        paused += time.perf_counter() - entered
        if stop_at is not None and acc >= stop_at:
            raise _Reached

    hooks = Hooks(report=report, progress=lambda s: None)
    try:
        train(cfg, lambda pos: build_loader(cfg, shards, start_step=pos, num_samples=n), hooks)
    except _Reached:
        pass
    return points


def bench_v2_time_to_v1_accuracy(warmup: int, runs: int, size: str = "full", every: int = 25,
                                  overrides: tuple[str, ...] = ()) -> list[Row]:
    """Demo vision corpus (`d2v demo-data vision`, `size`), tiny presets, plain process: v1 trains its default
    budget (train.max_steps) and is probed at the end -> accuracy A1 in time T1; v2 trains with a checkpoint
    every `every` updates, each probed, until a probe reaches A1 -> T2. Row ratio = T2 / T1.

    The probe is the evaluation package's (pooled frozen features -> StandardScaler + LogisticRegression on
    the labelled train split -> test accuracy). Runtime: the corpus build (~5 s), v1's whole budget (~50 s
    here), v2 up to A1 (at most its own budget, ~85 s) and the probes (~2 s each, at most max_steps / every):
    about 1.5 min on this 2-core box when v2 gets there early, 4-5 min at worst. `overrides` (KEY=VALUE) apply
    to both presets (smoke runs).

    Caveat in the row's note: the tiny presets differ in patch size (v1 8x8 px -> 16 patches, v2 4x4 px -> 64),
    so the random-init probes differ too; both are printed, since a v2 random encoder may already beat v1's
    trained accuracy, which makes the ratio mostly v2's start-up time."""
    from model.presets import get_preset

    from .evaluate.data import load_split
    from .evaluate.features import features
    from .evaluate.probe import fit_probe, labels
    from .evaluate.baselines import random_encoder

    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="d2v-bench-tta-") as tmp:
        t_build = time.perf_counter()
        labelled, shards, n = _demo_shards(Path(tmp), size)
        split = load_split(labelled, "vision")
        t_build = time.perf_counter() - t_build
        caches: dict[str, dict] = {"train": {}, "test": {}}  # decoded inputs, shared by every probe

        def probe(enc, cfg) -> float:
            x_tr, x_te = (features(enc, cfg, getattr(split, s), None, 256, cpu, f"probe {s}", cache=caches[s])
                          for s in ("train", "test"))
            return fit_probe(x_tr, labels(split.train), x_te, labels(split.test), what=cfg.preset)

        cfg1, cfg2 = (_set(get_preset("vision", "tiny", v), *overrides) for v in ("v1", "v2"))
        rand1, rand2 = probe(random_encoder(cfg1), cfg1), probe(random_encoder(cfg2), cfg2)
        _log(f"time_to_v1_accuracy: {n} pretrain images; random-init probes v1 {rand1:.3f}, v2 {rand2:.3f}")
        one = _set(cfg1, f"train.checkpoint_every={cfg1.train.max_steps}")
        step1, t1, acc1 = _train_and_probe(one, shards, n, probe, None)[-1]
        two = _set(cfg2, f"train.checkpoint_every={every}")
        points = _train_and_probe(two, shards, n, probe, acc1)
    step2, t2, acc2 = points[-1]
    reached = acc2 >= acc1
    note = (f"demo vision ({size}: {n} pretrain images, {len(split.test)} test), tiny presets, plain process, "
            f"{os.cpu_count()} cores: v1 {step1} updates ({'; '.join(overrides) or 'default budget'}) -> probe {acc1:.3f} in {t1:.1f} s; "
            f"v2 {'reached' if reached else 'did NOT reach'} it at update {step2} ({t2:.1f} s, probe {acc2:.3f}, "
            f"checkpoint+probe every {every}); random-init probes v1 {rand1:.3f} / v2 {rand2:.3f}; "
            f"corpus build {t_build:.0f} s")
    t2 = t2 if reached else float("inf")
    return [Row("v2_time_to_v1_accuracy", t2, t1, t2 / t1, "s", "<= 0.2", note)]


def _set(cfg, *overrides: str):
    from model.config import apply_overrides

    return apply_overrides(cfg, list(overrides)) if overrides else cfg
