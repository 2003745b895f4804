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
from pathlib import Path

from model.config import Config, ConfigError, apply_overrides
from model.presets import default_version, get_preset
from pipelines.fs import cluster_runtime_env

from . import tracking
from .console import RunConsole
from .outcome import end_run, raise_if_failures_exhausted, raise_if_tracking_lost, refuse_if_complete
from .resume import ResumeConflict, check_resume, describe, list_checkpoints, newest_whole, next_name
from .storage import DataError, DataInfo, inspect_data  # noqa: F401 (re-exported: the driver's API)
from .storage import display, local_copy, read_text
from .tracking import REPO_ROOT

DEFAULT_STORAGE = REPO_ROOT / "runs"


# ------------------------------------------------------------------------------------------ checks
def resolve_config(modality: str, preset: str, version: str, overrides: list[str]) -> Config:
    cfg = get_preset(modality, preset, version)
    return apply_overrides(cfg, overrides) if overrides else cfg


def fit_config_to_data(cfg: Config, info: DataInfo, overrides: list[str]) -> Config:
    """Text: the vocabulary size comes from the tokenizer (unless the user set it, which must then agree)."""
    if info.tokenizer is None:
        return cfg
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(read_text(info.tokenizer)).get_vocab_size()  # local or object store
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
    if rank == 0 and config.get("t_ray"):
        print(f"[d2v rank 0] startup: Ray + worker group up {time.time() - config['t_ray']:.1f} s after ray.init "
              "began", flush=True)
    placement = _placement(rank, world)  # every rank: which node it runs on; rank 0 records them all
    print(f"[d2v rank {rank}] on node {placement[rank]['node_id']}", flush=True)
    logger = _RankZeroLogger(config, _placement_tags(placement)) if rank == 0 and config.get("run_id") else None

    def report(metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    existing: set[str] = set()  # checkpoint names in storage when this attempt started (new ones avoid them)

    def latest():
        c = ray.train.get_checkpoint()
        if c is None:
            return None
        run_dir, newest = c.path.rsplit("/", 1)
        existing.update(list_checkpoints(c.filesystem, run_dir))
        name, skipped = newest_whole(c.filesystem, run_dir, newest)  # a torn newest one: the one before it
        for bad, why in skipped:
            if rank == 0:
                print(f"[d2v rank 0] skipping checkpoint {bad}: {why}; falling back to the one before it", flush=True)
        if name is None:
            if rank == 0:
                print("[d2v rank 0] no whole checkpoint left in storage; starting from step 0", flush=True)
            return None
        return ray.train.Checkpoint(f"{run_dir}/{name}", filesystem=c.filesystem).as_directory()

    def prepare(m):
        kw = {"find_unused_parameters": cfg.model.trunk.layerdrop > 0}
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs=kw) if world > 1 else m

    hooks = Hooks(
        rank=rank, world_size=world, device=ray.train.torch.get_device(), prepare_model=prepare,
        report=report, latest_checkpoint=latest, log_metrics=logger.log if logger else None,  # waits for it
        progress=lambda s: print(f"[d2v rank {rank}] {s}", flush=True),
        checkpoint_name=lambda step: next_name(step, existing),
    )
    shards, n = config["shards"], config["num_samples"]

    def batches_from(position: int):  # micro-batches consumed so far = the loader's batch index
        return build_loader(cfg, shards, rank=rank, world_size=world, start_step=position, num_samples=n)

    tok = local_copy(config.get("tokenizer"))  # beside the shards, maybe in object storage
    try:
        out = train(cfg, batches_from, hooks, tokenizer=tok)
    finally:
        if logger is not None:
            from .outcome import write_unsent

            sent, dropped = logger.close(spool=lambda points: write_unsent(config["run_dir"], points))
            held = f", {logger.held} kept for `d2v register`" if logger.held else ""
            print(f"[d2v rank 0] MLflow metrics: {sent} points sent, {dropped} dropped{held}", flush=True)
    # rank 0's value is Result.return_value: Ray Train keeps only checkpointed reports' metrics, and a stop
    # (NaN, collapse) reports none
    return {"step": out.get("step"), "stopped": out.get("stopped")}


def _placement(rank: int, world: int) -> list[dict]:
    """[{rank, node_id}] of every rank, gathered over the process group Ray Train set up (gloo/nccl). The Ray
    node id, not an IP: a worker process only guesses its IP (it may differ from the one its node registered)."""
    import ray

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}
    if world == 1:
        return [me]
    import torch.distributed as dist

    everyone: list = [None] * world
    dist.all_gather_object(everyone, me)
    return everyone


def _placement_tags(placement: list[dict]) -> dict[str, str]:
    """MLflow tags d2v.rank_<r>.node_id: where each rank of the latest attempt ran (`ray list nodes` maps ids
    to addresses), and d2v.world_size: how many ranks it had (an elastic run may shrink or grow)."""
    ranks = {f"d2v.rank_{p['rank']}.node_id": p["node_id"] for p in placement}
    return {"d2v.world_size": str(len(placement)), **ranks}


class _RankZeroLogger:
    """tracking.MetricLogger built in a thread: importing MLflow takes seconds, which then overlap with model
    building, loader start and DDP set-up instead of delaying the first step. `log`/`close` wait for it.
    `tags` (the ranks' placement) are then set on the run from the same thread, which `log` does not wait
    for (a tracking server that is down must not hold up training)."""

    def __init__(self, config: dict, tags: dict[str, str] | None = None):
        import threading

        os.environ["MLFLOW_TRACKING_URI"] = config["tracking_uri"]
        self._made: dict = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._make, args=(config["run_id"], tags or {}), daemon=True)
        self._thread.start()

    def _make(self, run_id: str, tags: dict[str, str]) -> None:
        try:
            self._made["logger"] = logger = tracking.MetricLogger(run_id)
        except BaseException as err:  # re-raised in the training thread at its first log call
            self._made["error"] = err
            return
        finally:
            self._ready.set()
        try:
            from mlflow.entities import RunTag

            logger.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            # ranks of an earlier, larger attempt (an elastic run that lost a node) are not where it runs now
            for k in logger.client.get_run(run_id).data.tags if tags else ():
                if k.startswith("d2v.rank_") and k not in tags:
                    logger.client.delete_tag(run_id, k)
        except Exception as err:  # noqa: BLE001 -- a tracking blip must not stop training
            print(f"[d2v rank 0] could not record the ranks' placement in MLflow: {err}", flush=True)

    def _get(self) -> tracking.MetricLogger:
        self._ready.wait()
        if "error" in self._made:
            raise self._made["error"]
        return self._made["logger"]

    def log(self, metrics: dict, step: int) -> None:
        self._get().log(metrics, step)

    def close(self, spool=None) -> tuple[int, int]:
        logger = self._get()
        self._thread.join(timeout=10)  # the placement tags: long done unless the server is away
        return logger.close(spool)

    @property
    def held(self) -> int:
        return self._get().held


# ------------------------------------------------------------------------------------------- driver
def pretrain(
    modality: str,
    data: str | Path,
    preset: str = "tiny",
    version: str | None = None,
    overrides: list[str] | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    run_name: str | None = None,
    storage: str | Path | None = None,
    register: bool = True,
    verbose: bool = False,
    min_workers: int | None = None,
) -> dict:
    """Train and register; the console shows progress and Ray's chatter goes to the run's driver.log
    (workers/console.py), unless `verbose`. `version` None: the modality's default (presets.DEFAULT_VERSION).
    `min_workers` < `workers`: elastic (Ray Train's ScalingConfig(num_workers=(min, max))): after a node is lost
    the run restarts from its last checkpoint with the workers the cluster still has room for, at least
    min_workers, and grows back when capacity returns. None: fixed at `workers` (a lost node is waited for)."""
    overrides = list(overrides or [])
    version = version or default_version(modality)
    # 1. everything that can be wrong without a cluster
    cfg = resolve_config(modality, preset, version, overrides)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    min_workers = workers if min_workers is None else min_workers
    if not 1 <= min_workers <= workers:
        raise ConfigError(f"--min-workers must be between 1 and --workers={workers}, got {min_workers}")
    info = inspect_data(modality, data)
    cfg = fit_config_to_data(cfg, info, overrides)
    tracking.check_reachable()
    run_name = run_name or f"{modality}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = _storage_path(storage)
    refuse_if_complete(cfg, run_name, modality, storage_path)

    # 2. the MLflow run (resumed runs keep theirs)
    run_id = _start_or_resume_run(cfg, info, run_name, modality, workers)

    # 3. Ray Train
    import ray

    log_path = run_log_path(storage_path, run_name)
    with RunConsole(log_path, verbose) as console:
        t_ray, given = time.time(), os.environ.get("RAY_ADDRESS")
        started_ray = _init_ray(workers)
        console.attach()
        how = ("connected to " + given if given else "started a local instance") if started_ray else "in use already"
        print(f"d2v pretrain: ray: {how} ({time.time() - t_ray:.1f} s); Ray's log: {log_path}", file=sys.stderr,
              flush=True)
        try:
            result = _fit(cfg, info, run_id, run_name, (min_workers, workers), gpus_per_worker, storage_path, t_ray)
        except Exception as err:
            raise_if_failures_exhausted(err, cfg, run_id, run_name, storage_path)
            raise
        finally:
            if started_ray:
                ray.shutdown()
                os.environ.pop("RAY_ADDRESS", None)  # pinned by _init_ray to the cluster now gone
        try:  # MLflow's chatter: the log too
            out = _finish(cfg, result, run_id, run_name, modality, info, register)
        except Exception as err:
            raise_if_tracking_lost(err, result, run_name, storage_path)
            raise
    return {**out, "log": str(log_path)}


def _fit(cfg: Config, info: DataInfo, run_id: str, run_name: str, workers: int | tuple[int, int],
         gpus_per_worker: float, storage_path: str, t_ray: float | None = None):
    """The Ray Train run: TorchTrainer over `worker_entry`, one CPU (and GPUs) per DDP rank. workers: a
    count, or (min, max) for an elastic worker group (equal bounds: fixed)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    low, workers = (workers, workers) if isinstance(workers, int) else workers
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={
            "cfg": cfg.to_yaml(), "shards": info.shards, "num_samples": info.num_samples,
            "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
            "tokenizer": str(info.tokenizer) if info.tokenizer else None,
            "threads": max(1, (os.cpu_count() or 1) // workers) if gpus_per_worker == 0 else 4,
            "t_ray": t_ray,  # rank 0 reports how long Ray and the worker group took to come up
            "run_dir": f"{storage_path.rstrip('/')}/{run_name}",  # metrics MLflow could not take wait here
        },
        scaling_config=ScalingConfig(
            num_workers=workers if low == workers else (low, workers), use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
        ),
    )
    return trainer.fit()


def run_log_path(storage_path: str, run_name: str) -> Path:
    """<storage>/<run>/driver.log for local storage; runs/<run>/driver.log when storage is a URI."""
    root = Path(storage_path) if "://" not in storage_path else DEFAULT_STORAGE
    return root / run_name / "driver.log"


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
        # the code travels as working_dir; the storage/tracking variables (pipelines/fs.py) go along, so workers on
        # other machines reach the same object store and MLflow as this shell
        ray.init(address=address, log_to_driver=True, runtime_env=cluster_runtime_env(str(REPO_ROOT)))
    else:
        # Pin this cluster for every process of the job: Train's PlacementGroupCleaner actor queries the
        # state API, which otherwise guesses among the local Ray instances ("Found multiple active Ray
        # instances"). The dashboard stays: it serves that state API. Each Train worker reserves a CPU and
        # the loader and Ray's own tasks need headroom.
        port = _free_port()
        ray.init(num_cpus=max(os.cpu_count() or 1, workers) + 2, log_to_driver=True, dashboard_port=port,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address  # this process: no guessing either
    return True


def _free_port() -> int:
    """A loopback port free now (Ray's dashboard binds it a moment later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_or_resume_run(cfg: Config, info: DataInfo, run_name: str, modality: str, workers: int = 1) -> str:
    c = tracking.client()
    exp = tracking.experiment_id(f"d2v-{modality}")
    found = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{run_name}'", max_results=1)
    if found:
        return _resume_run(c, found[0], cfg, info, run_name, workers)
    tags = {"d2v.run_name": run_name, "git_commit": tracking.git_commit(), "data_fingerprint": info.fingerprint,
            "modality": modality, "preset": cfg.preset, "data": display(info.root), "mlflow.runName": run_name,
            "d2v.workers": str(workers)}
    run = c.create_run(exp, run_name=run_name, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in tracking.flatten(cfg.to_dict()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    c.log_text(run.info.run_id, cfg.to_yaml(), "config.yaml")
    return run.info.run_id


def _resume_run(c, run, cfg: Config, info: DataInfo, run_name: str, workers: int) -> str:
    """Refuse a resume that would change the experiment (before any cluster time); record the allowed changes.

    MLflow params cannot be overwritten, so resume N is recorded as tags `d2v.resumes` = N and
    `d2v.resume_N` = "field: old -> new; ..." plus the config it ran with as artifact resume_N/config.yaml.
    """
    run_id, tags = run.info.run_id, run.data.tags
    n = int(tags.get("d2v.resumes", "0")) + 1
    latest = f"resume_{n - 1}/config.yaml" if n > 1 else "config.yaml"  # the config it last ran with
    try:
        with tempfile.TemporaryDirectory() as tmp:
            old = Config.from_yaml(Path(c.download_artifacts(run_id, latest, tmp)).read_text())
    except Exception as err:  # noqa: BLE001 -- any store error means the check cannot be made
        raise ResumeConflict(
            f"run {run_name!r} ({run_id}): cannot read its {latest} artifact to check the resumed config "
            f"against it ({type(err).__name__}: {err}); use another --run-name"
        ) from None
    extra = [("--workers", tags.get("d2v.workers", str(workers)), str(workers)),
             ("--data fingerprint", tags.get("data_fingerprint", info.fingerprint), info.fingerprint)]
    changes = check_resume(f"run {run_name!r}", old, cfg, extra)
    c.set_tag(run_id, "d2v.resumes", str(n))
    c.set_tag(run_id, f"d2v.resume_{n}", describe(changes) or "no config change")
    c.log_text(run_id, cfg.to_yaml(), f"resume_{n}/config.yaml")
    c.update_run(run_id, status="RUNNING")
    return run_id


def _finish(cfg: Config, result, run_id: str, run_name: str, modality: str, info: DataInfo, register: bool) -> dict:
    from .train import TrainingStopped

    c = tracking.client()
    metrics = dict(result.metrics or {})
    metrics["stopped"] = (getattr(result, "return_value", None) or {}).get("stopped") or metrics.get("stopped")
    if result.error is not None:  # Ray Train raises instead (see pretrain); kept for results that carry it
        raise result.error
    if metrics.get("stopped"):
        marked = end_run(run_id, "FAILED", metrics["stopped"])
        raise TrainingStopped(f"{metrics['stopped']} (run {run_name!r}; the last good checkpoint is kept in storage; "
                              f"{marked})")
    if result.checkpoint is None:
        c.set_terminated(run_id, status="FAILED")
        raise RuntimeError(f"training run {run_name!r} produced no checkpoint")
    out = {"run_name": run_name, "run_id": run_id, "checkpoint": _checkpoint_uri(result.checkpoint), **{
        k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}
    with result.checkpoint.as_directory() as d:
        out.update(record_finished(cfg, run_id, run_name, modality, info.fingerprint, Path(d), metrics, register))
    return out


def record_finished(cfg: Config, run_id: str, run_name: str, modality: str, fingerprint: str, d: Path,
                    metrics: dict, register: bool) -> dict:
    """Curves, the checkpoint as artifacts, the registered version, FINISHED; also `d2v register`'s work."""
    c, out = tracking.client(), {}
    tracking.log_curves(c, run_id, d, _draw_curves)
    c.log_artifacts(run_id, str(d), "checkpoint")  # the full training checkpoint, for resume/inspection
    if register:  # an MLflow Model (pyfunc) of the student; the same weights again -> the same version
        tags = {"modality": modality, "preset": cfg.preset, "version": cfg.version, "run_name": run_name,
                "data_fingerprint": fingerprint, "step": str(metrics.get("step", ""))}
        name, version = tracking.register_checkpoint(run_id, "checkpoint", modality, tags, local_dir=d)
        out.update(model=f"models:/{name}@candidate", version=version)
    c.set_terminated(run_id, status="FINISHED")
    return out


def _checkpoint_uri(ckpt) -> str:
    """Ray gives a path inside its pyarrow filesystem ("bucket/runs/..."): put the scheme back for object stores."""
    kind = getattr(getattr(ckpt, "filesystem", None), "type_name", "local")
    return ckpt.path if kind == "local" else f"{kind}://{ckpt.path}"


def _draw_curves(plt, history: list[dict]):
    """Loss and target/prediction std curves over the training history."""
    steps = [h["step"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(steps, [h["loss"] for h in history])
    a.set(title="loss", xlabel="step")
    b.plot(steps, [h["target_std"] for h in history], label="target")
    b.plot(steps, [h["pred_std"] for h in history], label="prediction")
    b.set(title="mean per-dim std (collapse guard)", xlabel="step")
    b.legend()
    fig.tight_layout()
    return fig


def print_summary(out: dict, data: str | Path | None = None) -> None:
    """The JSON result on stdout; on stderr a short account of what was written where."""
    print(json.dumps(out, default=str))
    uri = tracking.tracking_uri()
    run_url = _mlflow_run_url(uri, out.get("run_id"))
    lines = [f"d2v pretrain: done: run {out.get('run_name')} reached step {out.get('step', '?')}"
             + (f", loss {out['loss']:.4f}" if isinstance(out.get("loss"), float) else "")]
    if data is not None:
        lines.append(f"  data        {display(data)}")
    lines += [f"  checkpoint  {out['checkpoint']}",
              f"  model       {out.get('model', '(not registered)')} (version {out.get('version', '-')})",
              f"  MLflow      {run_url}",
              f"  log         {out.get('log', '(console)')}"]
    print("\n".join(lines), file=sys.stderr, flush=True)


def _mlflow_run_url(uri: str, run_id: str | None) -> str:
    """The run's page: on the tracking server, or on `make mlflow-ui` (port 5000) for the local sqlite store."""
    try:
        exp = tracking.client().get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # noqa: BLE001 -- the summary must not fail a finished run
        exp = None
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"{base}/#/experiments/{exp}/runs/{run_id}" if exp else base
    return page if base == uri.rstrip("/") else f"{page}  (start the UI with `make mlflow-ui`; store {uri})"
