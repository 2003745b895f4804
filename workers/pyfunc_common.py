"""What the MLflow pyfunc models d2v registers share: input decoding and artifact handling. Used by
workers/registry/pyfunc_model.py (encoders), workers/registry/finetuned_model.py (fine-tuned classifiers and
recognisers) and `d2v embed`'s batch path.

Inputs: one list, one item per example.
    vision  an image file path (str), the encoded file's bytes, or {"b64": "<base64 of the file>"} (JSON / REST)
    audio   an audio file path, encoded bytes or {"b64": ...}, or a float waveform at 16 kHz (list or 1-D array)
    text    a string, tokenised with the checkpoint's tokenizer.json
Preprocessing is `d2v embed`'s (workers/preprocess.py): vision resize + centre crop + ImageNet normalisation;
audio mono 16 kHz, per-utterance normalisation when the model was trained with it (waveforms too: they are
treated like the samples of a file); text `<s> ids </s>`, truncated to the model's positions.

Bad inputs: `decode_all` decodes every item before anything runs; if any fails, one error names each bad
item's index and what is wrong (nothing is computed, so no result is silently missing).

This module travels with the registered models as code (registry/log.py CODE): it imports only model/,
workers/preprocess.py and third-party libraries.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from mlflow.exceptions import MlflowException

from model.checkpoint import CONFIG_FILE, MODEL_FILE
from model.config import Config
from model.frontends import audio_frames
from workers import preprocess

Decoder = Callable[[Any, Config, "Path | None"], torch.Tensor]


class BadInput(ValueError):
    """One input item that cannot be used; the message says why."""


def file_source(item: Any, what: str) -> str | bytes:
    """A path (str, must exist), raw bytes or {"b64": base64} -> what preprocess's readers take."""
    if isinstance(item, str):
        if not Path(item).is_file():
            raise BadInput(f"no such {what} file {item!r} (send the file's bytes, or {{'b64': ...}} over REST)")
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, dict) and set(item) == {"b64"} and isinstance(item["b64"], str):
        try:
            data = base64.b64decode(item["b64"], validate=True)
        except (binascii.Error, ValueError) as err:
            raise BadInput(f"'b64' is not valid base64 ({err})") from None
    else:
        raise BadInput(f"wrong type {type(item).__name__}: expected the {what} file's path (str), its bytes "
                       "or {'b64': str}")
    if not data:
        raise BadInput(f"empty {what} bytes")
    return data


def decode_image(item: Any, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    src = file_source(item, "image")
    try:
        img = preprocess.open_image(src)
    except Exception as err:  # PIL raises several types for undecodable data
        raise BadInput(f"cannot decode the image ({type(err).__name__}: {err})") from None
    return preprocess.eval_image(img, cfg.model.frontend.image_size)  # (3, H, W)


def decode_audio(item: Any, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    if isinstance(item, (list, tuple, np.ndarray)):
        try:
            wav = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise BadInput(f"a waveform must be a list of numbers ({err})") from None
        if wav.ndim != 1:
            raise BadInput(f"a waveform must be 1-D (mono samples at 16 kHz), got shape {wav.shape}")
        if not np.isfinite(wav).all():
            raise BadInput("the waveform has NaN or infinite samples")
    else:
        src = file_source(item, "audio")
        try:
            wav = preprocess.load_audio(src)
        except Exception as err:  # soundfile / librosa raise several types
            raise BadInput(f"cannot decode the audio ({type(err).__name__}: {err})") from None
    if wav.size == 0:
        raise BadInput("empty audio (0 samples)")
    if audio_frames(len(wav), cfg.model.frontend.conv_layers) < 1:
        raise BadInput(f"{len(wav)} samples is shorter than one frame of the model's feature extractor")
    return torch.from_numpy(preprocess.normalize_wave(wav) if cfg.data.normalize else wav)  # (S,)


def decode_text(item: Any, cfg: Config, tokenizer: Path | None) -> torch.Tensor:
    if not isinstance(item, str):
        raise BadInput(f"wrong type {type(item).__name__}: expected a string")
    if tokenizer is None:
        raise BadInput("this model was registered without tokenizer.json, so strings cannot be tokenised")
    f = cfg.model.frontend
    ids = preprocess.encode_text(tokenizer, item.encode("utf-8"), f.max_positions - f.pad_id - 1)
    return torch.tensor(ids, dtype=torch.long)  # (T,)


DECODERS: dict[str, Decoder] = {"vision": decode_image, "audio": decode_audio, "text": decode_text}


def as_items(model_input: Any) -> list:
    """The list of inputs, also from a pandas DataFrame (first column) or Series, or a 2-D waveform array."""
    if hasattr(model_input, "iloc"):  # pandas, without importing it
        column = model_input.iloc[:, 0] if model_input.ndim == 2 else model_input
        return column.tolist()
    if isinstance(model_input, np.ndarray):
        return list(model_input) if model_input.ndim == 2 else model_input.tolist()
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise MlflowException.invalid_parameter_value(
        f"model_input must be a list of inputs (one per example), got {type(model_input).__name__}")


def decode_all(model_input: Any, cfg: Config, tokenizer: Path | None, verb: str = "embedded") -> list[torch.Tensor]:
    """Every item decoded, or one MlflowException (HTTP 400 when served) naming each bad item and why."""
    items = as_items(model_input)
    if not items:
        raise MlflowException.invalid_parameter_value(f"model_input is empty: nothing to be {verb}")
    decode = DECODERS[cfg.model.modality]
    xs, errors = [], []
    for i, item in enumerate(items):
        try:
            xs.append(decode(item, cfg, tokenizer))
        except BadInput as err:
            errors.append(f"[{i}] {err}")
    if errors:
        raise MlflowException.invalid_parameter_value(
            f"{len(errors)} of {len(items)} {cfg.model.modality} inputs cannot be {verb} (nothing was computed): "
            + "; ".join(errors))
    return xs


def same_shape_chunks(xs: list[torch.Tensor], batch_size: int) -> Iterator[list[int]]:
    """Indices of inputs of one shape, at most batch_size at a time: such inputs share a forward pass with no
    padding, so each result equals that input run alone."""
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        by_shape.setdefault(tuple(x.shape), []).append(i)
    for index in by_shape.values():
        for k in range(0, len(index), batch_size):
            yield index[k : k + batch_size]


def checkpoint_dir(weights: Path, config: Path) -> Path:
    """MLflow puts both artifacts in one folder; if a future version does not, link them into one."""
    if weights.parent == config.parent and weights.name == MODEL_FILE and config.name == CONFIG_FILE:
        return weights.parent
    d = Path(tempfile.mkdtemp(prefix="d2v-pyfunc-"))
    (d / MODEL_FILE).symlink_to(weights.resolve())
    (d / CONFIG_FILE).symlink_to(config.resolve())
    return d
