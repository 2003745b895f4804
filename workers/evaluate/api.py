"""`evaluate()`: resolve MODEL, score it beside its two yardsticks, record the result, optionally promote."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.checkpoint import TOKENIZER_FILE, load_config, load_encoder
from model.config import Config
from model.encoder import Encoder

from .. import tracking
from ..registry import resolve_model
from .baselines import BASELINE_SEED, RAW, random_encoder, raw_accuracy
from .common import EvaluationError, log
from .data import Split, default_data, load_split
from .features import POOLING
from .finetune import FinetuneConfig, finetune_accuracy, finetune_preset
from .probe import PROBE, linear_probe
from .record import log_run, promote_version, tag_version
from .resolve import ModelRef, resolve_ref

TASKS = ("linear-probe", "finetune")


@dataclass(frozen=True)
class Opts:
    task: str
    finetune: FinetuneConfig
    batch_size: int
    device: torch.device


def evaluate(
    model: str,
    data: str | Path | None = None,
    task: str = "linear-probe",
    promote: bool = False,
    finetune: FinetuneConfig | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """Score MODEL on the labelled split `data` (default: the demo corpus of its modality), log an MLflow
    run, tag the registered version, optionally promote it; returns the result dict the CLI prints.
    `finetune` defaults to the modality's recipe (finetune.FINETUNE_PRESETS); `epochs` overrides its epochs."""
    if task not in TASKS:
        raise EvaluationError(f"--task {task!r}: expected one of {list(TASKS)}")
    tracking.check_reachable()  # fail before any compute if results could not be recorded
    ref = resolve_ref(str(model))
    if promote and ref.version is None:
        raise EvaluationError(
            f"--promote: {ref.given} is not a registered model version, so there is no alias to move; "
            "evaluate models:/<name>@<alias> or models:/<name>/<version> instead"
        )
    ckpt = resolve_model(ref.uri)
    modality = load_config(ckpt).model.modality
    split = load_split(Path(data) if data is not None else default_data(modality), modality)
    ft = finetune_preset(modality) if finetune is None else finetune
    ft = ft if epochs is None else replace(ft, epochs=epochs)
    opts = Opts(task, ft, batch_size, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    raw = raw_accuracy(split)
    result = score_and_record(ref, ckpt, split, opts, raw)
    result.update(promoted=False, promotion_reason=None)
    if promote:
        def rescore(champ: ModelRef) -> float:
            return score_and_record(champ, resolve_model(champ.uri), split, opts, raw)["accuracy"]

        result["promoted"], result["promotion_reason"] = promote_version(ref, result, rescore)
    return result


def score_and_record(ref: ModelRef, ckpt: Path, split: Split, opts: Opts, raw: float) -> dict:
    """Score the checkpoint and a random-init twin; log the eval run; tag the version (if registered)."""
    cfg, enc = load_encoder(ckpt, which="student", map_location="cpu")
    if cfg.model.modality != split.modality:
        raise EvaluationError(f"{ckpt}: a {cfg.model.modality} model cannot be scored on {split.modality} data")
    tok = ckpt / TOKENIZER_FILE if (ckpt / TOKENIZER_FILE).is_file() else None
    log(f"evaluate: {opts.task} of {ref.uri} on {split.root} ({len(split.train)} train / {len(split.test)} test, "
        f"{len(split.classes)} classes, {opts.device})")
    acc = score(enc, cfg, split, tok, opts, "model")
    base = score(random_encoder(cfg), cfg, split, tok, opts, "baseline")
    result = {
        "accuracy": acc, "baseline_accuracy": base, "raw_accuracy": raw, "task": opts.task, "model": ref.given,
        "version": ref.version, "modality": split.modality, "num_train": len(split.train),
        "num_test": len(split.test), "classes": split.classes, "pooling": POOLING[split.modality],
        "data": str(split.root), "data_fingerprint": split.fingerprint,
    }
    result["eval_run_id"] = log_run(ref, result, run_params(opts, split.modality))
    if ref.version is not None:
        tag_version(ref, result)
    log(f"evaluate: {ref.uri}: accuracy {acc:.4f} (random-init baseline {base:.4f}, raw input {raw:.4f})")
    return result


def run_params(opts: Opts, modality: str) -> dict:
    params = {"baseline_seed": BASELINE_SEED, "raw_input": RAW[modality].describe}
    if opts.task == "finetune":
        return {**params, **{f"finetune.{k}": v for k, v in vars(opts.finetune).items()}}
    return {**params, "probe": PROBE}


def score(enc: Encoder, cfg: Config, split: Split, tokenizer: Path | None, opts: Opts, what: str) -> float:
    enc = enc.to(opts.device)
    if opts.task == "linear-probe":
        return linear_probe(enc, cfg, split, tokenizer, opts.batch_size, opts.device, what)
    return finetune_accuracy(enc, cfg, split, tokenizer, opts.finetune, opts.device, what)
