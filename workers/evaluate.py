"""`d2v evaluate`: score an encoder on a labelled split, record the result in MLflow, optionally promote it.

MODEL is a checkpoint directory, `runs:/…`, `models:/name@alias`, `models:/name/N` or `models:/name/latest`.
A models:/ reference is pinned to its version first (`models:/name/N`), so the result is attached to
exactly the version that was scored even if the alias moves meanwhile. Weights are read from safetensors.

Data: `LABELLED/{train,test}/<class>/<file>` (label = directory name), as `d2v demo-data` writes it.
Files are decoded exactly as `d2v embed` decodes them (eval-mode transforms); `.npy` model-ready arrays work too.

Pooling (one rule for every modality): the mean of the final-layer hidden states (`EncoderOutput.last`)
over the non-padded positions after the front end's prefix. Vision: the mean over the patch tokens (CLS
excluded); audio: the mean over the non-padded frames; text: the mean over the tokens, <s> and </s>
included, pad tokens excluded. Padded positions never count, and a batch gives the same features as one
input at a time (audio is batched by equal length: see PAD_IS_EXACT).

Tasks (both report test accuracy; `baseline_accuracy` is the same procedure on a randomly initialised
encoder of the same config, `torch.manual_seed(0); Encoder(cfg.model)`):
- linear-probe: frozen encoder -> pooled features -> StandardScaler + LogisticRegression fitted on train.
- finetune: encoder + a linear head on the pooled features, trained with AdamW (`FinetuneConfig`).

MLflow: one run per scored model in experiment `d2v-eval-<modality>` (tags model.name / model.version /
model.source_run_id / model.uri; params task, data, pooling, ...; metrics accuracy, baseline_accuracy).
A registered version also gets the tags `eval.<task>.{accuracy,baseline_accuracy,data_fingerprint,run_id}`.
`data_fingerprint` = sha256 of the sorted `relative/path<TAB>size` lines of the labelled split.

Promotion (`promote=True`, registered versions only): alias `champion` moves to this version iff its
accuracy is strictly greater than the champion's on the same task and data (the champion's
`eval.<task>.accuracy` tag where its `eval.<task>.data_fingerprint` equals ours; a champion without such
a result is evaluated now, the same way, and tagged). No champion yet -> promote. The reason is recorded
either way as `eval.<task>.promotion` on the version and the eval run, and returned.
"""

from __future__ import annotations

import hashlib
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, get_args

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.checkpoint import TOKENIZER_FILE, load_config, load_encoder
from model.config import Config
from model.encoder import Encoder, EncoderOutput
from model.frontends import audio_frames

from . import tracking
from .embed import AUDIO_EXT, IMAGE_EXT, InputError, model_input
from .registry import resolve_model

Task = Literal["linear-probe", "finetune"]
TASKS: tuple[str, ...] = get_args(Task)
CHAMPION = "champion"
SPLITS = ("train", "test")
EXTENSIONS = {"vision": IMAGE_EXT, "audio": AUDIO_EXT, "text": {".txt", ".json"}}  # + .npy for every modality
POOLING = {
    "vision": "mean of final-layer hidden states over patch tokens (CLS excluded)",
    "audio": "mean of final-layer hidden states over non-padded frames",
    "text": "mean of final-layer hidden states over tokens incl. <s> </s> (pad excluded)",
}
# Padded batches give exactly the features of single inputs for vision (no padding) and text (attention and
# pooling skip pad tokens). Not for audio: the stacked positional convs read padded frames (as in fairseq and
# transformers), so audio inputs are only batched with inputs of the same length.
PAD_IS_EXACT = {"vision": True, "audio": False, "text": True}
BASELINE_SEED = 0
PROGRESS_EVERY_S = 5.0


class EvaluationError(ValueError):
    """A model reference, labelled split or promotion request that cannot be evaluated; says what to do."""


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 5  # passes over the train split
    lr_encoder: float = 1e-4  # AdamW learning rate of the pretrained encoder
    lr_head: float = 1e-3  # AdamW learning rate of the freshly initialised linear head
    weight_decay: float = 0.01  # AdamW weight decay (both groups)
    batch_size: int = 32  # examples per step
    seed: int = 0  # head init, dropout and shuffling

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise EvaluationError(f"finetune: epochs={self.epochs} and batch_size={self.batch_size} must be >= 1")


@dataclass(frozen=True)
class ModelRef:
    given: str  # MODEL as the user wrote it
    uri: str  # what is loaded: models:/name/N when registered (pinned), else `given`
    name: str | None = None  # registered model name, if any
    version: str | None = None  # registered model version, if any
    source_run_id: str | None = None  # the run that produced the checkpoint, if known


@dataclass(frozen=True)
class Split:
    root: Path
    modality: str
    classes: list[str]  # sorted class names; label = index
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]
    fingerprint: str  # sha256 of sorted "relpath\tsize" lines


# ------------------------------------------------------------------------------------------------ api
def evaluate(
    model: str,
    data: str | Path | None = None,
    task: str = "linear-probe",
    promote: bool = False,
    finetune: FinetuneConfig = FinetuneConfig(),
    batch_size: int = 64,
    device: str | None = None,
) -> dict:
    """Score MODEL on the labelled split `data` (default: the demo corpus of its modality), log an MLflow
    run, tag the registered version, optionally promote it; returns the result dict the CLI prints."""
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
    opts = _Opts(task, finetune, batch_size, torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    result = score_and_record(ref, ckpt, split, opts)
    result.update(promoted=False, promotion_reason=None)
    if promote:
        result["promoted"], result["promotion_reason"] = promote_version(ref, result, split, opts)
    return result


@dataclass(frozen=True)
class _Opts:
    task: str
    finetune: FinetuneConfig
    batch_size: int
    device: torch.device


def score_and_record(ref: ModelRef, ckpt: Path, split: Split, opts: _Opts) -> dict:
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
        "accuracy": acc, "baseline_accuracy": base, "task": opts.task, "model": ref.given, "version": ref.version,
        "modality": split.modality, "num_train": len(split.train), "num_test": len(split.test),
        "classes": split.classes, "pooling": POOLING[split.modality], "data": str(split.root),
        "data_fingerprint": split.fingerprint,
    }
    result["eval_run_id"] = log_run(ref, result, opts)
    if ref.version is not None:
        c = tracking.client()
        for key, value in (("accuracy", repr(acc)), ("baseline_accuracy", repr(base)),
                           ("data_fingerprint", split.fingerprint), ("run_id", result["eval_run_id"])):
            c.set_model_version_tag(ref.name, ref.version, f"eval.{opts.task}.{key}", value)
    log(f"evaluate: {ref.uri}: accuracy {acc:.4f} (random-init baseline {base:.4f})")
    return result


def score(enc: Encoder, cfg: Config, split: Split, tokenizer: Path | None, opts: _Opts, what: str) -> float:
    enc = enc.to(opts.device)
    if opts.task == "linear-probe":
        return linear_probe(enc, cfg, split, tokenizer, opts.batch_size, opts.device, what)
    return finetune_accuracy(enc, cfg, split, tokenizer, opts.finetune, opts.device, what)


def random_encoder(cfg: Config) -> Encoder:
    """The baseline: a freshly initialised encoder of the same config, seeded (same weights every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASELINE_SEED)
        return Encoder(cfg.model).eval()


# ------------------------------------------------------------------------------------ model reference
def resolve_ref(model: str) -> ModelRef:
    """models:/name@alias | models:/name/N | models:/name/latest -> the pinned version; else as given."""
    if model.startswith("runs:/"):
        run_id = model.removeprefix("runs:/").split("/", 1)[0]
        return ModelRef(model, model, source_run_id=run_id or None)
    if not model.startswith("models:/"):
        return ModelRef(model, model)
    body = model.removeprefix("models:/").strip("/")
    name, alias, number = body, None, None
    if "@" in body:
        name, alias = body.split("@", 1)
    elif "/" in body:
        name, number = body.rsplit("/", 1)
    if not name or not (alias or number):
        raise EvaluationError(f"{model}: expected models:/<name>@<alias> or models:/<name>/<version>")
    c = tracking.client()
    rm = _registered_model(c, name, model)
    if alias is not None:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            have = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise EvaluationError(
                f"{model}: registered model {name!r} has no alias {alias!r} (existing aliases: {have}); "
                f"use one of them or models:/{name}/<version>"
            )
        version = str(aliases[alias])
    else:
        version = _version_number(c, name, number, model)
    mv = c.get_model_version(name, version)
    return ModelRef(model, f"models:/{name}/{version}", name, version, mv.run_id or None)


def _registered_model(c, name: str, model: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in c.search_registered_models(max_results=100))
    raise EvaluationError(
        f"{model}: no registered model named {name!r} at {tracking.tracking_uri()} "
        f"(registered: {', '.join(names) or 'none'}); register one with `d2v pretrain` or check MLFLOW_TRACKING_URI"
    )


def _version_number(c, name: str, number: str, model: str) -> str:
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
    if number == "latest" and versions:
        return str(versions[-1])
    if number.isdigit() and int(number) in versions:
        return str(int(number))
    raise EvaluationError(f"{model}: {name!r} has no version {number!r} (versions: {versions or 'none'})")


# ------------------------------------------------------------------------------------------- the data
def default_data(modality: str) -> Path:
    """<repo>/data/demo-<modality>/labelled, built (full size, seed 0) if it is not there yet."""
    from pipelines.demo import build_demo, read_done

    out = tracking.REPO_ROOT / "data" / f"demo-{modality}"
    if read_done(out) is None or not (out / "labelled").is_dir():
        log(f"evaluate: no --data given and no demo corpus at {out}; building it")
        build_demo(modality, out, skip_existing=True)
    return out / "labelled"


def load_split(root: Path, modality: str) -> Split:
    """Check and list `root/{train,test}/<class>/<file>`; errors name the directory or file at fault."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise EvaluationError(f"--data {root}: no such directory; expected {root}/{{train,test}}/<class>/<file>")
    files = {s: _list_split(root / s, modality) for s in SPLITS}
    classes = sorted({c for c, _ in files["train"]})
    unseen = sorted({c for c, _ in files["test"]} - set(classes))
    if unseen:
        raise EvaluationError(f"{root / 'test' / unseen[0]}: class {unseen[0]!r} has no examples in {root / 'train'}")
    label = {c: i for i, c in enumerate(classes)}
    train, test = ([(p, label[c]) for c, p in files[s]] for s in SPLITS)
    return Split(root, modality, classes, train, test, fingerprint(root, [p for p, _ in train + test]))


def _list_split(split: Path, modality: str) -> list[tuple[str, Path]]:
    if not split.is_dir():
        raise EvaluationError(f"{split}: missing; a labelled split needs {split.name}/<class>/<file>")
    allowed = EXTENSIONS[modality] | {".npy"}
    out: list[tuple[str, Path]] = []
    for cls in sorted(d for d in split.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for f in sorted(p for p in cls.iterdir() if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() not in allowed:
                raise EvaluationError(
                    f"{f}: a {f.suffix or 'suffix-less'} file does not fit a {modality} model "
                    f"(expected {', '.join(sorted(allowed))}); point --data at a {modality} labelled split"
                )
            out.append((cls.name, f))
    if not out:
        raise EvaluationError(f"{split}: empty split (no files in {split}/<class>/)")
    n = len({c for c, _ in out})
    if n < 2:
        raise EvaluationError(f"{split}: only {n} class with files; classification needs at least 2 class directories")
    return out


def fingerprint(root: Path, files: list[Path]) -> str:
    """sha256 of the sorted `relative/posix/path<TAB>size` lines: same files and sizes -> same data."""
    lines = sorted(f"{p.relative_to(root).as_posix()}\t{p.stat().st_size}\n" for p in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --------------------------------------------------------------------------------- inputs and pooling
def read_input(path: Path, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    """One file -> one model-ready input without batch dim: (3, H, W) pixels, (S,) wave or (T,) ids."""
    x = model_input(path, cfg, tokenizer)[0]
    f, m = cfg.model.frontend, cfg.model.modality
    if m == "vision" and tuple(x.shape[-2:]) != (f.image_size, f.image_size):
        raise InputError(f"{path}: {tuple(x.shape)} pixels; the model takes (3, {f.image_size}, {f.image_size})")
    if m == "audio" and audio_frames(len(x), f.conv_layers) < 1:
        raise InputError(f"{path}: {len(x)} samples is shorter than one frame of the model's feature extractor")
    if m == "text" and not 0 < len(x) <= f.max_positions - f.pad_id - 1:
        raise InputError(f"{path}: {len(x)} tokens; the model takes 1 to {f.max_positions - f.pad_id - 1}")
    if m == "text" and (x.min() < 0 or x.max() >= f.vocab_size):
        raise InputError(f"{path}: token ids must lie in [0, {f.vocab_size})")
    return x


def collate(xs: list[torch.Tensor], paths: list[Path], cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs -> (batch, padding mask (B, S) True = padded, or None). Sequences are right-padded with
    zeros (audio) or the pad id (text); images must all have the model's size."""
    if xs[0].ndim == 3:  # images (3, H, W)
        for x, p in zip(xs, paths):
            if x.shape != xs[0].shape:
                raise InputError(f"{p}: image tensor {tuple(x.shape)} differs from {tuple(xs[0].shape)} in its batch")
        return torch.stack(xs), None  # (B, 3, H, W)
    fill = cfg.model.frontend.pad_id if cfg.model.modality == "text" else 0
    n = max(len(x) for x in xs)
    batch = xs[0].new_full((len(xs), n), fill)  # (B, S)
    pad = torch.ones(len(xs), n, dtype=torch.bool)
    for i, x in enumerate(xs):
        batch[i, : len(x)] = x
        pad[i, : len(x)] = False
    return batch, (pad if pad.any() else None)


def pool(out: EncoderOutput) -> torch.Tensor:
    """(B, P+T, D) final hidden states -> (B, D): the mean over non-padded positions after the prefix."""
    x = out.last[:, out.prefix_len :]  # (B, T, D)
    if out.padding_mask is None:
        return x.mean(1)
    keep = (~out.padding_mask[:, out.prefix_len :]).to(x.dtype)[..., None]  # (B, T, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


@dataclass
class Group:
    """Inputs that go through the encoder in one forward pass."""

    index: list[int]  # positions of these examples in the item list
    x: torch.Tensor  # (B, 3, H, W) pixels, (B, S) waves or (B, S) ids
    pad: torch.Tensor | None  # (B, S) True = padded, or None
    y: torch.Tensor  # (B,) labels


def batches(items: list[tuple[Path, int]], cfg: Config, tokenizer: Path | None, batch_size: int, device: torch.device,
            order: np.ndarray | None = None) -> Iterator[list[Group]]:
    """Decode `items` batch_size at a time (in `order`, default as listed) -> the forward groups of each batch:
    one right-padded group, or for modalities where padding is not exact one group per input length."""
    idx = np.arange(len(items)) if order is None else order
    for i in range(0, len(idx), batch_size):
        chunk = [int(j) for j in idx[i : i + batch_size]]
        xs = {j: read_input(items[j][0], cfg, tokenizer) for j in chunk}
        parts: dict[object, list[int]] = {}
        for j in chunk:
            parts.setdefault(None if PAD_IS_EXACT[cfg.model.modality] else tuple(xs[j].shape), []).append(j)
        groups = []
        for part in parts.values():
            x, pad = collate([xs[j] for j in part], [items[j][0] for j in part], cfg)
            y = torch.tensor([items[j][1] for j in part])
            groups.append(Group(part, x.to(device), None if pad is None else pad.to(device), y.to(device)))
        yield groups


@torch.no_grad()
def features(enc: Encoder, cfg: Config, items: list[tuple[Path, int]], tokenizer: Path | None, batch_size: int,
             device: torch.device, what: str = "features") -> np.ndarray:
    """Pooled final-layer features of every item, in order: (N, D) float32."""
    enc.eval()
    out = np.zeros((len(items), cfg.model.trunk.dim), dtype=np.float32)
    progress = Progress(what, len(items))
    for groups in batches(items, cfg, tokenizer, batch_size, device):
        for g in groups:
            out[g.index] = pool(enc(g.x, g.pad)).float().cpu().numpy()  # (B, D)
        progress.update(sum(len(g.index) for g in groups))
    progress.close()
    return out


# -------------------------------------------------------------------------------------------- the tasks
def linear_probe(enc: Encoder, cfg: Config, split: Split, tokenizer: Path | None, batch_size: int,
                 device: torch.device, what: str = "model") -> float:
    """Frozen pooled features -> StandardScaler + LogisticRegression on train -> accuracy on test."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = features(enc, cfg, split.train, tokenizer, batch_size, device, f"{what} features train")
    x_test = features(enc, cfg, split.test, tokenizer, batch_size, device, f"{what} features test")
    y_train, y_test = (np.array([y for _, y in items]) for items in (split.train, split.test))
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(x_train, y_train)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log(f"evaluate: {what}: the logistic regression did not converge in 2000 iterations")
    return float(probe.score(x_test, y_test))


def finetune_accuracy(enc: Encoder, cfg: Config, split: Split, tokenizer: Path | None, ft: FinetuneConfig,
                      device: torch.device, what: str = "model") -> float:
    """Encoder + linear head on pooled features, trained on train (AdamW, cross-entropy) -> test accuracy."""
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # seeded run that leaves the caller's RNG state alone
        torch.manual_seed(ft.seed)
        head = nn.Linear(cfg.model.trunk.dim, len(split.classes)).to(device)
        opt = torch.optim.AdamW(
            [{"params": enc.parameters(), "lr": ft.lr_encoder}, {"params": head.parameters(), "lr": ft.lr_head}],
            weight_decay=ft.weight_decay,
        )
        rng = np.random.default_rng(ft.seed)
        progress = Progress(f"{what} finetune steps", ft.epochs * -(-len(split.train) // ft.batch_size))
        enc.train()
        for _ in range(ft.epochs):
            order = rng.permutation(len(split.train))
            for groups in batches(split.train, cfg, tokenizer, ft.batch_size, device, order):
                opt.zero_grad(set_to_none=True)
                n = sum(len(g.index) for g in groups)
                loss = 0.0
                for g in groups:  # one optimizer step per batch, whatever its forward groups
                    part = F.cross_entropy(head(pool(enc(g.x, g.pad))), g.y, reduction="sum") / n  # (B, C) logits
                    part.backward()
                    loss += part.item()
                opt.step()
                progress.update(1, f"loss {loss:.3f}")
        progress.close()
    enc.eval()
    correct = 0
    with torch.no_grad():
        for groups in batches(split.test, cfg, tokenizer, ft.batch_size, device):
            correct += sum(int((head(pool(enc(g.x, g.pad))).argmax(-1) == g.y).sum()) for g in groups)
    return correct / len(split.test)


# ------------------------------------------------------------------------------------ MLflow records
def log_run(ref: ModelRef, result: dict, opts: _Opts) -> str:
    """A finished run in experiment d2v-eval-<modality>, linked to the model by tags; returns its id."""
    from mlflow.entities import Metric, Param, RunTag

    c = tracking.client()
    exp = tracking.experiment_id(f"d2v-eval-{result['modality']}")
    label = f"{ref.name} v{ref.version}" if ref.version else Path(ref.given.rstrip("/")).name
    tags = {"mlflow.runName": f"{opts.task} {label}", "model.uri": ref.given, "eval.task": opts.task,
            "git_commit": tracking.git_commit()}
    if ref.version is not None:
        tags.update({"model.name": ref.name, "model.version": ref.version})
    if ref.source_run_id:
        tags["model.source_run_id"] = ref.source_run_id
    params = {"task": opts.task, "data": result["data"], "pooling": result["pooling"],
              "data_fingerprint": result["data_fingerprint"], "num_train": result["num_train"],
              "num_test": result["num_test"], "num_classes": len(result["classes"]), "baseline_seed": BASELINE_SEED}
    if opts.task == "finetune":
        params.update({f"finetune.{k}": v for k, v in vars(opts.finetune).items()})
    else:
        params.update({"probe": "StandardScaler + LogisticRegression(max_iter=2000, random_state=0)"})
    run = c.create_run(exp, run_name=tags["mlflow.runName"], tags=tags)
    ts = int(time.time() * 1000)
    c.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(result[k]), ts, 0) for k in ("accuracy", "baseline_accuracy")],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag("eval.classes", ",".join(result["classes"])[:5000])],
    )
    c.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def promote_version(ref: ModelRef, result: dict, split: Split, opts: _Opts) -> tuple[bool, str]:
    """Move alias `champion` to ref's version iff it strictly beats the champion on this task and data."""
    c = tracking.client()
    acc = result["accuracy"]
    champ = dict(c.get_registered_model(ref.name).aliases or {}).get(CHAMPION)
    if champ is None:
        promoted, reason = True, f"promoted: no champion yet (v{ref.version} {acc:.4f})"
    elif str(champ) == ref.version:
        promoted, reason = False, f"unchanged: v{ref.version} is already the champion ({acc:.4f})"
    else:
        champ = str(champ)
        champ_acc = champion_accuracy(ref.name, champ, split, opts)
        promoted = acc > champ_acc
        sign = ">" if promoted else "<="
        reason = f"{'promoted' if promoted else 'not promoted'}: {acc:.4f} {sign} champion v{champ} {champ_acc:.4f}"
    if promoted:
        c.set_registered_model_alias(ref.name, CHAMPION, ref.version)
    key = f"eval.{opts.task}.promotion"
    c.set_model_version_tag(ref.name, ref.version, key, reason)
    c.set_tag(result["eval_run_id"], key, reason)
    log(f"evaluate: {ref.name}: {reason}")
    return promoted, reason


def champion_accuracy(name: str, version: str, split: Split, opts: _Opts) -> float:
    """The champion's recorded accuracy on this task and data; evaluated (and tagged) now if it has none."""
    mv = tracking.client().get_model_version(name, version)
    tags = dict(mv.tags or {})
    key = f"eval.{opts.task}."
    if tags.get(key + "data_fingerprint") == split.fingerprint and key + "accuracy" in tags:
        return float(tags[key + "accuracy"])
    log(f"evaluate: champion {name} v{version} has no {opts.task} result on this data; evaluating it now")
    ref = ModelRef(f"models:/{name}/{version}", f"models:/{name}/{version}", name, version, mv.run_id or None)
    return score_and_record(ref, resolve_model(ref.uri), split, opts)["accuracy"]


# ------------------------------------------------------------------------------------------- progress
def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the CLI's JSON line)."""
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A line every PROGRESS_EVERY_S seconds while a phase runs, and a closing line if it ran that long."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log(f"evaluate: {self.what} {self.done}/{self.total} ({rate:.1f}/s){' ' + note if note else ''}")

    def close(self) -> None:
        if self.last != self.t0:
            log(f"evaluate: {self.what} {self.done}/{self.total} done in {time.monotonic() - self.t0:.1f}s")
