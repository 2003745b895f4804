"""`make bench`: speed figures with a reference measured in the same run, as a table and one JSON line.

    python -m workers.bench [--only NAME ...] [--quick]

Each benchmark returns rows (name, ours, reference, ratio, unit, target). Timings are medians over
timed runs after warm-ups, with torch using every core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch


@dataclass
class Row:
    name: str
    ours: float
    reference: float
    ratio: float
    unit: str
    target: str
    note: str = ""


def median_time(fn: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_times_interleaved(fns: list[Callable[[], object]], warmup: int, runs: int) -> list[float]:
    """Medians of several functions timed in alternation (a, b, b, a, ...), so that drift of the machine
    (clock, cache, other load) during the run falls on each of them alike instead of on whichever ran last."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(runs):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def matmul_peak_flops(n: int = 2048, runs: int = 8) -> float:
    """fp32 matmul FLOP/s of this machine, measured now (the MFU denominator)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), warmup=3, runs=runs)
    return 2 * n**3 / t


# ---------------------------------------------------------------------------------- vision student
def _vision_base_batch(batch: int, seed: int = 0):
    from model.masking import block_mask
    from model.presets import vision_base

    cfg = vision_base()
    g = torch.Generator().manual_seed(seed)
    grid = cfg.model.frontend.grid
    m = cfg.masking
    mask = torch.stack(
        [block_mask(grid, grid, m.num_masked, m.min_block, m.max_block, m.min_aspect, generator=g) for _ in range(batch)]
    )  # (B, N)
    pixels = torch.randn(batch, 3, cfg.model.frontend.image_size, cfg.model.frontend.image_size, generator=g)
    return cfg, pixels, mask


def _hf_vision(cfg):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    t = cfg.model.trunk
    hf_cfg = Data2VecVisionConfig(
        image_size=cfg.model.frontend.image_size, patch_size=cfg.model.frontend.patch_size,
        hidden_size=t.dim, num_hidden_layers=t.depth, num_attention_heads=t.heads, intermediate_size=t.ffn_dim,
        layer_norm_eps=t.ln_eps, layer_scale_init_value=t.layer_scale_init, drop_path_rate=t.drop_path,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        use_shared_relative_position_bias=True, use_relative_position_bias=False,
        use_absolute_position_embeddings=False, use_mean_pooling=False, use_mask_token=True,
    )
    return Data2VecVisionModel(hf_cfg, add_pooling_layer=False)


def bench_student_vs_hf(warmup: int, runs: int, batch: int = 8) -> list[Row]:
    """Our ViT-B/16 student fwd+bwd vs HF Data2VecVisionModel (+ the same linear head), masked, 224^2."""
    from model.data2vec import Data2Vec

    cfg, pixels, mask = _vision_base_batch(batch)
    ours = Data2Vec(cfg.model).train()
    hf = _hf_vision(cfg).train()
    hf_head = torch.nn.Linear(cfg.model.trunk.dim, cfg.model.trunk.dim)

    def step_ours():
        pred, _ = ours(pixels, mask)
        pred.float().square().mean().backward()

    def step_hf():
        h = hf(pixel_values=pixels, bool_masked_pos=mask).last_hidden_state[:, 1:]
        hf_head(h[mask]).float().square().mean().backward()

    t_ours, t_hf = median_times_interleaved([step_ours, step_hf], warmup, runs)
    return [Row("student_step_vs_hf", t_ours, t_hf, t_ours / t_hf, "s/step", "<= 0.9",
                f"ViT-B/16 224^2 batch {batch}, {int(mask[0].sum())}/196 masked, fwd+bwd")]


def vit_forward_flops(dim: int, depth: int, ffn: int, tokens: int, patch_in: int, n_patches: int) -> float:
    """Matmul FLOPs of one ViT forward on one sample (2 per multiply-add)."""
    per_layer = 2 * tokens * (4 * dim * dim + 2 * dim * ffn) + 2 * 2 * tokens * tokens * dim
    return depth * per_layer + 2 * n_patches * patch_in * dim


def bench_train_step_mfu(warmup: int, runs: int, batch: int = 8) -> list[Row]:
    """A whole data2vec v1 step at ViT-B (student fwd+bwd, teacher fwd, EMA) as a fraction of matmul peak."""
    from model.data2vec import Batch, Data2Vec, data2vec_loss
    from model.teacher import EMATeacher, ema_decay

    cfg, pixels, mask = _vision_base_batch(batch)
    student = Data2Vec(cfg.model).train()
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    b = Batch(pixels, mask)

    def step():
        loss, _, _ = data2vec_loss(student, teacher.model, cfg, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(student.encoder, ema_decay(0, cfg.teacher.tau0, cfg.teacher.tau_end, cfg.teacher.tau_steps))

    t = median_time(step, warmup, runs)
    f, t_ = cfg.model.frontend, cfg.model.trunk
    n = f.grid**2
    fwd = vit_forward_flops(t_.dim, t_.depth, t_.ffn_dim, n + 1, f.in_chans * f.patch_size**2, n)
    head = 2 * int(mask.sum()) * t_.dim * t_.dim
    model_flops = batch * fwd * 3 + batch * fwd + 3 * head  # student fwd+bwd (3x), teacher fwd (1x)
    peak = matmul_peak_flops()
    achieved = model_flops / t
    return [Row("train_step_mfu", achieved / 1e9, peak / 1e9, achieved / peak, "GFLOP/s", ">= 0.5",
                f"ViT-B/16 batch {batch}: {t:.2f} s/step; reference = fp32 2048^3 matmul peak")]


# -------------------------------------------------------------------------------------------- data
def bench_loader(warmup: int, runs: int) -> list[Row]:
    """Loader samples/s (real shards, loader workers) vs the samples/s the training step consumes."""
    from .bench_data import bench_loader as rows

    return [Row(**r) for r in rows(warmup, runs)]


def bench_sharding(warmup: int, runs: int, n: int = 20_000, n_rss: tuple[int, int] = (20_000, 100_000)) -> list[Row]:
    """`d2v shard vision` on Ray vs one process doing the same decode+validate+encode+tar, and peak memory.

    Rows: sharding_vs_single (n 32x32 PNGs, same files, same run, warm cluster: samples/s vs the one
    process) and sharding_peak_rss_ratio_100k_vs_20k (peak summed RSS of driver + Ray processes of a whole
    `run_shard` in a fresh process at n_rss[1] vs n_rss[0] tiny 16x16 PNGs)."""
    import shutil
    import tempfile

    import ray

    from pipelines import manifest as mf
    from pipelines.decode import decode_image
    from pipelines.shard import run_shard

    from .bench_data import peak_tree_rss, write_image_corpus

    spp, rows = 1000, []
    with tempfile.TemporaryDirectory(prefix="d2v-bench-shard-") as tmp:
        src = write_image_corpus(os.path.join(tmp, "speed"), n, 32)
        files = sorted(os.path.relpath(os.path.join(d, f), src) for d, _, fs_ in os.walk(src) for f in fs_)

        def single():  # what a one-process sharder does per input: read, decode+validate, encode, tar
            def samples():
                for rel in files:
                    with open(os.path.join(src, rel), "rb") as f:
                        s = decode_image(f.read())
                    meta = {"source": rel, "label": os.path.dirname(rel), "length": None, **s.meta}
                    yield rel[:-4], [(s.ext, s.encode()), ("json", mf.json_bytes(meta))]
            it = samples()
            for i in range(0, len(files), spp):
                with open(os.path.join(tmp, f"single-{i // spp:06d}.tar"), "wb") as f:
                    mf.write_tar(f, (next(it) for _ in range(min(spp, len(files) - i))))

        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=(os.cpu_count() or 1) + 2, include_dashboard=False, log_to_driver=False)
        try:
            def sharded():
                out = os.path.join(tmp, "dst")
                shutil.rmtree(out, ignore_errors=True)
                run_shard("vision", src, out, samples_per_shard=spp)

            sharded()  # warm-up: worker processes started, imports done
            t_ray, t_single = median_times_interleaved([sharded, single], 0, max(1, runs // 4))
            cpu_ray, cpu_single = _cpu_of(sharded), _cpu_of(single)["driver"]  # the cause when the ratio is short
        finally:
            if started:
                ray.shutdown()
        cores = os.cpu_count() or 1
        rows.append(Row("sharding_vs_single", n / t_ray, n / t_single, t_single / t_ray, "samples/s",
                        f">= {0.9 * cores:.1f}", f"{n} PNG 32x32 -> {spp}-sample shards; Ray on {cores} cores "
                        "(one decode per input) vs one process doing the same work"))
        wall = cpu_ray.pop("wall")
        total = sum(cpu_ray.values())
        rows.append(Row("sharding_cpu_vs_single", total, cpu_single, total / cpu_single, "CPU s", "—",
                        f"CPU seconds of the whole Ray process tree for one sharding run (tasks "
                        f"{cpu_ray['tasks']:.1f}, driver {cpu_ray['driver']:.1f}, raylet/GCS/other "
                        f"{cpu_ray['ray']:.1f}) vs the one process; with {cores} cores the speed-up is at most "
                        f"{cores} / this = {cores * cpu_single / total:.2f}; the cores were "
                        f"{total / (wall * cores):.0%} busy with it over its {wall:.1f} s"))
        peaks = []
        for k in n_rss:
            print(f"[bench] sharding peak RSS at {k} files ...", file=sys.stderr, flush=True)
            src_k = write_image_corpus(os.path.join(tmp, f"rss{k}"), k, 16)
            code = f"from pipelines.shard import run_shard; run_shard('vision', {src_k!r}, {src_k + '-dst'!r}, " \
                   f"samples_per_shard={spp})"
            peak, wall = peak_tree_rss([sys.executable, "-c", code])
            print(f"[bench] {k} files: peak RSS {peak / 2**20:.0f} MiB, {wall:.1f} s", file=sys.stderr, flush=True)
            peaks.append(peak)
            shutil.rmtree(os.path.join(tmp, f"rss{k}"))
    rows.append(Row("sharding_peak_rss_ratio_100k_vs_20k", peaks[1] / 2**20, peaks[0] / 2**20, peaks[1] / peaks[0],
                    "MiB", "<= 1.2", f"peak RSS of driver + Ray processes, whole `run_shard` in a fresh process: "
                    f"{n_rss[1]} vs {n_rss[0]} PNG 16x16"))
    return rows


def _cpu_of(fn: Callable[[], object]) -> dict[str, float]:
    """CPU seconds spent by this process's tree (driver, Ray tasks, Ray services) while fn runs."""
    from .bench_data import tree_cpu_seconds

    before, t0 = tree_cpu_seconds(os.getpid()), time.perf_counter()
    fn()
    after, wall = tree_cpu_seconds(os.getpid()), time.perf_counter() - t0
    return {"wall": wall, **{k: after[k] - before[k] for k in before}}


def bench_train_startup(warmup: int, runs: int) -> list[Row]:
    """`d2v pretrain vision` (tiny, 2 Ray Train workers, local Ray started by the command) from submit to the
    end of its first step, vs the same training started in a plain process (no Ray, no MLflow)."""
    import tempfile

    from pipelines.shard import run_shard

    from .bench_data import time_to_line, write_image_corpus

    overrides = ["train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2", "data.num_workers=1"]
    with tempfile.TemporaryDirectory(prefix="d2v-bench-startup-") as tmp:
        data = os.path.join(tmp, "shards")
        run_shard("vision", write_image_corpus(tmp, 256, 32), data, samples_per_shard=64)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "D2V_STORAGE": f"{tmp}/runs"}
        env.pop("RAY_ADDRESS", None)
        sets = [a for o in overrides for a in ("--set", o)]
        stamps = dict.fromkeys(_STARTUP_PHASES.values())
        ours, out = time_to_line([sys.executable, "-m", "workers.cli", "pretrain", "vision", "--data", data,
                                  "--version", "v1", "--workers", "2", *sets], "d2v pretrain: step 1/", env,
                                 stamps=stamps)
        plain = ("import sys; from workers.pretrain import "
                 "resolve_config, inspect_data; from workers.loader import build_loader; from workers.train import "
                 "Hooks, train; cfg = resolve_config('vision', 'tiny', 'v1', sys.argv[2:]); "
                 "info = inspect_data('vision', sys.argv[1]); train(cfg, lambda p: build_loader(cfg, info.shards, "
                 "start_step=p, num_samples=info.num_samples), Hooks(progress=lambda s: print(s, flush=True)))")
        ref, _ = time_to_line([sys.executable, "-c", plain, data, *overrides], "step 1/", env)
    ends = [stamps[m] for m in _STARTUP_PHASES.values()] + [ours]
    split = ", ".join(f"{name} {b - a:.1f} s" for name, a, b in zip([*_STARTUP_PHASES, "model, loader, step 1"],
                                                                     [0.0, *ends], ends) if a is not None and b)
    init = re.search(r"d2v pretrain: ray: .*\(([\d.]+) s\)", out)  # the driver times its ray.init
    return [Row("train_startup_s", ours, ref, ours / ref, "s", "report",
                "submit -> first step: `d2v pretrain vision` tiny, 2 workers, local Ray vs the same training in a "
                f"plain process; console timeline: {split}" + (f" (ray.init {init[1]} s of it)" if init else ""))]


# what the time before the first step goes to: phase name -> the console line that ends it
_STARTUP_PHASES = {
    "imports, config check, MLflow run, ray.init": "d2v pretrain: ray:",
    "Train controller + worker group": "startup: Ray + worker group up",
}


# ------------------------------------------------------------------------------------------- train
def bench_train_steps(warmup: int, runs: int) -> list[Row]:
    """Steps/s of the real training loop (workers.train.train, no Ray) on loader batches, with its time split."""
    import tempfile

    from model.config import apply_overrides
    from model.presets import get_preset

    from .bench_data import write_bench_shards
    from .loader import build_loader
    from .train import Hooks, train

    rows = []
    cases = [("vision", "tiny", "vision-tiny", 20 + 10 * runs), ("audio", "tiny", "audio", 10 + 5 * runs),
             ("text", "tiny", "text", 20 + 10 * runs), ("vision", "base", "vision-base", 2 + runs // 2)]
    with tempfile.TemporaryDirectory(prefix="d2v-bench-train-") as root:
        for modality, size, kind, steps in cases:
            print(f"[bench] train_steps {modality}-{size} ...", file=sys.stderr, flush=True)
            cfg = get_preset(modality, size)
            bs = 8 if size == "base" else cfg.train.batch_size
            cfg = apply_overrides(cfg, [f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                                        f"train.log_every={steps}", f"train.batch_size={bs}",
                                        "data.num_workers=2", "train.collapse_after=1000000"])
            shards = write_bench_shards(root, kind, 128 if size == "tiny" else 32, per_shard=32)
            out = train(cfg, lambda start: build_loader(cfg, shards, start_step=start, num_samples=len(shards) * 32),
                        Hooks(progress=lambda s: None))
            t = out["timings"]
            total = sum(t.values())
            split = " ".join(f"{k} {100 * v / total:.0f}%" for k, v in t.items())
            rows.append(Row(f"train_{modality}_{size}", steps / total, bs, bs * steps / total, "steps/s",
                            "report", f"ratio = samples/s (batch {bs}); split: {split}"))
    return rows


def bench_embed_ray_vs_single(warmup: int, runs: int, n: int = 16_000, per_shard: int = 250) -> list[Row]:
    """`d2v embed MODEL --data` (Ray Data, 2 actors, whole job incl. actor start-up, warm cluster) vs one process
    embedding the same shards with the same code (embed_batch.embed_unit), best of 1 thread and every core."""
    import tempfile
    from pathlib import Path

    import ray

    from model.checkpoint import load_encoder, save_checkpoint
    from model.data2vec import Data2Vec
    from model.encoder import Encoder
    from model.presets import get_preset

    from .bench_data import write_bench_shards
    from .embed_batch import embed_unit, list_units
    from .embed_job import run_embed_job

    with tempfile.TemporaryDirectory(prefix="d2v-bench-embed-") as tmp:
        root, data = Path(tmp), Path(tmp) / "shards"
        data.mkdir()
        for p in write_bench_shards(str(data), "vision-tiny", n, per_shard=per_shard):  # 64x64 PNGs
            os.rename(p, p.replace("vision-tiny-", "vision-"))
        cfg = get_preset("vision", "tiny")
        ckpt = save_checkpoint(root / "ckpt", cfg, Data2Vec(cfg.model), Encoder(cfg.model), state={"step": 0})
        cfg, enc = load_encoder(ckpt)
        units, cores = list_units(data, "vision"), os.cpu_count() or 1

        def single(threads: int) -> Callable[[], None]:
            def go() -> None:
                torch.set_num_threads(threads)
                for u in units:
                    embed_unit(u, enc, cfg, None, root / "single", 32, "bench", torch.device("cpu"))
                torch.set_num_threads(cores)
            return go

        def job() -> None:
            run_embed_job(str(ckpt), data, root / f"ray-{time.monotonic_ns()}", batch_size=32, actors=2,
                          progress=lambda _: None)

        started = not ray.is_initialized()
        if started:
            ray.init(num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
        try:
            job()  # warm-up: Ray Data and the worker processes' imports
            t_ray, t_1, t_all = median_times_interleaved([job, single(1), single(cores)], 0, max(1, runs // 4))
        finally:
            if started:
                ray.shutdown()
    t_single = min(t_1, t_all)
    return [Row("embed_ray_vs_single", n / t_ray, n / t_single, t_single / t_ray, "samples/s", ">= 1.6",
                f"{n} PNG 64x64 in {per_shard}-sample shards, vision tiny, batch 32; Ray job incl. actor start-up "
                f"vs one process (1 thread {n / t_1:.0f}/s, {cores} threads {n / t_all:.0f}/s: the faster is the "
                "reference)")]


def _v2_row(name: str) -> Callable[[int, int], list[Row]]:
    """A data2vec 2.0 row from bench_v2.py, imported when run (that module imports this one)."""
    def run(warmup: int, runs: int) -> list[Row]:
        from . import bench_v2

        return getattr(bench_v2, name)(warmup, runs)
    return run


BENCHES: dict[str, Callable[[int, int], list[Row]]] = {
    "student_step_vs_hf": bench_student_vs_hf,
    "train_step_mfu": bench_train_step_mfu,
    "loader": bench_loader,
    "sharding": bench_sharding,
    "train_startup": bench_train_startup,
    "train_steps": bench_train_steps,
    "embed_ray_vs_single": bench_embed_ray_vs_single,
    "v2_student_step_vs_v1": _v2_row("bench_v2_student_step"),
    "v2_time_to_v1_accuracy": _v2_row("bench_v2_time_to_v1_accuracy"),
    "ema_share": _v2_row("bench_ema_share"),
}


def print_table(rows: list[Row]) -> None:
    head = f"{'benchmark':<24} {'ours':>12} {'reference':>12} {'ratio':>7} {'unit':<10} {'target':<8} note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<24} {r.ours:>12.4g} {r.reference:>12.4g} {r.ratio:>7.3f} {r.unit:<10} {r.target:<8} {r.note}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these benchmarks")
    p.add_argument("--quick", action="store_true", help="fewer runs (a smoke check, not for reporting)")
    a = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    warmup, runs = (1, 2) if a.quick else (3, 8)
    rows: list[Row] = []
    for name in a.only or BENCHES:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows += BENCHES[name](warmup, runs)
    print_table(rows)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "rows": [asdict(r) for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
