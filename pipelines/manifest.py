"""Everything about the files in a shard directory (DST): formats, the plan guard, shard tar I/O.

DST/
  <modality>-000000.tar …   WebDataset shards; each sample = `<key>.<payload ext>` then `<key>.json`
  manifest.parquet          one row per sample (MANIFEST_SCHEMA), in shard order then sample order
  rejects.parquet           one row per rejected input (REJECTS_SCHEMA), sorted by source
  stats.json                counts, options, input fingerprint, timing
  tokenizer.json            (text) the tokenizer that produced the ids
  _plan.json                written before any shard: fingerprint of inputs + options (resume guard)
  _stage1.parquet           validation results cached for resume (internal)

Samples (member names `<key>.<ext>`; the json is sorted-key, compact UTF-8):
  vision  `jpg` or `png` (8-bit RGB; see pipelines/decode.py for which) +
          json {"source", "label": class folder | null, "length": null, "width", "height"}
  audio   `flac` (16 kHz mono PCM_16) + json {"source", "label": transcript | null, "length": samples,
          "speaker": LibriSpeech speaker id | null, "sample_rate": 16000, "source_sample_rate", "source_channels"}
  text    key `block-<9-digit global block index>`: `ids.npy` (int32 [n], n = block_size except maybe the
          last block) + json {"source": first source, "sources": [...], "label": null, "length": n,
          "offset": position of the block's first token in the whole stream}

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

from pipelines import fs

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


# ---------------------------------------------------------------- DST guard, stage-1 cache, shard I/O

class ShardJobError(RuntimeError):
    """The job cannot proceed safely (DST mismatch, input changed mid-run); the message says what to do."""


def is_ours(name: str) -> bool:
    """A file in DST that the shard job owns (deleted by --overwrite)."""
    base = name.removesuffix(fs.TMP_SUFFIX)
    return bool(SHARD_RE.match(base)) or base in (PLAN, MANIFEST, REJECTS, STATS, STAGE1, TOKENIZER)


def prepare_dst(dst: fs.Location, plan: dict, overwrite: bool) -> None:
    """Refuse a DST planned for other inputs/options; with overwrite, delete our files there first.

    Then (re)write DST/_plan.json, before any shard exists.
    """
    dst.fs.create_dir(dst.path, recursive=True)
    names = [n for n in fs.list_dir(dst.fs, dst.path) if is_ours(n)]
    plan_path = dst.join(PLAN)
    if overwrite:
        fs.delete(dst.fs, plan_path)  # first: a crash mid-cleanup leaves files without a plan → refused
        for n in names:
            fs.delete(dst.fs, dst.join(n))
    elif PLAN in names:
        old = json.loads(fs.read_bytes(dst.fs, plan_path))
        if old.get("fingerprint") != plan["fingerprint"]:
            raise ShardJobError(plan_mismatch(dst.uri, old, plan))
    elif names:
        raise ShardJobError(f"{dst.uri} already contains {', '.join(names[:3])}… but no {PLAN}, so it "
                            "cannot be checked against this input. Re-run with --overwrite to replace them, "
                            "or choose another --output.")
    for n in names:  # stale temp files of a killed run
        if n.endswith(fs.TMP_SUFFIX) and not overwrite:
            fs.delete(dst.fs, dst.join(n))
    fs.write_bytes(dst.fs, plan_path, json_bytes(plan) + b"\n", only_if_changed=True)


def remove_temps(dst_fs, dst: str) -> None:
    for name in fs.list_dir(dst_fs, dst):
        if name.endswith(fs.TMP_SUFFIX) and is_ours(name):
            fs.delete(dst_fs, posixpath.join(dst, name))


_LIST = pa.list_(pa.int64())
STAGE1_SCHEMA = pa.schema([  # one row per input: the validation result (internal, cached for resume)
    ("idx", pa.int64()), ("source", pa.string()),
    ("stage", pa.string()), ("reason", pa.string()),  # null when the input is good
    ("ext", pa.string()), ("length", pa.int64()), ("label", pa.string()), ("meta", pa.string()),
    ("piece_start", _LIST), ("piece_end", _LIST), ("piece_tokens", _LIST),  # text only
])


def stage1_rows(**cols) -> pa.Table:
    """A STAGE1-schema table from column lists (missing columns are null)."""
    n = len(next(iter(cols.values())))
    return pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type) for f in STAGE1_SCHEMA},
                    schema=STAGE1_SCHEMA)


def load_stage1(dst_fs, dst: str, fingerprint: str) -> pa.Table | None:
    """Cached validation results, if they were made for this exact plan."""
    path = posixpath.join(dst, STAGE1)
    if not fs.exists(dst_fs, path):
        return None
    t = read_table(fs.read_bytes(dst_fs, path))
    return t if (t.schema.metadata or {}).get(b"fingerprint") == fingerprint.encode() else None


def save_stage1(dst_fs, dst: str, table: pa.Table, fingerprint: str) -> None:
    table = table.replace_schema_metadata({"fingerprint": fingerprint})
    fs.write_bytes(dst_fs, posixpath.join(dst, STAGE1), table_bytes(table))


def table_of(rows: list[tuple], schema: pa.Schema) -> pa.Table:
    """Row tuples → a table with exactly `schema` (also when there are no rows)."""
    cols = list(zip(*rows)) if rows else [[] for _ in schema]
    return pa.table([pa.array(c, f.type) for c, f in zip(cols, schema)], schema=schema)


def existing_shard(dst_fs, path: str, members: list[str]) -> list[int] | None:
    """Payload sizes of a shard already in place (None if absent); refuses one that differs from the plan."""
    if not fs.exists(dst_fs, path):
        return None
    try:
        with dst_fs.open_input_file(path) as f:
            index = read_tar_index(f)
    except Exception as e:  # unreadable tar: reported below as not matching the plan
        index = [("<unreadable>", str(e))]
    if [name for name, _ in index] != members:
        raise ShardJobError(f"{path} exists but does not hold the planned samples (first planned member "
                            f"{members[0]!r}); it was not written by this plan. Re-run with --overwrite.")
    return [size for name, size in index if not name.endswith(".json")]


def write_shard(dst_fs, path: str, samples: Iterable[tuple[str, str, bytes, dict]]) -> list[int]:
    """Write (key, payload ext, payload, json) samples to `path` atomically; returns payload sizes."""
    sizes = []

    def members():
        for key, ext, payload, meta in samples:
            sizes.append(len(payload))
            yield key, [(ext, payload), ("json", json_bytes(meta))]

    with fs.atomic_output(dst_fs, path) as f:
        write_tar(f, members())
    return sizes
