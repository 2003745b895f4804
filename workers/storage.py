"""Where a run's data and outputs live: a local folder or an object store (s3://, gs://), one code path.

    inspect_data("vision", "s3://bucket/shards/vision") -> DataInfo(shards=["s3://bucket/.../vision-000000.tar", ...])

Object stores are reached through pyarrow's filesystems (pipelines/fs.py), which read the standard
variables the way every AWS/GCS tool does: AWS_ENDPOINT_URL (MinIO, Ceph, a loopback S3 server),
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_DEFAULT_REGION; for GCS
GOOGLE_APPLICATION_CREDENTIALS. d2v has no storage options of its own: what `aws s3 ls` reaches, d2v reaches.

A job on a remote cluster runs where those variables may not be set, so `fs.cluster_env()` is what d2v hands
to every Ray job it starts or submits (runtime_env env_vars): the storage and tracking variables of the
submitting shell, and nothing else.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipelines import fs
from pipelines import manifest as mf
from pipelines.fs import CLUSTER_ENV, cluster_env  # noqa: F401 (the storage API in one place)


class DataError(ValueError):
    """The shard directory does not fit the run (missing manifest, wrong modality, no tokenizer...)."""


@dataclass
class DataInfo:
    root: str | Path  # a local absolute path, or the URI as given (s3://bucket/prefix)
    shards: list[str]  # local paths or URIs, what the loader opens
    num_samples: int
    fingerprint: str
    tokenizer: str | Path | None  # text: tokenizer.json beside the shards (a path or a URI)


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def display(path: str | Path) -> str:
    """A URI as given, a local path made absolute (what summaries and MLflow tags show)."""
    return str(path) if is_uri(path) else str(Path(path).resolve())


def inspect_data(modality: str, data: str | Path) -> DataInfo:
    """Read DST/stats.json + manifest, locally or from an object store; errors name the path at fault and
    what to do. Nothing is downloaded but stats.json and a listing."""
    loc = fs.resolve(str(data))
    hint = f"run `d2v shard {modality} --input SRC --output {data}` first"
    try:
        names = fs.list_dir(loc.fs, loc.path)
    except OSError as err:  # unreachable store, bad credentials: say which and what to check
        raise DataError(f"--data {data}: cannot list it ({err}); check the path and, for object storage, "
                        "AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
    if not names and not (loc.is_local() and Path(loc.path).is_dir()):
        raise DataError(f"--data {data}: no such directory; {hint}")
    for name in (mf.STATS, mf.MANIFEST):
        if name not in names:
            raise DataError(f"--data {data}: {name} is missing, so this is not a finished shard set; {hint}")
    stats_path = f"{str(data).rstrip('/')}/{mf.STATS}"
    try:
        stats = json.loads(fs.read_bytes(loc.fs, loc.join(mf.STATS)))
    except json.JSONDecodeError as err:
        raise DataError(f"{stats_path}: unreadable ({err}); re-run the shard job") from None
    if stats.get("modality") != modality:
        raise DataError(f"{stats_path}: shards are {stats.get('modality')!r} data, not {modality!r}")
    shards = [_child(loc, n) for n in names if n.startswith(f"{modality}-") and n.endswith(".tar")]
    if not shards:
        raise DataError(f"--data {data}: no {modality}-*.tar shards; {hint}")
    n = int(stats.get("samples", 0))
    if n <= 0:
        raise DataError(f"{stats_path}: the shard set has no samples (see rejects.parquet for why)")
    tok = None
    if modality == "text":
        if mf.TOKENIZER not in names:
            raise DataError(f"--data {data}: text shards need tokenizer.json beside them; re-run the shard job")
        tok = _child(loc, mf.TOKENIZER)
    fp = str(stats.get("fingerprint") or stats.get("input_fingerprint") or "")
    return DataInfo(Path(loc.path) if loc.is_local() else loc.uri.rstrip("/"), shards, n, fp, tok)


def _child(loc: fs.Location, name: str) -> str:
    """A file in `loc` as the loader opens it: a local path, or the URI with the user's scheme."""
    return loc.join(name) if loc.is_local() else f"{loc.uri.rstrip('/')}/{name}"


def read_text(path: str | Path) -> str:
    loc = fs.resolve(str(path))
    return fs.read_bytes(loc.fs, loc.path).decode("utf-8")


def local_copy(path: str | Path | None) -> Path | None:
    """A local file with the contents of `path`: itself when local, else a temp copy (small files only,
    e.g. tokenizer.json, which each checkpoint carries)."""
    if path is None or not is_uri(path):
        return Path(path) if path is not None else None
    fd, tmp = tempfile.mkstemp(prefix="d2v-", suffix="-" + os.path.basename(str(path)))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(read_text(path))
    return Path(tmp)
