"""How a pretraining run ends when it cannot simply finish, and `d2v register` for a run whose tracking server
was away at the end. Each ending is one exception with a one-paragraph message (workers/cli.py maps it to its
exit code, resume.EXIT_CODES) and, where the server answers, the reason as MLflow tag `d2v.end_reason`.

- refuse_if_complete: the run's newest whole checkpoint already reached train.max_steps -> AlreadyComplete,
  before any cluster time; the MLflow run keeps its status.
- raise_if_failures_exhausted: Ray Train gave up (more than train.max_failures worker-group failures) ->
  FailuresExhausted; the MLflow run FAILED.
- raise_if_tracking_lost: training finished but MLflow cannot be reached -> RecordPending naming the
  `d2v register` command. Rank 0 kept the metric points it could not send in
  <storage>/<run>/unsent_metrics-*.jsonl (write_unsent), which `d2v register` sends.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from pathlib import Path

from model.config import ConfigError

from . import tracking
from .resume import (AlreadyComplete, FailuresExhausted, RecordPending, checkpoint_order, newest_whole, one_line,
                     storage_fs)

END_TAG = "d2v.end_reason"
UNSENT_PREFIX = "unsent_metrics-"


class RegisterError(ConfigError):
    """`d2v register` cannot find the run or a whole checkpoint of it."""


def end_run(run_id: str, status: str | None, reason: str) -> str:
    """Tag the reason and set the status (None: leave it); -> what was done, for the error message."""
    try:
        c = tracking.client()
        c.set_tag(run_id, END_TAG, reason[:5000])
        if status is not None:
            c.set_terminated(run_id, status=status)
        return f"MLflow run {run_id} {'marked ' + status if status else 'tagged'} ({END_TAG})"
    except Exception as err:  # noqa: BLE001 -- the ending must still be reported on the console
        return f"MLflow run {run_id} could not be marked ({type(err).__name__}: server unreachable?)"


def _run_dir(storage_path: str, run_name: str) -> tuple[object, str, str]:
    """(filesystem, path on it, what to show) of <storage>/<run>."""
    fs, root = storage_fs(storage_path)
    return fs, f"{root.rstrip('/')}/{run_name}", f"{storage_path.rstrip('/')}/{run_name}"


def register_command(run_name: str, storage_path: str) -> str:
    return f"d2v register {shlex.quote(run_name)} --storage {shlex.quote(storage_path)}"


def _find_run(c, run_name: str):
    """The MLflow runs of d2v pretraining named run_name (tag d2v.run_name), over the d2v-<modality> experiments."""
    exps = [e.experiment_id for e in c.search_experiments(filter_string="name LIKE 'd2v-%'")]
    return c.search_runs(exps, filter_string=f"tags.`d2v.run_name` = '{run_name}'") if exps else []


# ------------------------------------------------------------------------------------------- endings
def refuse_if_complete(cfg, run_name: str, modality: str, storage_path: str) -> None:
    """Before any cluster time: a run already at train.max_steps has nothing to train (AlreadyComplete)."""
    fs, run_dir, shown = _run_dir(storage_path, run_name)
    name, _ = newest_whole(fs, run_dir)
    if name is None or checkpoint_order(name)[0] < cfg.train.max_steps:
        return
    step = checkpoint_order(name)[0]
    reason = f"train.max_steps={cfg.train.max_steps} already reached: checkpoint {name} is at step {step}"
    runs = _find_run(tracking.client(), run_name)
    if runs and runs[0].info.status == "FINISHED":
        tail = f"{end_run(runs[0].info.run_id, None, reason)}, left FINISHED."
    elif runs:
        end_run(runs[0].info.run_id, None, reason)
        tail = (f"Its MLflow run is {runs[0].info.status}, not recorded as finished: record and register it with "
                f"`{register_command(run_name, storage_path)}`.")
    else:
        tail = "No MLflow run of that name was found on this tracking server."
    raise AlreadyComplete(f"run {run_name!r}: nothing to train: {reason} ({shown}). To train it further, resume "
                          f"with a larger --set train.max_steps=N (N > {step}); for a new run use another "
                          f"--run-name. {tail}")


def raise_if_failures_exhausted(err: Exception, cfg, run_id: str, run_name: str, storage_path: str) -> None:
    """Ray Train's TrainingFailedError (restarts used up) -> FailuresExhausted; any other error: return."""
    from ray.train import TrainingFailedError

    from .pretrain import run_log_path

    if not isinstance(err, TrainingFailedError):
        return
    fs, run_dir, shown = _run_dir(storage_path, run_name)
    name, _ = newest_whole(fs, run_dir)
    kept = f"the last whole checkpoint, {name}, is kept in {shown}" if name else "no whole checkpoint was written"
    reason = (f"the Train worker group failed more than train.max_failures={cfg.train.max_failures} times; "
              f"last error: {one_line(err)}")
    marked = end_run(run_id, "FAILED", reason)
    raise FailuresExhausted(
        f"training run {run_name!r} gave up: {reason}. {kept[0].upper()}{kept[1:]}; {marked}. Re-run the same "
        f"command to resume from it (--set train.max_failures=N allows more restarts); the workers' tracebacks are "
        f"in {run_log_path(storage_path, run_name)}.") from None


def raise_if_tracking_lost(err: Exception, result, run_name: str, storage_path: str) -> None:
    """An error while recording a finished run, with MLflow unreachable -> RecordPending; otherwise return."""
    from .train import TrainingStopped

    if isinstance(err, (TrainingStopped, FailuresExhausted)) or result is None or result.checkpoint is None:
        return
    try:
        tracking.check_reachable()
        return  # the server answers: a real error, not ours to translate
    except tracking.TrackingUnavailable:
        pass
    step = (result.metrics or {}).get("step", "?")
    raise RecordPending(
        f"training run {run_name!r} finished (step {step}, checkpoint {result.checkpoint.path}), but MLflow at "
        f"{tracking.tracking_uri()} cannot be reached ({one_line(err)}), so the run is not marked FINISHED and no "
        f"model version is registered yet; metric points it could not take are kept beside the checkpoints. When "
        f"the server is back, record and register it with: {register_command(run_name, storage_path)}") from None


# --------------------------------------------------------------------------------- unsent metrics
def write_unsent(run_dir: str, points: list) -> str:
    """Rank 0's metric points MLflow did not take (mlflow Metric entities) -> a new JSON-lines file in run_dir."""
    fs, root = storage_fs(run_dir)
    fs.create_dir(root, recursive=True)
    name = f"{UNSENT_PREFIX}{time.time_ns()}.jsonl"
    lines = [json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) for m in points]
    with fs.open_output_stream(f"{root}/{name}.tmp") as f:  # then renamed: `d2v register` never reads half a file
        f.write(("\n".join(lines) + "\n").encode())
    fs.move(f"{root}/{name}.tmp", f"{root}/{name}")
    return f"{run_dir.rstrip('/')}/{name}"


def send_unsent(c, run_id: str, fs, run_dir: str) -> int:
    """Log every kept metric point into the run, deleting each file once sent; -> points sent."""
    from mlflow.entities import Metric
    from pyarrow.fs import FileSelector

    sent = 0
    for info in fs.get_file_info(FileSelector(run_dir, allow_not_found=True)):
        if not (info.base_name.startswith(UNSENT_PREFIX) and info.base_name.endswith(".jsonl")):
            continue
        with fs.open_input_file(info.path) as f:
            rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        points = [Metric(r["key"], float(r["value"]), int(r["timestamp"]), int(r["step"])) for r in rows]
        for i in range(0, len(points), 1000):
            c.log_batch(run_id, metrics=points[i : i + 1000])
        fs.delete_file(info.path)
        sent += len(points)
    return sent


# ------------------------------------------------------------------------------------------ d2v register
def register_run(run_name: str, storage: str | None = None) -> dict:
    """`d2v register RUN`: record a finished run whose tracking server was away at the end: the kept metric
    points, the newest whole checkpoint as artifacts and curves, its registered version, FINISHED."""
    from model.checkpoint import load_config

    from .pretrain import _storage_path, record_finished

    tracking.check_reachable()
    c = tracking.client()
    runs = _find_run(c, run_name)
    if len(runs) != 1:
        raise RegisterError(f"{len(runs)} MLflow runs are named {run_name!r} (tag d2v.run_name) at "
                            f"{tracking.tracking_uri()}; expected exactly one. Check the name and MLFLOW_TRACKING_URI")
    run = runs[0]
    storage_path = _storage_path(storage)
    fs, run_dir, shown = _run_dir(storage_path, run_name)
    name, skipped = newest_whole(fs, run_dir)
    if name is None:
        why = "; ".join(f"{n}: {w}" for n, w in skipped) or "none there"
        raise RegisterError(f"{shown}: no whole checkpoint of run {run_name!r} ({why}); give the run's --storage")
    sent = send_unsent(c, run.info.run_id, fs, run_dir)
    with tempfile.TemporaryDirectory(prefix="d2v-register-") as tmp:
        if fs.type_name == "local":
            d = Path(run_dir) / name
        else:
            from pyarrow.fs import LocalFileSystem, copy_files

            d = Path(tmp) / name
            copy_files(f"{run_dir}/{name}", str(d), source_filesystem=fs, destination_filesystem=LocalFileSystem())
        state = json.loads((d / "state.json").read_text())
        history = state.get("history") or [{}]
        metrics = {"step": int(state["step"]), **({"loss": history[-1]["loss"]} if "loss" in history[-1] else {})}
        tags = run.data.tags
        out = record_finished(load_config(d), run.info.run_id, run_name, tags.get("modality", ""),
                              tags.get("data_fingerprint", ""), d, metrics, register=True)
    c.set_tag(run.info.run_id, "d2v.recorded_by", f"d2v register ({name})")
    return {"run_name": run_name, "run_id": run.info.run_id, "checkpoint": f"{shown}/{name}",
            "metrics_sent": sent, **metrics, **out}
