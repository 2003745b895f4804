"""On-disk formats of a shard directory, and the plan that guards it.

DST/
  <modality>-000000.tar …   WebDataset shards; each sample = `<key>.<payload ext>` then `<key>.json`
  manifest.parquet          one row per sample (MANIFEST_SCHEMA), in shard order then sample order
  rejects.parquet           one row per rejected input (REJECTS_SCHEMA), sorted by source
  stats.json                counts, options, input fingerprint, timing
  tokenizer.json            (text) the tokenizer that produced the ids
  _plan.json                written before any shard: fingerprint of inputs + options (resume guard)
  _stage1.parquet           validation results cached for resume (internal)

Tar bytes are a pure function of the samples (fixed mtime/uid/gid/owner names/mode), so a rerun writes
byte-identical shards. Keys contain no '.' (webdataset splits member names at the first dot of the
basename) and only [A-Za-z0-9_/-].
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterable, Sequence
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1  # bump when shard contents change meaning; part of the plan fingerprint
PLAN, MANIFEST, REJECTS, STATS, STAGE1, TOKENIZER = (
    "_plan.json", "manifest.parquet", "rejects.parquet", "stats.json", "_stage1.parquet", "tokenizer.json")
SHARD_RE = re.compile(r"^(vision|audio|text)-\d{6}\.tar$")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),      # __key__ inside the shard
    ("shard", pa.string()),    # shard file name, relative to DST (e.g. "vision-000003.tar")
    ("source", pa.string()),   # input path relative to SRC (text: the first source of the block)
    ("bytes", pa.int64()),     # payload size (png/jpg/flac/ids.npy), json excluded
    ("length", pa.int64()),    # audio: samples at 16 kHz; text: tokens; vision: null
    ("label", pa.string()),    # vision: class dir; audio: transcript; text: null
])
REJECTS_SCHEMA = pa.schema([
    ("source", pa.string()),   # input path relative to SRC
    ("stage", pa.string()),    # list | read | decode | validate | block
    ("reason", pa.string()),   # what is wrong and what to do
])


def shard_name(modality: str, index: int) -> str:
    return f"{modality}-{index:06d}.tar"


def sample_keys(rels: Sequence[str]) -> list[str]:
    """Stable, unique keys from relative paths: extension dropped, other chars outside [A-Za-z0-9_/-] → '_'.

    Collisions after sanitising (a.png + a.jpg, 'a b' + 'a_b') get a short hash of the full path appended.
    Computed over the whole sorted listing, so a key never depends on which files were rejected.
    """
    keys, seen = [], set()
    for rel in rels:
        key = re.sub(r"[^A-Za-z0-9_/-]", "_", posixpath.splitext(rel)[0]).strip("/") or "_"
        if key in seen:
            key = f"{key}_{hashlib.sha1(rel.encode()).hexdigest()[:10]}"
        seen.add(key)
        keys.append(key)
    return keys


def json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# ---------------------------------------------------------------- tar

def write_tar(fileobj: BinaryIO, samples: Iterable[tuple[str, list[tuple[str, bytes]]]]) -> None:
    """Write (key, [(ext, bytes), ...]) samples as a deterministic WebDataset tar."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))


def read_tar_index(fileobj: BinaryIO) -> list[tuple[str, int]]:
    """(member name, size) of every file in a tar, reading headers only."""
    with tarfile.open(fileobj=fileobj, mode="r:") as tf:
        return [(m.name, m.size) for m in tf if m.isfile()]


# ---------------------------------------------------------------- tables

def table_bytes(table: pa.Table) -> bytes:
    """Parquet bytes; deterministic for the same rows (no timestamps in pyarrow's writer)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_table(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data))


# ---------------------------------------------------------------- plan

def fingerprint(entries: Iterable, modality: str, options: dict) -> str:
    """sha256 over format version, modality, options and the sorted (rel, size, mtime_ns) listing."""
    h = hashlib.sha256(json_bytes({"format": FORMAT_VERSION, "modality": modality, "options": options}))
    for e in entries:
        h.update(f"{e.rel}\t{e.size}\t{e.mtime_ns}\n".encode())
    return h.hexdigest()


def plan_mismatch(dst_uri: str, old: dict, new: dict) -> str:
    """A message explaining why an existing DST does not match this job."""
    diffs = []
    if old.get("modality") != new["modality"]:
        diffs.append(f"modality {old.get('modality')} → {new['modality']}")
    for k in sorted(set(old.get("options", {})) | set(new["options"])):
        a, b = old.get("options", {}).get(k), new["options"].get(k)
        if a != b:
            diffs.append(f"option {k}: {a} → {b}")
    if old.get("inputs") != new["inputs"] or old.get("input_bytes") != new["input_bytes"]:
        diffs.append(f"input files {old.get('inputs')} ({old.get('input_bytes')} bytes) → "
                     f"{new['inputs']} ({new['input_bytes']} bytes)")
    if not diffs:
        diffs.append("input files changed (same count and total size, different names/sizes/mtimes)")
    return (f"{dst_uri} already holds shards planned for different inputs or options ("
            + "; ".join(diffs) + "). Re-run with --overwrite to delete them and shard again, "
            "or choose another --output.")
