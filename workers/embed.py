"""`d2v embed`: final-layer hidden states [T, D] per input, as HF's `last_hidden_state` of the exported model.

Inputs are raw files (image, audio, .txt), preprocessed as in training (eval-mode transforms), a .json
list of token ids, or a .npy array that is already model-ready (float32 [3, H, W] pixels, float32 [T]
16 kHz waveform, int [T] token ids), used as is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from model.config import Config
from model.encoder import Encoder

from . import preprocess

IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3"}


class InputError(ValueError):
    """An input file that cannot be embedded, with the file and the reason."""


def model_input(path: Path, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    """One file -> a batch of one model-ready input; undecodable files raise InputError naming them."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return _model_input(path, cfg, tokenizer)
    except InputError:
        raise
    except Exception as err:  # decoders raise many types (PIL, soundfile, json, unicode, numpy)
        raise InputError(f"{path}: cannot be read as {cfg.model.modality} input ({type(err).__name__}: {err})") from None


def _model_input(path: Path, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    m, ext = cfg.model.modality, path.suffix.lower()
    if ext == ".npy":
        arr = np.load(path, allow_pickle=False)
        want = {"vision": 3, "audio": 1, "text": 1}[m]
        if arr.ndim != want:
            raise InputError(f"{path}: {m} .npy input must have {want} dims, got shape {arr.shape}")
        if m == "text":
            return torch.from_numpy(arr.astype(np.int64))[None]
        return torch.from_numpy(arr.astype(np.float32))[None]
    if m == "vision" and ext in IMAGE_EXT:
        return preprocess.eval_image(preprocess.open_image(path), cfg.model.frontend.image_size)[None]
    if m == "audio" and ext in AUDIO_EXT:
        wav = preprocess.load_audio(path)
        return torch.from_numpy(preprocess.normalize_wave(wav) if cfg.data.normalize else wav)[None]
    if m == "text" and ext == ".json":
        ids = json.loads(path.read_text())
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise InputError(f"{path}: a .json text input must be a list of integer token ids")
        return torch.tensor(ids, dtype=torch.long)[None]
    if m == "text" and ext == ".txt":
        if tokenizer is None:
            raise InputError(f"{path}: the checkpoint has no tokenizer.json, so .txt inputs cannot be tokenised")
        f = cfg.model.frontend
        ids = preprocess.encode_text(tokenizer, path.read_bytes(), f.max_positions - f.pad_id - 1)
        return torch.tensor(ids, dtype=torch.long)[None]
    raise InputError(f"{path}: cannot embed a {ext or 'suffix-less'} file with a {m} model")


@torch.no_grad()
def embed_files(encoder: Encoder, cfg: Config, inputs: list[Path], tokenizer: Path | None) -> dict[str, np.ndarray]:
    encoder.eval()
    out: dict[str, np.ndarray] = {}
    for path in inputs:
        key = path.stem
        if key in out:
            raise InputError(f"{path}: two inputs share the stem {key!r}; output keys must be unique")
        x = model_input(path, cfg, tokenizer)
        if cfg.model.modality == "text" and (x.min() < 0 or x.max() >= cfg.model.frontend.vocab_size):
            raise InputError(f"{path}: token ids must lie in [0, {cfg.model.frontend.vocab_size})")
        try:
            out[key] = encoder(x).last[0].float().numpy()  # (T, D)
        except (RuntimeError, ValueError) as err:
            raise InputError(f"{path}: the model rejected this input: {err}") from None
    return out


def save_npz(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Atomic write: temp file in the same directory, then rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
