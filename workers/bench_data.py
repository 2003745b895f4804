"""Loader throughput vs. the rate at which a training step consumes samples (rows for `make bench`).

    python -m workers.bench_data [--quick]

Shards are written to a temp dir with webdataset's TarWriter: vision 512 PNG 64x64 (tiny, 32^2 crops)
and 64 JPEG 320x256 (base, 224^2 crops), audio 128 clips of 2 s, text 512 blocks of 128 ids. `ours` is
the loader's samples/s (decode, augment, mask, collate in `num_workers` worker processes), `reference`
the samples/s of one data2vec step on the same kind of batch (student fwd+bwd, teacher fwd, optimiser,
EMA), measured separately on the same machine; ratio >= 1 means the loader keeps up with the step.
On a CPU box both compete for the same cores during training, so the ratio is an upper bound there.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
import webdataset as wds

from model.config import Config, apply_overrides
from workers.loader import build_loader


# ------------------------------------------------------------------------------------------- shards
def _image_bytes(rng: np.random.Generator, w: int, h: int, fmt: str) -> bytes:
    """A smooth random image with some noise (compresses like a photo, not like white noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.01, 0.1, (3, 2))
    a = np.stack([127 + 100 * np.sin(f[c, 0] * xx + f[c, 1] * yy + c) for c in range(3)], -1)
    a = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_bench_shards(root: str, kind: str, n: int, per_shard: int = 64, seed: int = 0) -> list[str]:
    """n samples of `kind` in shards of per_shard: vision-tiny | vision-base | audio | text."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    paths = []
    for start in range(0, n, per_shard):
        path = os.path.join(root, f"{kind}-{start // per_shard:06d}.tar")
        with wds.TarWriter(path) as tw:
            for i in range(start, min(n, start + per_shard)):
                s: dict[str, Any] = {"__key__": f"{i:08d}", "json": {"source": f"bench/{i}", "label": i % 10}}
                if kind == "vision-tiny":
                    s["png"] = _image_bytes(rng, 64, 64, "PNG")
                elif kind == "vision-base":
                    s["jpg"] = _image_bytes(rng, 320, 256, "JPEG")
                elif kind == "audio":
                    buf = io.BytesIO()
                    sf.write(buf, (0.1 * rng.standard_normal(32_000)).astype(np.float32), 16_000, format="FLAC")
                    s["flac"] = buf.getvalue()
                else:
                    buf = io.BytesIO()
                    np.save(buf, rng.integers(5, 4096, 128).astype(np.int32))
                    s["ids.npy"] = buf.getvalue()
                tw.write(s)
        paths.append(path)
    return paths


def write_image_corpus(root: str, n: int, side: int, seed: int = 0) -> str:
    """n small PNG files in 10 class folders (ImageNet layout) under root/src; returns that folder.

    256 distinct images written round-robin: throughput and memory of the shard job do not depend on
    the pixels, and encoding 100k PNGs just to create the corpus would dominate the benchmark."""
    rng = np.random.default_rng(seed)
    pool = [_image_bytes(rng, side, side, "PNG") for _ in range(256)]
    src = os.path.join(root, "src")
    for c in range(10):
        os.makedirs(os.path.join(src, f"class_{c}"), exist_ok=True)
    for i in range(n):
        with open(os.path.join(src, f"class_{i % 10}", f"{i:07d}.png"), "wb") as f:
            f.write(pool[i % len(pool)])
    return src


def _tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc; Ray's raylet, GCS and workers are descendants of the
    driver that started them)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu_seconds(pid: int) -> dict[str, float]:
    """User+system CPU seconds of `pid`'s process tree by role: "driver" (pid itself), "tasks" (Ray worker
    processes, `ray::…`), "ray" (raylet, GCS, dashboard and other Ray services). Take two snapshots and
    subtract: the processes must outlive the interval (a warm cluster), as a dead one's time is gone."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"driver": 0.0, "tasks": 0.0, "ray": 0.0}
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        role = "driver" if p == pid else "tasks" if cmd.startswith("ray::") else "ray"
        out[role] += cpu
    return out


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over `pid` and all its descendants."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


def peak_tree_rss(cmd: list[str], every: float = 0.05, env: dict | None = None) -> tuple[int, float]:
    """Run cmd; → (peak summed RSS of its process tree in bytes, wall seconds). Raises if cmd fails."""
    import subprocess

    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on it
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(every)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read()[-3000:]}")
    return peak, time.perf_counter() - t0


def time_to_line(cmd: list[str], marker: str, env: dict | None = None, timeout: float = 600,
                 stamps: dict[str, float | None] | None = None) -> tuple[float, str]:
    """Run cmd to completion; → (seconds from start until an output line containing `marker`, full output).
    `stamps`: {other marker: None} filled in place with the seconds until each one's first line."""
    import subprocess

    t0, seen = time.perf_counter(), None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in proc.stdout:  # ends when the process closes its output (exits)
        out.append(line)
        if seen is None and marker in line:
            seen = time.perf_counter() - t0
        for m in stamps or {}:
            if stamps[m] is None and m in line:
                stamps[m] = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
    proc.wait()
    if proc.returncode != 0 or seen is None:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode} without {marker!r}:\n{''.join(out)[-3000:]}")
    return seen, "".join(out)


# ------------------------------------------------------------------------------------------ timings
def loader_rate(cfg: Config, shards: list[str], n: int, warmup: int, runs: int, batches: int) -> float:
    """Median samples/s over `runs` windows of `batches` batches, after `warmup` batches (worker start)."""
    loader = build_loader(cfg, shards, num_samples=n)
    try:
        for _ in range(max(1, warmup)):
            next(loader)
        rates = []
        for _ in range(runs):
            t0 = time.perf_counter()
            count = sum(len(next(loader)) for _ in range(batches))
            rates.append(count / (time.perf_counter() - t0))
    finally:
        loader.close()
    return statistics.median(rates)


def step_rate(cfg: Config, batch, warmup: int, runs: int) -> float:
    """Median samples/s of one data2vec update on `batch` (student fwd+bwd, teacher fwd, AdamW, EMA)."""
    from model.data2vec import Data2Vec, data2vec_loss
    from model.teacher import EMATeacher, ema_decay

    torch.manual_seed(0)
    student = Data2Vec(cfg.model).train()
    teacher = EMATeacher(student.encoder, lambda name: student.encoder.is_averaged(name, cfg.teacher.scope))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    tau = ema_decay(0, cfg.teacher.tau0, cfg.teacher.tau_end, cfg.teacher.tau_steps)

    def step() -> None:
        loss, _, _ = data2vec_loss(student, teacher.model, cfg, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(student.encoder, tau)

    from .bench import median_time

    return len(batch) / median_time(step, warmup, runs)


def _row(name: str, ours: float, ref: float, note: str) -> dict[str, Any]:
    return {"name": name, "ours": ours, "reference": ref, "ratio": ours / ref, "unit": "samples/s",
            "target": ">= 1", "note": note}


def bench_loader(warmup: int, runs: int) -> list[dict[str, Any]]:
    """Rows: loader samples/s vs. training-step samples/s for vision/audio/text tiny and vision base."""
    from model.presets import audio_tiny, text_tiny, vision_base, vision_tiny

    workers = max(1, min(4, os.cpu_count() or 1))
    common = [f"data.num_workers={workers}"]
    cases = [  # name, config, shard kind, samples, loader batches per timed run, step runs
        ("loader_vision_tiny", apply_overrides(vision_tiny(), common), "vision-tiny", 512, 8, runs),
        ("loader_audio_tiny", apply_overrides(audio_tiny(), common), "audio", 128, 4, runs),
        ("loader_text_tiny", apply_overrides(text_tiny(), common), "text", 512, 8, runs),
        ("loader_vision_base", apply_overrides(vision_base(), common + ["train.batch_size=8"]),
         "vision-base", 64, 4, min(runs, 2)),
    ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="d2v-bench-data-") as root:
        for name, cfg, kind, n, batches, step_runs in cases:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            shards = write_bench_shards(root, kind, n)
            ours = loader_rate(cfg, shards, n, warmup, runs, batches)
            probe = build_loader(apply_overrides(cfg, ["data.num_workers=0"]), shards, num_samples=n)
            batch = next(probe)
            probe.close()
            ref = step_rate(cfg, batch, min(warmup, 1) if kind == "vision-base" else warmup, step_runs)
            rows.append(_row(name, ours, ref, f"{cfg.preset} batch {cfg.train.batch_size}, {workers} loader "
                             f"workers, {torch.get_num_threads()} step threads; step = fwd+bwd+teacher+EMA"))
    return rows


def main(argv: list[str] | None = None) -> int:
    quick = "--quick" in (argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(os.cpu_count() or 1)
    rows = bench_loader(*((1, 2) if quick else (2, 5)))
    for r in rows:
        print(f"{r['name']:<22} {r['ours']:>10.1f} {r['reference']:>10.1f} {r['ratio']:>7.2f} {r['unit']:<10} "
              f"{r['target']:<5} {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
