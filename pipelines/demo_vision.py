"""Vision demo corpus: scikit-learn's bundled handwritten digits as 32x32 RGB PNGs in the ImageNet layout.

Source: `sklearn.datasets.load_digits()` — 1,797 real 8x8 scans (UCI optdigits, 43 writers, 16 grey
levels), bundled with scikit-learn, so nothing is downloaded. Each rendering upsamples the scan
(bicubic, 8 -> 28 px, centred on a 32 px canvas), applies a small random affine (rotation +-10 deg,
scale 0.9-1.1, shift +-2 px) and prints it in a random dark ink on random light paper with faint noise:
RGB variety, still clearly the same digit.

Layout (class dirs play the role of ImageNet wnids):
    pretrain/train/digit_<d>/digit_<d>_<n>.png     n = source_index * 10 + copy (copy < COPIES[size])
    labelled/{train,test}/digit_<d>/digit_<d>_<source_index:04d>.png   stratified 80/20 split
Pretrain holds every selected scan (several renderings each in "full"); the labelled split re-renders the
same scans once each (as ImageNet pretrain -> ImageNet linear probe): no label is used for pretraining.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.demo import log, split_counts

IMAGE_SIZE = 32  # matches the vision-tiny preset (model.frontend.image_size)
DIGIT_SIZE = 28  # the upsampled scan; the 2 px margin leaves room for the affine jitter
COPIES = {"small": 1, "full": 3}  # pretrain renderings per scan
PER_CLASS = {"small": 20, "full": None}  # scans per class (None: all ~180)
TEST_FRACTION = 0.2


def build(root: Path, *, seed: int, size: str) -> dict:
    from sklearn.datasets import load_digits  # bundled data file: offline

    digits = load_digits()
    images, labels = digits.images, digits.target  # (1797, 8, 8) floats 0..16, (1797,)
    chosen = _choose(labels, PER_CLASS[size], np.random.default_rng([seed, 0]))

    render_rng = np.random.default_rng([seed, 1])
    n_done, total = 0, len(chosen) * COPIES[size]
    for idx in chosen:  # sorted source indices; one rng stream consumed in this order -> deterministic
        wnid = _wnid(labels[idx])
        for copy in range(COPIES[size]):
            _save(render(images[idx], render_rng), root / "pretrain" / "train" / wnid / f"{wnid}_{idx * 10 + copy:05d}.png")
            n_done += 1
            if n_done % 1000 == 0:
                log(f"demo-data vision: pretrain {n_done}/{total} images")

    split_rng = np.random.default_rng([seed, 2])
    test = _stratified_test(labels, chosen, split_rng)
    for idx in chosen:
        wnid = _wnid(labels[idx])
        split = "test" if idx in test else "train"
        _save(render(images[idx], render_rng), root / "labelled" / split / wnid / f"{wnid}_{idx:04d}.png")

    return {
        "source": "sklearn.datasets.load_digits (UCI optdigits, 8x8 scans)",
        "image_size": IMAGE_SIZE,
        "classes": [_wnid(d) for d in range(10)],
        "counts": {"pretrain": total, "labelled": split_counts(root / "labelled", "png")},
    }


def render(scan: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """One 8x8 scan (0..16, ink high) -> a 32x32 RGB image of dark ink on light paper."""
    grey = Image.fromarray(np.clip(scan * (255 / 16), 0, 255).astype(np.uint8), "L")
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    pad = (IMAGE_SIZE - DIGIT_SIZE) // 2
    canvas.paste(grey.resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC), (pad, pad))

    angle, scale = np.deg2rad(rng.uniform(-10, 10)), rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-2, 2, size=2)
    ink = np.asarray(canvas.transform(canvas.size, Image.Transform.AFFINE, _inverse_affine(angle, scale, tx, ty),
                                      resample=Image.Resampling.BICUBIC, fillcolor=0), dtype=np.float64) / 255  # (32, 32)

    paper_rgb = rng.uniform(0.75, 1.0, size=3)  # light, slightly tinted paper
    ink_rgb = rng.uniform(0.0, 0.35, size=3)  # dark ink of some colour
    rgb = paper_rgb * (1 - ink[..., None]) + ink_rgb * ink[..., None]  # (32, 32, 3)
    rgb += rng.normal(0, 0.02, size=rgb.shape)  # scanner noise
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), "RGB")


def _inverse_affine(angle: float, scale: float, tx: float, ty: float) -> tuple[float, ...]:
    """PIL wants output->input: rotate by -angle and divide by scale about the centre, after undoing the shift."""
    c = IMAGE_SIZE / 2
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # x_in = cos*(x - c - tx) + sin*(y - c - ty) + c ;  y_in = -sin*(x - c - tx) + cos*(y - c - ty) + c
    return (cos, sin, c - cos * (c + tx) - sin * (c + ty), -sin, cos, c + sin * (c + tx) - cos * (c + ty))


def _choose(labels: np.ndarray, per_class: int | None, rng: np.random.Generator) -> list[int]:
    """Sorted source indices: all of them, or a random `per_class` of each digit."""
    if per_class is None:
        return list(range(len(labels)))
    picked = [rng.choice(np.flatnonzero(labels == d), per_class, replace=False) for d in range(10)]
    return sorted(int(i) for i in np.concatenate(picked))


def _stratified_test(labels: np.ndarray, chosen: list[int], rng: np.random.Generator) -> set[int]:
    """TEST_FRACTION of each class (at least one) goes to test."""
    test: set[int] = set()
    for d in range(10):
        members = [i for i in chosen if labels[i] == d]
        n_test = max(1, round(len(members) * TEST_FRACTION))
        test.update(int(i) for i in rng.permutation(members)[:n_test])
    return test


def _wnid(digit: int) -> str:
    return f"digit_{int(digit)}"


def _save(img: Image.Image, path: Path) -> None:
    # The whole tree is staged and renamed by build_demo, so a direct write is never seen half-done.
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # no timestamps or metadata: same pixels -> same bytes
    path.write_bytes(buf.getvalue())
