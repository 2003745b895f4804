"""`d2v finetune MODEL --task T`: the driver. Everything that can be wrong (model reference, recipe `--set`,
labelled data) fails before any cluster time; then a Ray Train job (TorchTrainer over `worker_entry`, DDP,
checkpoints every few epochs, resume by run name, failure recovery) runs workers/finetune/loop.fit; the result
is logged to MLflow (experiment `d2v-finetune-<modality>`: params, per-epoch curves, test metrics, the
fine-tuned checkpoint) and registered as `data2vec-<modality>-<task>` (register.py).

    resolve MODEL -> recipe + --set -> load data -> MLflow run -> ray.init -> fit [-> baseline fit] -> register
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from model.checkpoint import TOKENIZER_FILE, load_config
from model.config import Config, ConfigError

from .. import tracking
from ..console import PROGRESS_MARK, RunConsole
from ..resume import ResumeConflict
from ..tracking import REPO_ROOT
from . import FinetuneError, Recipe, Task
from .tasks import get_task

BASELINE_SUFFIX = "-baseline"


@dataclasses.dataclass
class Prepared:
    """What the driver checked before any cluster time."""

    task: Task
    ref: Any  # evaluate.resolve.ModelRef
    ckpt: Path
    cfg: Config
    recipe: Recipe
    data: Path
    train: list
    test: list
    fingerprint: str


# ------------------------------------------------------------------------------------------ checks
def apply_recipe_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """`--set key=value` (YAML values) on the recipe's fields; unknown keys and bad values name themselves."""
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)} (the fine-tuning "
                              "recipe; the encoder's own config is the checkpoint's)")
        value = yaml.safe_load(raw)
        want = type(getattr(recipe, key))
        if want is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                value = float(raw)
            except ValueError:
                pass
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is tuple and isinstance(value, list):
            value = tuple(float(v) for v in value)
        if not isinstance(value, want) or isinstance(value, bool) != (want is bool):
            raise ConfigError(f"--set {item!r}: {key} must be a {want.__name__}, got {raw!r}")
        changes[key] = value
    if "epochs" in changes and "updates" not in changes:  # an explicit epoch count replaces an updates budget
        changes["updates"] = 0
    try:
        return dataclasses.replace(recipe, **changes)
    except FinetuneError as err:
        raise ConfigError(f"--set: {err}") from None


def data_fingerprint(root: Path) -> str:
    """sha256 of the sorted `relative/path<TAB>size` lines of every file under the labelled data."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))
    lines = "".join(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def prepare(model: str, task_name: str, data: str | Path | None, overrides: list[str]) -> Prepared:
    from ..evaluate.resolve import resolve_ref
    from ..registry import resolve_model

    task = get_task(task_name)
    if str(model).startswith(("models:/", "runs:/")):
        tracking.check_reachable()  # needed to resolve MODEL; a clear error naming the URI
    ref = resolve_ref(str(model))
    ckpt = resolve_model(ref.uri)
    cfg = load_config(ckpt)
    modality = cfg.model.modality
    recipe = apply_recipe_overrides(task.recipe(modality), overrides)
    root = Path(data) if data is not None else task.demo_data(modality, REPO_ROOT / "data")
    if not root.exists():
        raise FinetuneError(f"--data {root}: no such directory")
    tok = ckpt / TOKENIZER_FILE if (ckpt / TOKENIZER_FILE).is_file() else None
    train, test = task.load(root, cfg, tok)
    tracking.check_reachable()  # results must be recordable before any cluster time
    return Prepared(task, ref, ckpt, cfg, recipe, root.resolve(), train, test, data_fingerprint(root))


# ------------------------------------------------------------------------------------------- worker
def worker_entry(config: dict) -> None:
    """Runs in every Ray Train worker: build encoder + head, then loop.fit under Ray's hooks."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from model.encoder import Encoder

    from ..evaluate.baselines import random_encoder
    from ..pretrain import _RankZeroLogger
    from ..train import Hooks
    from .loop import fit

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    cfg = Config.from_yaml(config["cfg"])
    recipe = Recipe(**{**config["recipe"], "betas": tuple(config["recipe"]["betas"])})
    task = get_task(config["task"])
    if hasattr(task, "with_recipe"):  # task-held recipes (classify) take the --set values too
        task = task.with_recipe(cfg.model.modality, recipe)
    train, test = ray.get(config["examples"])
    if config["encoder"] is None:
        encoder = random_encoder(cfg)  # --baseline: the same architecture from random init
    else:
        encoder = Encoder(cfg.model)
        encoder.load_state_dict(ray.get(config["encoder"]))
    torch.manual_seed(recipe.seed)
    head = task.build_head(cfg, train)
    logger = _RankZeroLogger(config) if rank == 0 else None

    def report(metrics: dict, ckpt_dir: str | None, name: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(ckpt_dir) if ckpt_dir else None
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def latest():
        c = ray.train.get_checkpoint()
        return c.as_directory() if c is not None else None

    def prepare_model(m):
        return ray.train.torch.prepare_model(m, parallel_strategy_kwargs={"find_unused_parameters": True}) \
            if world > 1 else m

    tag = f"{PROGRESS_MARK} {config['what']}:" if rank == 0 else f"[d2v rank {rank}] {config['what']}:"
    hooks = Hooks(rank=rank, world_size=world, device=ray.train.torch.get_device(), prepare_model=prepare_model,
                  report=report, latest_checkpoint=latest, log_metrics=logger.log if logger else None,
                  progress=lambda s: print(f"{tag} {s}", flush=True))
    try:
        fit(task, cfg, encoder, head, train, test, recipe, hooks, tokenizer=config["tokenizer"])
    finally:
        if logger is not None:
            logger.close()


# ------------------------------------------------------------------------------------------- driver
def finetune(model: str, task: str, data: str | Path | None = None, overrides: list[str] | None = None,
             workers: int = 1, gpus_per_worker: float = 0, baseline: bool = False, run_name: str | None = None,
             storage: str | Path | None = None, verbose: bool = False) -> dict:
    """Fine-tune MODEL on `task`, register the result; -> the result dict the CLI prints (test metrics first)."""
    from ..pretrain import _init_ray, _storage_path, run_log_path
    from .register import finish

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    p = prepare(model, task, data, list(overrides or []))
    modality = p.cfg.model.modality
    run_name = run_name or f"{modality}-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = _storage_path(storage)
    runs = {"model": start_run(p, run_name, workers, None)}
    if baseline:
        runs["baseline"] = start_run(p, run_name + BASELINE_SUFFIX, workers, runs["model"])

    import ray

    log_path = run_log_path(storage_path, run_name)
    with RunConsole(log_path, verbose, command="finetune") as console:
        started = _init_ray(workers)
        console.attach()
        print(f"d2v finetune: {task} of {p.ref.given} on {p.data} ({len(p.train)} train / {len(p.test)} test); "
              f"Ray's log: {log_path}", file=sys.stderr, flush=True)
        try:
            examples = ray.put((p.train, p.test))
            results = {}
            for what, run_id in runs.items():
                name = run_name if what == "model" else run_name + BASELINE_SUFFIX
                results[what] = _fit(p, what, run_id, name, examples, workers, gpus_per_worker, storage_path)
        finally:
            if started:
                ray.shutdown()
                os.environ.pop("RAY_ADDRESS", None)
        out = finish(p, results, runs, run_name)
    return {**out, "log": str(log_path)}


def start_run(p: Prepared, run_name: str, workers: int, parent_run: str | None) -> str:
    """The MLflow run of this fine-tune (an existing one of the same name is resumed if its recipe matches)."""
    from mlflow.entities import Param

    c = tracking.client()
    exp = tracking.experiment_id(f"d2v-finetune-{p.cfg.model.modality}")
    recipe = json.dumps(dataclasses.asdict(p.recipe), sort_keys=True)
    found = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{run_name}'", max_results=1)
    if found:
        old = found[0].data.tags.get("finetune.recipe")
        if old != recipe or found[0].data.tags.get("data_fingerprint") != p.fingerprint:
            raise ResumeConflict(f"run {run_name!r} exists with another recipe or data ({old}); resuming it would "
                                 "mix two experiments: use another --run-name")
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {"d2v.run_name": run_name, "mlflow.runName": run_name, "git_commit": tracking.git_commit(),
            "finetune.task": p.task.name, "finetune.recipe": recipe, "model.uri": p.ref.given,
            "data": str(p.data), "data_fingerprint": p.fingerprint, "modality": p.cfg.model.modality,
            "finetune.init": "random" if parent_run else "pretrained"}
    if p.ref.version is not None:
        tags.update({"model.name": p.ref.name, "model.version": p.ref.version})
    if parent_run:
        tags["finetune.baseline_of"] = parent_run
    run = c.create_run(exp, run_name=run_name, tags=tags)
    params = {**{f"recipe.{k}": v for k, v in dataclasses.asdict(p.recipe).items()}, "task": p.task.name,
              "num_train": len(p.train), "num_test": len(p.test), "data": str(p.data)}
    c.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    return run.info.run_id


def _fit(p: Prepared, what: str, run_id: str, run_name: str, examples, workers: int, gpus_per_worker: float,
         storage_path: str):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from model.checkpoint import load_encoder

    encoder = None
    if what == "model":
        _, enc = load_encoder(p.ckpt, which="student")
        encoder = ray.put(enc.state_dict())
    tok = p.ckpt / TOKENIZER_FILE
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={
            "cfg": p.cfg.to_yaml(), "recipe": dataclasses.asdict(p.recipe), "task": p.task.name, "what": what,
            "examples": examples, "encoder": encoder, "tokenizer": tok.read_bytes() if tok.is_file() else None,
            "run_id": run_id, "tracking_uri": tracking.tracking_uri(),
            "threads": max(1, (os.cpu_count() or 1) // workers) if gpus_per_worker == 0 else 4,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0,
            resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
        ),
        run_config=RunConfig(name=run_name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=p.cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    return trainer.fit()
