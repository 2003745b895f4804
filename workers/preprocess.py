"""Decoded sample -> model-ready tensor, shared by the training loader and `d2v embed`.

Vision: RGB, ImageNet mean/std normalisation (data2vec_vision / BEiT); train = RandomResizedCrop (bicubic),
horizontal flip, colour jitter; eval = resize short side + centre crop. Audio: mono 16 kHz float32,
zero-mean unit-variance per utterance (wav2vec 2.0 `normalize=True`). Text: tokenizer.json ids with
<s> ... </s>. torchvision is not used (its PyPI wheels do not match the CPU torch build here).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SAMPLE_RATE = 16_000


# -------------------------------------------------------------------------------------------- vision
def open_image(data: bytes | str | Path) -> Image.Image:
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W)."""
    a = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    a = (a - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def eval_image(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to `size` (bicubic), centre crop size x size -> (3, size, size)."""
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return image_to_tensor(img.crop((left, top, left + size, top + size)))


def train_image(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    jitter: float = 0.4,
) -> torch.Tensor:
    """RandomResizedCrop (torchvision's sampling: 10 tries, else the whole image) + flip + colour jitter."""
    w, h = img.size
    area = w * h
    box = None
    for _ in range(10):
        target = area * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # no valid crop in 10 tries: use the whole image
        box = (0, 0, w, h)
    img = img.resize((size, size), Image.BICUBIC, box=box)
    if hflip and rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter > 0:
        for enhance in rng.permutation(3):
            factor = float(rng.uniform(max(0.0, 1 - jitter), 1 + jitter))
            img = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[enhance](img).enhance(factor)
    return image_to_tensor(img)


# --------------------------------------------------------------------------------------------- audio
def load_audio(data: bytes | str | Path) -> np.ndarray:
    """Any soundfile/librosa-readable audio -> mono float32 at 16 kHz."""
    import soundfile as sf

    try:
        wav, sr = sf.read(io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32", always_2d=True)
        wav = wav.mean(axis=1)
    except Exception:  # mp3 and other formats soundfile does not read
        import librosa

        src = io.BytesIO(data) if isinstance(data, bytes) else str(data)
        wav, sr = librosa.load(src, sr=None, mono=True)
    if sr != SAMPLE_RATE:
        import soxr

        wav = soxr.resample(wav, sr, SAMPLE_RATE)
    return np.ascontiguousarray(wav, dtype=np.float32)


def normalize_wave(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per utterance (wav2vec 2.0 / data2vec `normalize=True`)."""
    return ((wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- text
def encode_text(tokenizer_json: str | Path, data: bytes, max_tokens: int) -> list[int]:
    """Raw text bytes -> <s> ids </s>, normalised and tokenised exactly as `d2v shard` does for training
    (documents joined by </s>), truncated to max_tokens."""
    from pipelines.decode import text_documents
    from pipelines.tokenizer import BOS_ID, EOS_ID, encode_documents, load_tokenizer

    tok = load_tokenizer(Path(tokenizer_json).read_text(encoding="utf-8"), where=str(tokenizer_json))
    stream = encode_documents(tok, text_documents(data))[:-1]  # drop the last document's </s>
    return [BOS_ID, *stream[: max_tokens - 2].tolist(), EOS_ID]
