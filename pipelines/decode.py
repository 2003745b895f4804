"""Per-modality decode → validate → normalise. Pure functions of the input bytes (no Ray, no I/O).

Each function either returns a normalised sample or raises `Reject(stage, reason)`; the reason says what
is wrong with the file and, where there is one, what to do about it. The same functions run in the
validation stage (payload not encoded) and in the shard writer (payload encoded), so both stages agree.

Stored forms (the shard contract, see README):
- vision: 8-bit RGB. JPEG sources stay `jpg`: the source bytes untouched when the image is RGB and needs no
  rotation or resize, else re-encoded at quality 95, 4:4:4 (storing JPEG photos as PNG would multiply
  the corpus size ~5x). Every other source (PNG, GIF, BMP, TIFF, WebP, ...) is stored losslessly as `png`.
  So a JPEG corpus gives all-`jpg` shards, a PNG corpus all-`png`; a mixed corpus mixes the two keys.
- audio: 16 kHz mono PCM_16 `flac`.
- text: NFC-normalised documents (see `text_documents`); tokenised later by pipelines.tokenizer.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default decompression-bomb threshold (~0.25 GiB of RGBA)
SAMPLE_RATE = 16_000  # every stored audio sample is 16 kHz mono
SILENCE_DBFS = -70.0  # peak below this (≈10 LSB of 16-bit) counts as silent
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf", ".m4a"}
_LIBROSA_EXTS = {".mp3", ".m4a"}  # soundfile first; librosa (audioread backends) as a fallback
TEXT_EXTS = {".txt"}


class Reject(Exception):
    """An input that cannot become a sample. `stage`: read | decode | validate | list | block."""

    def __init__(self, reason: str, stage: str = "decode"):
        super().__init__(reason)
        self.reason, self.stage = reason, stage


@dataclass
class Sample:
    """A decoded, validated input. `encode()` produces the payload bytes stored under `ext`."""

    ext: str
    length: int | None  # audio: samples at 16 kHz; vision: None
    meta: dict = field(default_factory=dict)  # extra json fields (width/height, sample_rate, ...)
    encode: Callable[[], bytes] = lambda: b""


# ---------------------------------------------------------------- vision

def decode_image(data: bytes, *, max_side: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS) -> Sample:
    """Any Pillow-readable image → RGB, EXIF orientation applied, short side ≤ max_side (if given)."""
    if not data:
        raise Reject("empty file (0 bytes)", "read")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below decides
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise Reject(f"decompression-bomb guard: header claims {w}x{h} = {w * h} pixels > limit "
                             f"{max_pixels}; raise max_image_pixels if the image is genuine", "validate")
            img.load()  # full decode: truncated/corrupt data fails here, not later in training
    except Reject:
        raise
    except Image.DecompressionBombError as e:
        raise Reject(f"decompression-bomb guard (Pillow): {e}", "validate") from None
    except UnidentifiedImageError:
        raise Reject("not an image Pillow can identify (wrong extension or corrupt header)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Reject(f"corrupt or truncated image: {e}") from None

    is_jpeg = img.format in ("JPEG", "MPO")  # MPO: multi-picture JPEG from cameras
    try:
        upright = img.getexif().get(0x0112, 1) == 1
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose a good image: keep the stored orientation
        upright = True
    unchanged = is_jpeg and img.mode == "RGB" and upright
    rgb = _to_rgb(img)
    if max_side is not None and min(rgb.size) > max_side:
        rgb, unchanged = _resize_short_side(rgb, max_side), False
    meta = {"width": rgb.width, "height": rgb.height}
    if unchanged:
        return Sample("jpg", None, meta, lambda: data)
    if is_jpeg:
        return Sample("jpg", None, meta, lambda: _encoded(rgb, "JPEG", quality=95, subsampling=0))
    return Sample("png", None, meta, lambda: _encoded(rgb, "PNG", compress_level=6))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Palette/alpha/16-bit/float/CMYK/... → 8-bit RGB. Transparency is composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0  # 16-bit range → 8-bit
        img = Image.fromarray(np.round(a).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        a = a * 255.0 if a.max(initial=0.0) <= 1.0 else a  # float images in [0, 1] or [0, 255]
        img = Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info  # tRNS: P/L/RGB
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    out = img.convert("RGB")
    out.info = {}  # drop ICC/EXIF/etc.: the stored pixels are the data, metadata could mislead a viewer
    return out


def _resize_short_side(img: Image.Image, side: int) -> Image.Image:
    scale = side / min(img.size)
    size = (max(side, round(img.width * scale)), max(side, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)  # zlib and libjpeg are deterministic: same pixels → same bytes
    return buf.getvalue()


# ---------------------------------------------------------------- audio

def decode_audio(data: bytes, ext: str, *, min_seconds: float, max_seconds: float) -> Sample:
    """wav/flac/ogg/mp3/... → mono float → 16 kHz → length and silence checks → PCM_16 FLAC."""
    if not data:
        raise Reject("empty file (0 bytes)", "read")
    x, sr = _read_audio(data, ext)  # (frames, channels) float32
    if x.size == 0:
        raise Reject("no audio frames (empty stream)")
    if x.shape[0] / sr > max_seconds + 1.0:  # cheap early exit before resampling an hour-long file
        raise Reject(f"too long: {x.shape[0] / sr:.2f} s > max_seconds {max_seconds}", "validate")
    if not np.isfinite(x).all():
        raise Reject("contains NaN or infinite samples", "validate")
    mono = x.mean(axis=1, dtype=np.float64)
    if sr != SAMPLE_RATE:
        import soxr  # librosa's default resampler; deterministic

        mono = soxr.resample(mono, sr, SAMPLE_RATE, quality="HQ")
    seconds = len(mono) / SAMPLE_RATE
    if seconds < min_seconds:
        raise Reject(f"too short: {seconds:.3f} s < min_seconds {min_seconds}", "validate")
    if seconds > max_seconds:
        raise Reject(f"too long: {seconds:.2f} s > max_seconds {max_seconds}", "validate")
    peak = float(np.abs(mono).max())
    if peak <= 10 ** (SILENCE_DBFS / 20):
        db = 20 * math.log10(peak) if peak > 0 else float("-inf")
        raise Reject(f"silent: peak {db:.1f} dBFS is below {SILENCE_DBFS} dBFS", "validate")
    pcm = np.clip(np.round(mono * 32767.0), -32768, 32767).astype(np.int16)  # explicit clip: no wrap-around
    meta = {"sample_rate": SAMPLE_RATE, "source_sample_rate": int(sr), "source_channels": int(x.shape[1])}
    return Sample("flac", len(pcm), meta, lambda: _flac_bytes(pcm))


def _read_audio(data: bytes, ext: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return x, int(sr)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError on bad data
        if ext not in _LIBROSA_EXTS:
            raise Reject(f"not decodable audio (soundfile: {e}); convert it to wav or flac") from None
        first = e
    try:
        import librosa  # slow import; only for formats libsndfile cannot read

        with tempfile.NamedTemporaryFile(suffix=ext) as tmp:  # audioread backends need a real path
            tmp.write(data)
            tmp.flush()
            y, sr = librosa.load(tmp.name, sr=None, mono=False)
        y = np.asarray(y, dtype=np.float32)
        return (y[:, None] if y.ndim == 1 else y.T), int(sr)
    except Exception as e:
        raise Reject(f"not decodable audio (soundfile: {first}; librosa: {e}); convert it to wav or flac") from None


def _flac_bytes(pcm: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


# ---------------------------------------------------------------- text

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # Unicode category Cc, except \t and \n
_BLANK_LINE = re.compile(r"\n[ \t]*\n")  # documents are separated by blank lines


def text_documents(data: bytes, *, offset: int = 0) -> list[str]:
    """UTF-8 bytes → documents: CRLF/CR → LF, control chars stripped, NFC, split on blank lines, stripped.

    `offset` is where `data` starts in its file (for error messages). Returns [] for whitespace-only text.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start:e.start + 4].hex(" ")
        raise Reject(f"not valid UTF-8: bytes {bad} at offset {offset + e.start} ({e.reason}); "
                     f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    if offset == 0:
        text = text.removeprefix("\ufeff")  # byte-order mark
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = unicodedata.normalize("NFC", text)
    return [d for d in (part.strip() for part in _BLANK_LINE.split(text)) if d]


def iter_pieces(read: Callable[[int], bytes], target: int) -> Iterator[tuple[int, bytes]]:
    """Stream raw text in pieces of about `target` bytes, cut right after blank lines: yields (offset, bytes).

    A cut after a blank line keeps documents whole, and since it follows an ASCII newline it is also a
    UTF-8 character and NFC boundary, so text_documents(whole file) == concatenation over pieces. A
    document longer than `target` simply makes a longer piece. Memory: about one piece.
    """
    buf, offset = b"", 0
    while chunk := read(target):
        lo, buf = max(0, len(buf) - 1), buf + chunk
        if len(buf) < target:
            continue
        cut = _last_blank_line_end(buf, lo)
        if cut > 0:
            yield offset, buf[:cut]
            offset, buf = offset + cut, buf[cut:]
    if buf:
        yield offset, buf


def _last_blank_line_end(buf: bytes, lo: int) -> int:
    """End offset of the last blank line ('\\n', only spaces/tabs/CR, '\\n') starting at ≥ lo, or -1."""
    j = buf.rfind(b"\n", lo)
    while j > lo:
        i = buf.rfind(b"\n", lo, j)
        if i < 0:
            return -1
        if not buf[i + 1:j].strip(b" \t\r"):
            return j + 1
        j = i
    return -1
