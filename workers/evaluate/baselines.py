"""The two yardsticks every evaluation reports beside the model's accuracy.

- baseline_accuracy: the same task on a randomly initialised encoder of the same config
  (`torch.manual_seed(0); Encoder(cfg.model)`): what pretraining adds over architecture alone.
- raw_accuracy: the probe on the raw input, no encoder at all: what the representation adds over its input.
  A pretrained representation should not score below it.
    vision: the picture in grey, area-downsampled (PIL BOX) to 8x8 = 64 pixels -> StandardScaler + LogReg
    audio:  librosa MFCC (20 coefficients, default 2048/512 STFT at 16 kHz) -> per-utterance mean and std of
            the frames = 40 numbers -> StandardScaler + LogReg
    text:   TF-IDF bag of tokens (sklearn TfidfVectorizer, every word token incl. 1-letter ones; for .json /
            .npy token-id inputs the ids are the tokens), vocabulary fitted on train -> LogReg without the
            scaler (rows are already L2-normalised; centring sparse rows would make them dense)
  The raw inputs are read from the files as they are (not through the model's preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model.config import Config
from model.encoder import Encoder

from .. import preprocess
from ..embed import InputError
from .common import log
from .data import Split
from .probe import fit_probe, labels

BASELINE_SEED = 0
RAW_IMAGE_SIZE = 8  # the sklearn digits' own resolution; 64 standardised pixels
N_MFCC = 20  # librosa's default
TOKEN_PATTERN = r"(?u)\b\w+\b"  # sklearn's default drops 1-character tokens: keep them (ids like "7")


def random_encoder(cfg: Config) -> Encoder:
    """The baseline: a freshly initialised encoder of the same config, seeded (same weights every call)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASELINE_SEED)
        return Encoder(cfg.model).eval()


# ------------------------------------------------------------------------------------------ raw inputs
def grey_pixels(path: Path) -> np.ndarray:
    """An image file (or a (3, H, W) .npy) -> (64,) grey pixels at RAW_IMAGE_SIZE x RAW_IMAGE_SIZE."""
    from PIL import Image

    size = (RAW_IMAGE_SIZE, RAW_IMAGE_SIZE)
    if path.suffix.lower() == ".npy":
        img = Image.fromarray(np.load(path, allow_pickle=False).astype(np.float32).mean(0), mode="F")
    else:
        img = preprocess.open_image(path).convert("L")
    return np.asarray(img.resize(size, Image.BOX), dtype=np.float32).reshape(-1)


def mfcc_stats(path: Path) -> np.ndarray:
    """An audio file (or a 16 kHz .npy wave) -> (2 * N_MFCC,) mean and std of its MFCC frames."""
    import librosa

    wav = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else preprocess.load_audio(path)
    m = librosa.feature.mfcc(y=wav.astype(np.float32), sr=preprocess.SAMPLE_RATE, n_mfcc=N_MFCC)  # (20, T)
    return np.concatenate([m.mean(1), m.std(1)])


def document(path: Path) -> str:
    """A text file as is, or a .json / .npy list of token ids as space-separated ids."""
    import json

    ext = path.suffix.lower()
    if ext == ".txt":
        return path.read_text(encoding="utf-8", errors="replace")
    ids = np.load(path, allow_pickle=False).tolist() if ext == ".npy" else json.loads(path.read_text())
    return " ".join(str(int(i)) for i in ids)


def per_file(fn: Callable[[Path], np.ndarray]) -> Callable:
    def featurize(train: list[Path], test: list[Path]):
        return tuple(np.stack([_read(fn, p) for p in paths]) for paths in (train, test))

    return featurize


def tfidf(train: list[Path], test: list[Path]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(token_pattern=TOKEN_PATTERN)
    x_train = vec.fit_transform([_read(document, p) for p in train])  # (N, V) sparse
    return x_train, vec.transform([_read(document, p) for p in test])


def _read(fn: Callable, path: Path):
    try:
        return fn(path)
    except Exception as err:  # decoders raise many types (PIL, soundfile, librosa, json, numpy)
        raise InputError(f"{path}: cannot be read for the raw-input baseline ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class RawBaseline:
    describe: str  # recorded as the eval run's `raw_input` param
    featurize: Callable  # (train paths, test paths) -> (train features, test features)
    scale: bool  # StandardScaler before the logistic regression


RAW = {
    "vision": RawBaseline(f"grey pixels {RAW_IMAGE_SIZE}x{RAW_IMAGE_SIZE} (PIL BOX)", per_file(grey_pixels), True),
    "audio": RawBaseline(f"librosa MFCC {N_MFCC}: per-utterance mean + std", per_file(mfcc_stats), True),
    "text": RawBaseline("TF-IDF bag of tokens (sklearn, fitted on train)", tfidf, False),
}


def raw_accuracy(split: Split) -> float:
    """The probe on the raw inputs of `split` (see the module docstring) -> test accuracy."""
    raw = RAW[split.modality]
    x_train, x_test = raw.featurize([p for p, _ in split.train], [p for p, _ in split.test])
    acc = fit_probe(x_train, labels(split.train), x_test, labels(split.test), raw.scale, "raw input")
    log(f"evaluate: raw input ({raw.describe}): accuracy {acc:.4f}")
    return acc
