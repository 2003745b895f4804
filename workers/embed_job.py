"""The driver of `d2v embed MODEL --data DST --out OUT_DIR` (the per-unit work is in embed_batch.py).

    run_embed_job("models:/data2vec-vision@candidate", "data/vision", "emb/vision", batch_size=32, actors=2)

OUT_DIR/
  <unit>.parquet   key, source, embedding fixed_size_list<float32>[D]; one per shard (or raw chunk)
  rejects.parquet  key, shard, source, reason: every sample that could not be embedded
  manifest.json    model ref + resolved version + weights sha256, inputs fingerprint, files, counts

MODEL is resolved on the driver (workers.registry.resolve_model) and actors load it from that local path, so on a
multi-node cluster the checkpoint and DST must sit on storage every node sees (as DST must for `d2v pretrain`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .embed_batch import REJECTS_SCHEMA, EmbedJobError, Unit, UnitEmbedder, finished, list_units, write_atomic

PROGRESS_EVERY_S = 5.0
MANIFEST, REJECTS = "manifest.json", "rejects.parquet"


def log(msg: str) -> None:
    print(f"d2v embed: {msg}", file=sys.stderr, flush=True)


def run_embed_job(model: str, data: str | Path, out: str | Path, *, batch_size: int = 32, actors: int = 2,
                  progress: Callable[[str], None] = log) -> dict:
    """Embed every unit of DATA not already done in OUT on a Ray Data actor pool; -> the manifest written."""
    from model.checkpoint import MODEL_FILE, load_config

    from .registry import resolve_model
    from .registry.register import sha256

    if batch_size < 1 or actors < 1:
        raise EmbedJobError(f"--batch-size {batch_size} / --actors {actors}: both must be >= 1")
    data, out = Path(data).resolve(), Path(out).resolve()
    if out == data or data in out.parents:
        raise EmbedJobError(f"--out {out} lies inside --data {data}; write the embeddings somewhere else")
    ckpt = resolve_model(model)
    cfg = load_config(ckpt)
    units = list_units(data, cfg.model.modality)
    weights_sha = sha256(ckpt / MODEL_FILE)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # temps of a run that was killed mid-write (never a finished file)
        stale.unlink(missing_ok=True)
    summaries = {u.name: finished(out / f"{u.name}.parquet", u, weights_sha) for u in units}
    todo = [u for u in units if summaries[u.name] is None]
    progress(f"{len(units)} input files, {len(units) - len(todo)} already embedded, {len(todo)} to do")
    if todo:
        summaries.update(_run_actors(todo, ckpt, out, batch_size, actors, weights_sha, progress))
    return _finish(model, ckpt, data, out, units, summaries, weights_sha, cfg)


def _run_actors(todo: list[Unit], ckpt: Path, out: Path, batch_size: int, actors: int, sha: str,
                progress: Callable[[str], None]) -> dict[str, dict]:
    with ray_session(actors) as ray:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        threads = max(1, (os.cpu_count() or 1) // actors) if not gpus else 1
        ds = ray.data.from_items([{"unit": json.dumps(asdict(u))} for u in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(UnitEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=1, num_gpus=gpus,
                            fn_constructor_kwargs={"ckpt": str(ckpt), "out_dir": str(out), "batch_size": batch_size,
                                                   "weights_sha": sha, "threads": threads})
        progress(f"{actors} actor(s), {'1 GPU' if gpus else f'CPU, {threads} thread(s)'} each")
        done: dict[str, dict] = {}
        rows = rejects = 0
        t0 = last = time.monotonic()
        for row in ds.iter_rows():  # streams: one summary per unit as its Parquet lands
            s = json.loads(row["summary"])
            done[s["unit"]] = s
            rows, rejects = rows + s["rows"], rejects + len(s["rejects"])
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY_S or len(done) == len(todo):
                last = now
                progress(f"{len(done)}/{len(todo)} files | {rows} embedded | {rejects} rejected | "
                         f"{rows / max(now - t0, 1e-9):.1f} samples/s")
    return done


def _finish(model: str, ckpt: Path, data: Path, out: Path, units: list[Unit], summaries: dict[str, dict],
            sha: str, cfg) -> dict:
    rejects = [r for u in units for r in summaries[u.name]["rejects"]]
    table = pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)
    write_atomic(out / REJECTS, lambda f: pq.write_table(table, f))
    files = [{"file": f"{u.name}.parquet", "inputs": list(u.files), "rows": summaries[u.name]["rows"],
              "rejects": len(summaries[u.name]["rejects"]), "skipped": summaries[u.name]["skipped"]} for u in units]
    manifest = {
        "model": model, "model_version": registry_version(model), "checkpoint": str(ckpt), "weights_sha256": sha,
        "modality": cfg.model.modality, "dim": cfg.model.trunk.dim,
        "pooling": "mean of final-layer hidden states over non-padded positions after the prefix",
        "data": str(data),
        "inputs_fingerprint": hashlib.sha256("".join(u.fingerprint for u in units).encode()).hexdigest(),
        "files": files, "rejects_file": REJECTS,
        "counts": {"files": len(units), "skipped_files": sum(f["skipped"] for f in files),
                   "embedded": sum(f["rows"] for f in files), "rejected": len(rejects)},
    }
    write_atomic(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def registry_version(model: str) -> str | None:
    """`models:/name@alias` or `models:/name/latest` -> the version number it points at now; else None."""
    if not model.startswith("models:/"):
        return None
    from mlflow import MlflowClient

    ref = model[len("models:/"):]
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return str(MlflowClient().get_model_version_by_alias(name, alias).version)
        name, _, version = ref.partition("/")
        if version == "latest":
            return str(max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'")))
        return version or None
    except Exception:  # the ref resolved a moment ago; a registry hiccup only loses this label
        return None


@contextmanager
def ray_session(actors: int = 1) -> Iterator[Any]:
    """Use a running Ray; else RAY_ADDRESS; else start a local one (and stop it at the end)."""
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS") or None
        if address and address.startswith(("http://", "https://")):
            raise EmbedJobError(f"RAY_ADDRESS={address} is a Ray Jobs address: run this through `d2v embed --data`, "
                                "which submits it as a job there, or point RAY_ADDRESS at the cluster (host:6379)")
        root = str(Path(__file__).resolve().parents[1])  # workers of a local instance import this checkout
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}}
        local = {"runtime_env": env, "num_cpus": max(os.cpu_count() or 1, actors) + 1}  # +1: Ray Data's own tasks
        from pipelines.fs import cluster_runtime_env

        remote = {"runtime_env": cluster_runtime_env(root)}  # the code and storage/tracking variables
        ray.init(address=address, include_dashboard=False, **(remote if address else local))
    ctx = ray.data.DataContext.get_current()
    bars, ctx.enable_progress_bars = ctx.enable_progress_bars, False  # our progress lines replace them
    try:
        yield ray
    finally:
        ctx.enable_progress_bars = bars
        if started:
            ray.shutdown()
