"""MLflow tracking and registry for d2v.

The driver owns the run (params, tags, artifacts, registration); rank 0 of the Train workers logs
metrics into that run by id through `MetricLogger`, which never crashes training when the server goes
away: it keeps a bounded backlog, retries, and reports what it had to drop.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("d2v.tracking")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "data2vec-{modality}"


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached; raised before any cluster time is spent."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the embedded default sqlite:///<repo>/mlflow.db (absolute: workers run elsewhere)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def default_artifact_root() -> str | None:
    """For a local sqlite store, artifacts go to <repo>/mlartifacts (absolute); servers choose their own."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def bounded_http_env() -> None:
    """Fail fast instead of MLflow's default minutes of retries (applies to this process)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client():
    import mlflow
    from mlflow import MlflowClient

    bounded_http_env()
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient(tracking_uri())


def check_reachable() -> None:
    """A cheap read against the tracking store; a clear error naming the URI if it fails."""
    uri = tracking_uri()
    try:
        client().search_experiments(max_results=1)
    except Exception as err:
        if re.search(r"\b(401|403)\b|Unauthorized|Forbidden|PERMISSION_DENIED|UNAUTHENTICATED", str(err)):
            raise TrackingUnavailable(  # credentials only from MLflow's standard variables, never from d2v flags
                f"MLflow tracking at {uri} refused the request ({str(err)[:200]}): it requires credentials. Set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the environment."
            ) from None
        raise TrackingUnavailable(
            f"MLflow tracking at {uri} is not reachable ({type(err).__name__}: {str(err)[:200]}). "
            "Start the server, fix MLFLOW_TRACKING_URI, or unset it to use the local sqlite store."
        ) from None


def experiment_id(name: str) -> str:
    """Id of experiment `name`, created if missing. Two drivers starting at once may both find it missing:
    the one whose create loses the race (RESOURCE_ALREADY_EXISTS) reads the winner's."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name, artifact_location=default_artifact_root())
    except MlflowException as err:
        exp = c.get_experiment_by_name(name)
        if exp is None or "ALREADY_EXISTS" not in f"{err.error_code} {err}":
            raise
        return exp.experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def register_checkpoint(run_id: str, artifact_path: str, modality: str, tags: dict[str, str] | None = None,
                        **kwargs) -> tuple[str, str]:
    """New version of data2vec-<modality> (an MLflow pyfunc Model) from the run's logged checkpoint dir; alias
    'candidate' -> it. See workers/registry/register.py (kwargs: local_dir, name)."""
    from .registry.register import register_checkpoint as register

    return register(run_id, artifact_path, modality, tags, **kwargs)


class MetricLogger:
    """Rank-0 metric logging into an existing run; survives an unreachable server.

    Metrics that fail to send are kept (up to `max_backlog` points, oldest dropped first) and retried
    at the next call; `close()` makes a last attempt and returns (sent, dropped) counts.
    """

    def __init__(self, run_id: str, max_backlog: int = 50_000, retry_every_s: float = 30.0) -> None:
        from mlflow.entities import Metric

        self._Metric = Metric
        self.run_id = run_id
        self.client = client()
        self.backlog: list = []
        self.max_backlog = max_backlog
        self.retry_every_s = retry_every_s
        self._next_try = 0.0
        self.sent = 0
        self.dropped = 0
        self.held = 0  # points handed to `close(spool=...)` for a later `d2v register`
        self._warned = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        self.backlog += [self._Metric(k, float(v), ts, step) for k, v in metrics.items()]
        if len(self.backlog) > self.max_backlog:
            over = len(self.backlog) - self.max_backlog
            self.backlog = self.backlog[over:]
            self.dropped += over
        if time.monotonic() >= self._next_try:
            self.flush()

    def flush(self) -> bool:
        while self.backlog:
            chunk = self.backlog[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=chunk)
            except Exception as err:
                self._next_try = time.monotonic() + self.retry_every_s
                if not self._warned:
                    log.warning(
                        "MLflow unreachable (%s); training continues, %d metric points held for retry",
                        type(err).__name__, len(self.backlog),
                    )
                    self._warned = True
                return False
            self.backlog = self.backlog[len(chunk):]
            self.sent += len(chunk)
        if self._warned:
            log.warning("MLflow reachable again; backlog sent")
            self._warned = False
        return True

    def close(self, spool=None) -> tuple[int, int]:
        """Last attempt -> (sent, dropped). spool(points) -> where: keeps what is still unsent (for `d2v register`)
        instead of dropping it; if it fails too, the points count as dropped."""
        ok = self.flush()
        if not ok and spool is not None:
            try:
                where = spool(self.backlog)
            except Exception as err:  # noqa: BLE001 -- storage trouble too: fall through to dropping
                log.warning("could not keep the unsent metric points (%s: %s)", type(err).__name__, err)
            else:
                log.warning("MLflow still unreachable at the end: %d metric points kept in %s", len(self.backlog), where)
                self.held, self.backlog = len(self.backlog), []
        if not ok and self.backlog:
            self.dropped += len(self.backlog)
            log.warning("MLflow still unreachable at the end: dropped %d metric points", len(self.backlog))
            self.backlog = []
        return self.sent, self.dropped


def log_curves(c, run_id: str, ckpt: Path, draw) -> None:
    """`draw(plt, history) -> figure` over the checkpoint's `state.json` history, logged as `curves.png`
    (nothing when the checkpoint has no history)."""
    try:
        history = json.loads((Path(ckpt) / "state.json").read_text()).get("history", [])
    except (OSError, json.JSONDecodeError):
        return
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt, history)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        c.log_artifact(run_id, str(path))

