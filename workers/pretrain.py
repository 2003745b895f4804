"""`d2v pretrain`: the driver. Validates config and data before any cluster time, owns the MLflow run,
runs the training loop on Ray Train (TorchTrainer, DDP), logs artifacts and registers the result.

    validate config + data -> check MLflow -> ray.init -> TorchTrainer.fit -> log + register
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from model.config import Config, ConfigError, apply_overrides
from model.presets import get_preset

from . import tracking
from .tracking import REPO_ROOT

DEFAULT_STORAGE = REPO_ROOT / "runs"


class DataError(ValueError):
    """The shard directory does not fit the run (missing manifest, wrong modality, no tokenizer...)."""


@dataclass
class DataInfo:
    root: Path
    shards: list[str]
    num_samples: int
    fingerprint: str
    tokenizer: Path | None


# ------------------------------------------------------------------------------------------ checks
def resolve_config(modality: str, preset: str, version: str, overrides: list[str]) -> Config:
    cfg = get_preset(modality, preset, version)
    return apply_overrides(cfg, overrides) if overrides else cfg


def inspect_data(modality: str, data: str | Path) -> DataInfo:
    """Read DST/stats.json + manifest; errors name the path at fault and what to do."""
    root = Path(data).resolve()
    hint = f"run `d2v shard {modality} --input SRC --output {data}` first"
    if not root.is_dir():
        raise DataError(f"--data {data}: no such directory; {hint}")
    stats_path, manifest = root / "stats.json", root / "manifest.parquet"
    for p in (stats_path, manifest):
        if not p.is_file():
            raise DataError(f"--data {data}: {p.name} is missing, so this is not a finished shard set; {hint}")
    try:
        stats = json.loads(stats_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{stats_path}: unreadable ({err}); re-run the shard job") from None
    if stats.get("modality") != modality:
        raise DataError(f"{stats_path}: shards are {stats.get('modality')!r} data, not {modality!r}")
    shards = sorted(str(p) for p in root.glob(f"{modality}-*.tar"))
    if not shards:
        raise DataError(f"--data {data}: no {modality}-*.tar shards; {hint}")
    n = int(stats.get("samples", 0))
    if n <= 0:
        raise DataError(f"{stats_path}: the shard set has no samples (see rejects.parquet for why)")
    tok = root / "tokenizer.json"
    if modality == "text" and not tok.is_file():
        raise DataError(f"--data {data}: text shards need tokenizer.json beside them; re-run the shard job")
    fp = str(stats.get("fingerprint") or stats.get("input_fingerprint") or "")
    return DataInfo(root, shards, n, fp, tok if modality == "text" else None)


def fit_config_to_data(cfg: Config, info: DataInfo, overrides: list[str]) -> Config:
    """Text: the vocabulary size comes from the tokenizer (unless the user set it, which must then agree)."""
    if info.tokenizer is None:
        return cfg
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(info.tokenizer)).get_vocab_size()
    if any(o.startswith("model.frontend.vocab_size=") for o in overrides):
        if cfg.model.frontend.vocab_size < vocab:
            raise ConfigError(
                f"model.frontend.vocab_size={cfg.model.frontend.vocab_size} is smaller than the tokenizer's "
                f"{vocab} ({info.tokenizer})"
            )
        return cfg
    return apply_overrides(cfg, [f"model.frontend.vocab_size={vocab}"])


# ------------------------------------------------------------------------------------------- worker
def worker_entry(config: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from .loader import build_loader
    from .train import Hooks, train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = Config.from_yaml(config["cfg"])
    logger = None
    if rank == 0 and config.get("run_id"):
        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
        logger = tracking.MetricLogger(config["run_id"])

    def report(metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def latest():
        c = ray.train.get_checkpoint()
        return c.as_directory() if c is not None else None

    def prepare(m):
        kw = {"find_unused_parameters": cfg.model.trunk.layerdrop > 0}
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs=kw) if world > 1 else m

    hooks = Hooks(
        rank=rank, world_size=world, device=ray.train.torch.get_device(), prepare_model=prepare,
        report=report, latest_checkpoint=latest, log_metrics=logger.log if logger else None,
        progress=lambda s: print(f"[d2v rank {rank}] {s}", flush=True),
    )
    shards, n = config["shards"], config["num_samples"]

    def batches_from(start: int):
        return build_loader(cfg, shards, rank=rank, world_size=world, start_step=start, num_samples=n)

    tok = Path(config["tokenizer"]) if config.get("tokenizer") else None
    try:
        train(cfg, batches_from, hooks, tokenizer=tok)
    finally:
        if logger is not None:
            sent, dropped = logger.close()
            print(f"[d2v rank 0] MLflow metrics: {sent} points sent, {dropped} dropped", flush=True)


# ------------------------------------------------------------------------------------------- driver
def pretrain(
    modality: str,
    data: str | Path,
    preset: str = "tiny",
    version: str = "v1",
    overrides: list[str] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    run_name: str | None = None,
    storage: str | Path | None = None,
    register: bool = True,
) -> dict:
    overrides = list(overrides or [])
    # 1. everything that can be wrong without a cluster
    cfg = resolve_config(modality, preset, version, overrides)
    info = inspect_data(modality, data)
    cfg = fit_config_to_data(cfg, info, overrides)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    tracking.check_reachable()
    run_name = run_name or f"{modality}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = _storage_path(storage)

    # 2. the MLflow run (resumed runs keep theirs)
    run_id = _start_or_resume_run(cfg, info, run_name, modality)

    # 3. Ray Train
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_ray = _init_ray(workers)
    try:
        trainer = TorchTrainer(
            worker_entry,
            train_loop_config={
                "cfg": cfg.to_yaml(), "shards": info.shards, "num_samples": info.num_samples,
                "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
                "tokenizer": str(info.tokenizer) if info.tokenizer else None,
                "threads": max(1, (os.cpu_count() or 1) // workers) if gpus_per_worker == 0 else 4,
            },
            scaling_config=ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            ),
            run_config=RunConfig(
                name=run_name, storage_path=storage_path,
                failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=3),
            ),
        )
        result = trainer.fit()
    finally:
        if started_ray:
            ray.shutdown()
    return _finish(cfg, result, run_id, run_name, modality, info, register)


def _storage_path(storage: str | Path | None) -> str:
    """Run storage: URIs (s3://, gs://) pass through unchanged; local paths become absolute."""
    s = str(storage or os.environ.get("D2V_STORAGE") or DEFAULT_STORAGE)
    return s if "://" in s else str(Path(s).resolve())


def _init_ray(workers: int) -> bool:
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"working_dir": str(REPO_ROOT), "excludes": _SHIP_EXCLUDES},
                 log_to_driver=True)
    else:
        # each Train worker reserves a CPU; leave headroom for the loader and Ray's own tasks
        ray.init(num_cpus=max(os.cpu_count() or 1, workers) + 2, log_to_driver=True)  # dashboard: Train uses its state API
    return True


_SHIP_EXCLUDES = [".venv/", "data/", "runs/", "mlartifacts/", "mlflow.db", ".git/", "*.tar", "__pycache__/"]


def _start_or_resume_run(cfg: Config, info: DataInfo, run_name: str, modality: str) -> str:
    c = tracking.client()
    exp = tracking.experiment_id(f"d2v-{modality}")
    found = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    tags = {"d2v.run_name": run_name, "git_commit": tracking.git_commit(), "data_fingerprint": info.fingerprint,
            "modality": modality, "preset": cfg.preset, "data": str(info.root), "mlflow.runName": run_name}
    run = c.create_run(exp, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in tracking.flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    c.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
    return run.info.run_id


def _finish(cfg: Config, result, run_id: str, run_name: str, modality: str, info: DataInfo, register: bool) -> dict:
    from .train import TrainingStopped

    c = tracking.client()
    metrics = dict(result.metrics or {})
    if result.error is not None:
        c.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {run_name!r} failed: {result.error}")
    if metrics.get("stopped"):
        c.set_terminated(run_id, status="FAILED")
        raise TrainingStopped(f"{metrics['stopped']} (run {run_name!r}; last good checkpoint kept in storage)")
    if result.checkpoint is None:
        c.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {run_name!r} produced no checkpoint")
    out = {"run_name": run_name, "run_id": run_id, "checkpoint": result.checkpoint.path, **{
        k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        _log_curves(c, run_id, d)
        c.log_artifacts(run_id, str(d), "checkpoint")
    if register:
        tags = {"modality": modality, "preset": cfg.preset, "data_fingerprint": info.fingerprint,
                "run_name": run_name, "step": str(metrics.get("step", ""))}
        name, version = tracking.register_checkpoint(run_id, "checkpoint", modality, tags)
        out.update(model=f"models:/{name}@candidate", version=version)
    c.set_terminated(run_id, status="FINISHED")
    return out


def _log_curves(c, run_id: str, ckpt: Path) -> None:
    """Loss and target/prediction std curves from the checkpoint's history, as a PNG artifact."""
    try:
        history = json.loads((ckpt / "state.json").read_text()).get("history", [])
    except (OSError, json.JSONDecodeError):
        return
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [h["loss"] for h in history])
    a.set(title="loss", xlabel="step")
    b.plot(steps, [h["target_std"] for h in history], label="target")
    b.plot(steps, [h["pred_std"] for h in history], label="prediction")
    b.set(title="mean per-dim std (collapse guard)", xlabel="step")
    b.legend()
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "curves.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        c.log_artifact(run_id, str(p))


def print_summary(out: dict) -> None:
    print(json.dumps(out, default=str))
    uri = tracking.tracking_uri()
    print(
        f"\nRegistered {out.get('model', '(not registered)')} (version {out.get('version', '-')}).\n"
        f"Checkpoint: {out['checkpoint']}\nMLflow: {uri}  (browse with `make mlflow-ui`)",
        file=sys.stderr,
    )
