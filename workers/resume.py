"""Resuming a run under its name: which config changes may happen on resume, and which refuse; which
checkpoint in storage is whole enough to resume from; how a run that cannot go on ends (exit codes).

A resumed run continues the same trajectory (weights, optimiser moments, data position), so anything that
changes the model, the objective, the data stream or the batch would silently mix two experiments in one
run. Only the fields below may differ; they change how long the run goes and how it reports, not what one
update computes. (train.max_steps also stretches the LR schedule from the resume point on, which is what
asking for a longer run means.) No ray / mlflow here: the driver and the training loop both call it.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import yaml

from model.config import Config, ConfigError

# Fields that may change when a run resumes; everything else in the Config must match.
SAFE_FIELDS = (
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.max_failures",
    "train.collapse_min_target_var", "train.collapse_min_pred_var", "train.collapse_after",
)
_UNSET = "(unset)"


class ResumeConflict(ConfigError):
    """The run being resumed was started with values that the new invocation changes unsafely."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] for every field that differs, sorted by field.

    A field present on one side only (a masking kind switched, so its fields differ) shows as "(unset)".
    """
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    pairs = ((k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(a.keys() | b.keys()))
    return [(k, o, n) for k, o, n in pairs if o != n]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    """'train.max_steps: 16 -> 20; ...' (or '' for no change)."""
    return "; ".join(f"{k}: {o} -> {n}" for k, o, n in changes)


def check_resume(
    what: str, old: Config, new: Config, extra: list[tuple[str, Any, Any]] = ()
) -> list[tuple[str, Any, Any]]:
    """The safe changes between the run's config and the new one; raises ResumeConflict naming the rest.

    what: names the resumed thing in the message ("run 'NAME'", "checkpoint DIR").
    extra: (name, old, new) of run settings outside the Config that must not change (e.g. --workers, the
    data fingerprint); they are refused when old != new.
    """
    changes = config_changes(old, new)
    unsafe = [c for c in changes if c[0] not in SAFE_FIELDS] + [c for c in extra if c[1] != c[2]]
    if unsafe:
        raise ResumeConflict(
            f"{what} was started with other values; resuming it would mix two experiments. "
            f"Changed: {describe(unsafe)}. Resume with the run's values, or start a new run (another "
            f"--run-name). Fields that may change on resume: {', '.join(SAFE_FIELDS)}."
        )
    return [c for c in changes if c[0] in SAFE_FIELDS]


# ------------------------------------------------------------------------------ checkpoints in storage
# A checkpoint directory in run storage is <storage>/<run>/step_NNNNNNNN (".G" appended when a resume that
# fell back past torn checkpoints writes the same step again: Ray Train deletes old checkpoints by path, so
# a new one must never reuse a torn one's name). These checks read headers and sizes only, through any
# pyarrow filesystem (local, s3://, gs://), so the driver and each worker can run them cheaply.
REQUIRED = ("model.safetensors", "teacher.safetensors", "config.yaml", "state.json", "optimizer.pt")
_NAME = re.compile(r"^step_(\d{8})(?:\.(\d+))?$")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """'step_00000012' -> (12, 0), 'step_00000012.1' -> (12, 1); None for anything else."""
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def checkpoint_problem(fs, path: str) -> str | None:
    """Why the checkpoint directory `path` on pyarrow filesystem `fs` cannot be resumed from, or None if whole.

    Whole = every file the loop loads is present, each safetensors file is exactly as long as its header
    says, optimizer.pt ends with its zip directory, state.json and config.yaml parse."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = {i.base_name: i for i in fs.get_file_info(FileSelector(path)) if i.type == FileType.File}
    except (OSError, ValueError) as err:
        return f"cannot list it ({err})"
    missing = [f for f in REQUIRED if f not in infos]
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    try:
        for name in ("model.safetensors", "teacher.safetensors"):
            if (why := _safetensors_problem(fs, f"{path}/{name}", infos[name].size)) is not None:
                return f"{name} {why}"
        with fs.open_input_file(f"{path}/optimizer.pt") as f:
            size = infos["optimizer.pt"].size
            f.seek(max(0, size - 65_558))  # the zip end-of-central-directory record sits in the last 64 KiB
            if b"PK\x05\x06" not in f.read():
                return "optimizer.pt is truncated (no zip directory at its end)"
        with fs.open_input_file(f"{path}/state.json") as f:
            state = json.loads(f.read())
        int(state["step"])
        with fs.open_input_file(f"{path}/config.yaml") as f:
            if not isinstance(yaml.safe_load(f.read()), dict):
                return "config.yaml is not a mapping"
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        return f"unreadable ({type(err).__name__}: {str(err)[:120]})"
    return None


def _safetensors_problem(fs, path: str, size: int) -> str | None:
    """safetensors = u64 header length + JSON header + data; the header's largest end offset fixes the size."""
    with fs.open_input_file(path) as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes)"
        n = struct.unpack("<Q", head)[0]
        if 8 + n > size:
            return f"is truncated ({size} bytes, header alone needs {8 + n})"
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"is truncated ({size} of {8 + n + end} bytes)"
    return None


def storage_fs(uri_or_path: str):
    """(pyarrow filesystem, path on it) for a local path or a URI (s3://, gs://, file://)."""
    import pyarrow.fs as pafs

    if "://" in uri_or_path:
        return pafs.FileSystem.from_uri(uri_or_path)
    return pafs.LocalFileSystem(), str(uri_or_path)


def list_checkpoints(fs, run_dir: str) -> list[str]:
    """Checkpoint directory names under run_dir, newest first (by step, then generation)."""
    from pyarrow.fs import FileSelector, FileType

    try:
        infos = fs.get_file_info(FileSelector(run_dir, allow_not_found=True))
    except (OSError, ValueError):
        return []
    names = [i.base_name for i in infos if i.type == FileType.Directory and checkpoint_order(i.base_name)]
    return sorted(names, key=checkpoint_order, reverse=True)


def newest_whole(fs, run_dir: str, newest: str | None = None) -> tuple[str | None, list[tuple[str, str]]]:
    """(name of the newest whole checkpoint at or before `newest` (default: all), [(skipped name, why)]).

    `newest` is the checkpoint Ray Train would resume from; a torn one (truncated by a dying node, a file
    lost in storage) is skipped for the one before it instead of failing every restart the same way."""
    skipped: list[tuple[str, str]] = []
    limit = checkpoint_order(newest) if newest else None
    for name in list_checkpoints(fs, run_dir):
        if limit is not None and checkpoint_order(name) > limit:
            continue
        why = checkpoint_problem(fs, f"{run_dir}/{name}")
        if why is None:
            return name, skipped
        skipped.append((name, why))
    return None, skipped


def next_name(step: int, existing: set[str]) -> str:
    """The directory name for a new checkpoint at `step` that no existing (torn) checkpoint uses."""
    name, gen = f"step_{step:08d}", 0
    while name in existing:
        gen += 1
        name = f"step_{step:08d}.{gen}"
    return name


# ------------------------------------------------------------------------------------ how a run ends
# `d2v pretrain` exit codes (workers/cli.py maps the exceptions; README lists them):
EXIT_CODES = {
    0: "finished: checkpoint logged, model registered, MLflow run FINISHED",
    1: "a failed `d2v workflow` stage, or an unexpected error (a bug: Python prints its traceback)",
    2: "usage: bad config / data / arguments, resume conflict, tracking unreachable or refusing credentials "
       "at the start (all before any cluster time)",
    3: "training stopped itself (NaN/Inf loss, representation collapse); MLflow run FAILED",
    4: "Train workers failed more than train.max_failures times; MLflow run FAILED",
    5: "training finished but the MLflow server was unreachable at the end; `d2v register` records it",
    6: "nothing to do: the run already reached train.max_steps; MLflow run left FINISHED",
}


class FailuresExhausted(RuntimeError):
    """Ray Train gave up: the worker group failed more often than train.max_failures allows."""


class AlreadyComplete(RuntimeError):
    """The named run's newest whole checkpoint is at or past train.max_steps."""


class RecordPending(RuntimeError):
    """Training finished, but the tracking server could not be reached to record and register it."""


def one_line(err: BaseException | str, limit: int = 400) -> str:
    """The gist of an error for a one-paragraph message: its last 'SomeError: ...' line, not the traceback."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    gist = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Exit|Died)\b.*:", ln)]
    text = (gist or lines or [type(err).__name__])[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
