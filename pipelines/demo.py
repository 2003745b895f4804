"""Offline demo corpora in the layouts of the real datasets, each with a labelled split for evaluation.

`build_demo(modality, out)` writes real (not random) data that needs no network:

- vision: scikit-learn's 1,797 bundled handwritten digit scans, rendered as 32x32 RGB PNGs in the
  ImageNet train layout (`pretrain/train/<wnid>/<wnid>_<n>.png`).
- audio: English speech synthesised by espeak-ng over many voices, 16 kHz mono FLAC in the LibriSpeech
  layout (`pretrain/<spk>/<ch>/<spk>-<ch>-<utt>.flac` + `<spk>-<ch>.trans.txt`), and a Speech-Commands-
  style keyword task with test speakers disjoint from train speakers.
- text: docstrings and the reference-manual topics of the running Python's standard library (read with
  `ast`, nothing imported), as a raw corpus (`pretrain/<group>.txt`, documents separated by blank lines).

Every build also writes `labelled/{train,test}/<class>/<id>.<ext>` (label = directory name) and, last,
`DONE.json` (the summary returned here). Output is a pure function of (modality, seed, size) and the
installed generators (recorded in DONE.json): the same seed gives byte-identical files.

Atomicity: everything is built in a staging folder inside OUT and renamed into place at the end, so
`OUT/pretrain` and `OUT/labelled` are never half-written; DONE.json is written (temp + rename) after them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, get_args

Modality = Literal["vision", "audio", "text"]
Size = Literal["small", "full"]

FORMAT_VERSION = 1  # bump when the layout or the generators change, so skip_existing rebuilds
DONE_FILE = "DONE.json"
PARTS = ("pretrain", "labelled")  # the sub-trees of OUT this module owns (replaced on rebuild)


def build_demo(
    modality: Modality,
    out: str | Path,
    *,
    seed: int = 0,
    skip_existing: bool = False,
    size: Size = "full",
) -> dict:
    """Build the demo corpus for `modality` under `out`; return the summary also saved as OUT/DONE.json.

    size="small" is a few dozen to a few hundred items (seconds, for tests); "full" is enough for the
    tiny presets to learn something (minutes at most on 2 cores). With skip_existing=True and an
    OUT/DONE.json from the same (modality, seed, size, format), nothing is rebuilt.
    """
    if modality not in get_args(Modality):
        raise ValueError(f"demo-data: modality={modality!r} is not one of {get_args(Modality)}")
    if size not in get_args(Size):
        raise ValueError(f"demo-data: size={size!r} is not one of {get_args(Size)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"demo-data: seed={seed!r} must be a non-negative integer")
    out = Path(out)
    key = {"format": FORMAT_VERSION, "modality": modality, "seed": seed, "size": size}

    if skip_existing:
        done = read_done(out)
        if done is not None and all(done.get(k) == v for k, v in key.items()):
            log(f"demo-data {modality}: {out / DONE_FILE} matches (seed={seed}, size={size}); skipping")
            return done
        if done is not None:
            log(f"demo-data {modality}: {out / DONE_FILE} is for another build "
                f"({ {k: done.get(k) for k in key} }); rebuilding")

    builder = _builder(modality)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_FILE).unlink(missing_ok=True)  # from here on a crash must not look finished
    t0 = time.perf_counter()
    stage = Path(tempfile.mkdtemp(prefix=".building-", dir=out))
    try:
        details = builder(stage, seed=seed, size=size)
        for part in PARTS:
            if (out / part).exists():
                shutil.rmtree(out / part)
            os.replace(stage / part, out / part)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    summary = {**key, "python": sys.version.split()[0], **details}
    write_text_atomic(out / DONE_FILE, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"demo-data {modality}: done in {time.perf_counter() - t0:.1f}s -> {out}")
    return summary


def read_done(out: Path) -> dict | None:
    """The summary of a finished build in `out`, or None (missing or unreadable: treat as not built)."""
    try:
        return json.loads((Path(out) / DONE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _builder(modality: Modality):
    # Imported lazily: each modality pulls different libraries (sklearn, scipy/soundfile, ast only).
    if modality == "vision":
        from pipelines.demo_vision import build
    elif modality == "audio":
        from pipelines.demo_audio import build
    else:
        from pipelines.demo_text import build
    return build


# ------------------------------------------------------------------------------- shared small helpers


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays clean for the CLI's own output)."""
    print(msg, file=sys.stderr, flush=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text to a temp name beside `path`, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def split_counts(root: Path, ext: str) -> dict[str, dict[str, int]]:
    """{split: {class: n_files}} for a `labelled/{train,test}/<class>/*.<ext>` tree (sorted keys)."""
    return {
        split: {d.name: sum(1 for _ in d.glob(f"*.{ext}")) for d in sorted((root / split).iterdir()) if d.is_dir()}
        for split in ("train", "test")
    }
