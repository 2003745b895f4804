"""Filesystem layer: one API over local paths and pyarrow filesystem URIs (file://, s3://, gs://).

Everything the shard job touches goes through a `Location` (a pyarrow FileSystem plus a path inside it),
so the same code writes to a local folder or an object store. Writes are atomic: data goes to
`<path>.tmp` and is moved into place only when complete, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyarrow.fs as pafs

TMP_SUFFIX = ".tmp"  # `<final name>.tmp` while a file is being written; removed or replaced on rerun

# The standard variables of the S3/GCS clients (which pyarrow's filesystems read: AWS_ENDPOINT_URL for MinIO
# or any S3-compatible server) and of MLflow: what a job on a remote cluster needs to reach the same stores.
CLUSTER_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS",
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "D2V_STORAGE",
)
# What a job's code upload (runtime_env working_dir) leaves out: environments, data, run outputs, VCS.
SHIP_EXCLUDES = (".venv/", "data/", "runs/", "mlartifacts/", "mlflow.db", ".git/", "*.tar", "__pycache__/")


def cluster_env() -> dict[str, str]:
    """The variables of CLUSTER_ENV set here, for a Ray job's runtime_env env_vars."""
    return {k: os.environ[k] for k in CLUSTER_ENV if os.environ.get(k)}


def cluster_runtime_env(code_root: str) -> dict | None:
    """runtime_env for a driver that connects to a running cluster: the code under `code_root` and the
    variables of cluster_env(). None inside a job submitted through the Jobs API: it has both already, and
    Ray refuses to merge a driver's runtime_env with the job's when they share fields."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor for the entrypoint
        return None
    return {"working_dir": code_root, "excludes": list(SHIP_EXCLUDES), "env_vars": cluster_env()}


@dataclass(frozen=True)
class Location:
    """A folder or file: `fs` is the pyarrow filesystem, `path` the path inside it, `uri` what the user wrote."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)


@dataclass(frozen=True)
class FileEntry:
    """One listed input file: `rel` is its path relative to the listed root, with '/' separators."""

    rel: str
    size: int
    mtime_ns: int


def resolve(uri: str) -> Location:
    """A local path (relative or absolute) or a URI understood by `pyarrow.fs.FileSystem.from_uri`."""
    if "://" in uri:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for unknown schemes or bad URIs
            raise ValueError(f"cannot open {uri!r} as a filesystem URI ({e}); "
                             "use a local path or a file://, s3://, gs:// URI") from e
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return Location(fs, path.rstrip("/") or "/", uri)


def list_files(loc: Location) -> tuple[str, list[FileEntry]]:
    """Sorted listing of every file under `loc` (recursively); a single file lists as itself.

    Returns (root, entries) where each entry's `rel` is relative to `root`.
    """
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {loc.uri} does not exist")
    if info.type == pafs.FileType.File:
        root = posixpath.dirname(loc.path)
        return root, [FileEntry(posixpath.basename(loc.path), info.size, info.mtime_ns or 0)]
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    prefix = loc.path.rstrip("/") + "/"
    entries = [
        FileEntry(i.path[len(prefix):], i.size, i.mtime_ns or 0)
        for i in infos
        if i.type == pafs.FileType.File
    ]
    return loc.path, sorted(entries, key=lambda e: e.rel)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def read_range(fs: pafs.FileSystem, path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file (ranged GET on object stores)."""
    with fs.open_input_file(path) as f:
        return f.read_at(end - start, start)


def delete(fs: pafs.FileSystem, path: str) -> bool:
    """Delete a file if it exists; True when something was removed."""
    try:
        fs.delete_file(path)
        return True
    except FileNotFoundError:
        return False


def list_dir(fs: pafs.FileSystem, path: str) -> list[str]:
    """Names of the files directly inside a folder ([] when the folder does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.File)


@contextmanager
def atomic_output(fs: pafs.FileSystem, path: str) -> Iterator[pafs.NativeFile]:
    """Write `path` via `path.tmp` + move, so the final name only ever holds a complete file.

    A stale `path.tmp` from an interrupted run is simply overwritten. On error the temp file is removed.
    """
    tmp = path + TMP_SUFFIX
    try:
        with fs.open_output_stream(tmp, compression=None) as f:
            yield f
        fs.move(tmp, path)  # rename(2) locally: atomic, replaces an existing file
    except BaseException:
        delete(fs, tmp)
        raise


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes, *, only_if_changed: bool = False) -> bool:
    """Atomically write `data`; with only_if_changed, leave an identical file untouched (mtime kept).

    Returns True when the file was (re)written.
    """
    if only_if_changed and exists(fs, path) and read_bytes(fs, path) == data:
        return False
    with atomic_output(fs, path) as f:
        f.write(data)
    return True
