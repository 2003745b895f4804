"""Labelled splits and model inputs.

Data: `LABELLED/{train,test}/<class>/<file>` (label = index of the directory name in sorted order), as
`d2v demo-data` writes it. Files are decoded exactly as `d2v embed` decodes them (eval-mode transforms);
`.npy` model-ready arrays work too. `data_fingerprint` = sha256 of the sorted `relative/path<TAB>size` lines.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from model.config import Config
from model.frontends import audio_frames

from .. import tracking
from ..embed import AUDIO_EXT, IMAGE_EXT, InputError, model_input
from .common import EvaluationError, log

SPLITS = ("train", "test")
EXTENSIONS = {"vision": IMAGE_EXT, "audio": AUDIO_EXT, "text": {".txt", ".json"}}  # + .npy for every modality
# Padded batches give exactly the features of single inputs for vision (no padding) and text (attention and
# pooling skip pad tokens). Not for audio: the stacked positional convs read padded frames (as in fairseq and
# transformers), so audio inputs are only batched with inputs of the same length.
PAD_IS_EXACT = {"vision": True, "audio": False, "text": True}

Items = list[tuple[Path, int]]  # (file, label)


@dataclass(frozen=True)
class Split:
    root: Path
    modality: str
    classes: list[str]  # sorted class names; label = index
    train: Items
    test: Items
    fingerprint: str  # sha256 of sorted "relpath\tsize" lines


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


# ------------------------------------------------------------------------------------------- inputs
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


@dataclass
class Group:
    """Inputs that go through the encoder in one forward pass."""

    index: list[int]  # positions of these examples in the item list
    x: torch.Tensor  # (B, 3, H, W) pixels, (B, S) waves or (B, S) ids
    pad: torch.Tensor | None  # (B, S) True = padded, or None
    y: torch.Tensor  # (B,) labels


def batches(items: Items, cfg: Config, tokenizer: Path | None, batch_size: int, device: torch.device,
            order: np.ndarray | None = None, cache: dict[int, torch.Tensor] | None = None) -> Iterator[list[Group]]:
    """Decode `items` batch_size at a time (in `order`, default as listed) -> the forward groups of each batch:
    one right-padded group, or for modalities where padding is not exact one group per input length.
    With `cache`, each file is decoded once and its tensor kept there (fine-tuning reads every file each epoch)."""
    idx = np.arange(len(items)) if order is None else order
    for i in range(0, len(idx), batch_size):
        chunk = [int(j) for j in idx[i : i + batch_size]]
        xs = {j: _read_cached(items, j, cfg, tokenizer, cache) for j in chunk}
        parts: dict[object, list[int]] = {}
        for j in chunk:
            parts.setdefault(None if PAD_IS_EXACT[cfg.model.modality] else tuple(xs[j].shape), []).append(j)
        groups = []
        for part in parts.values():
            x, pad = collate([xs[j] for j in part], [items[j][0] for j in part], cfg)
            y = torch.tensor([items[j][1] for j in part])
            groups.append(Group(part, x.to(device), None if pad is None else pad.to(device), y.to(device)))
        yield groups


def _read_cached(items: Items, j: int, cfg: Config, tokenizer: Path | None,
                 cache: dict[int, torch.Tensor] | None) -> torch.Tensor:
    if cache is None:
        return read_input(items[j][0], cfg, tokenizer)
    if j not in cache:
        cache[j] = read_input(items[j][0], cfg, tokenizer)
    return cache[j]
