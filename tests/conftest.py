"""Shared fixtures.

Rules these fixtures enforce for the whole suite (tests/test_suite.py checks them):
- The independent references are dependencies of `make test`, never optional: a missing one fails the
  suite with the command that installs it (`require`), it is not skipped.
- Servers started here own their port: a port probed free can be taken before the server binds it, so
  each start confirms the bind from the server's own output and retries on a new port (`on_free_port`).
- MLflow's process-global tracking URI and the MLFLOW_* environment are restored after every test
  (`_restore_mlflow_globals`), so one test's store cannot leak into the next.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_HINT = "run `make setup` (installs the project with its dev extra and espeak-ng)"
T = TypeVar("T")


def require(module: str, why: str):
    """Import `module` or fail (never skip) naming it and how to install it: the reference tests are the point."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        error = err  # failed outside the except block: the message alone, not a chained traceback
    pytest.fail(f"{module} is required by `make test` ({why}) but cannot be imported ({error}); {SETUP_HINT} "
                f"or `.venv/bin/uv pip install --python .venv/bin/python -e '.[dev]'`", pytrace=False)


# ------------------------------------------------------------------------------------ mlflow isolation


@pytest.fixture(autouse=True)
def _restore_mlflow_globals() -> Iterator[None]:
    """Every test: MLflow's global URIs and MLFLOW_* variables are put back afterwards (see below).

    Session fixtures (mlflow_server) are set up before this one, so their URI is what gets restored."""
    with mlflow_globals_restored():
        yield


@contextmanager
def mlflow_globals_restored() -> Iterator[None]:
    """Put MLflow's global tracking/registry URI and every MLFLOW_* variable back as they were on entry.

    `mlflow.set_tracking_uri` (called by workers.tracking.client) sets a module global *and*
    os.environ["MLFLOW_TRACKING_URI"]; monkeypatch.setenv undoes only the variable, so a test pointed at an
    unreachable server would leave every later fluent call (mlflow.artifacts..., mlflow.start_run) on it.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    uris = _mlflow_uri_globals()
    try:
        yield
    finally:
        _restore(env, uris)


def _restore(env: dict[str, str], uris: dict | None) -> None:
    _set_mlflow_uri_globals(uris)  # first: mlflow's setters also write the environment, restored next
    for k in [k for k in os.environ if k.startswith("MLFLOW_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)


_URI_GLOBALS = (("mlflow.tracking._tracking_service.utils", "_tracking_uri"),
                ("mlflow.tracking._model_registry.utils", "_registry_uri"))


def _mlflow_uri_globals() -> dict | None:
    """The raw module globals behind mlflow.get_tracking_uri/get_registry_uri (None: mlflow not imported)."""
    if "mlflow" not in sys.modules:  # cheap for the many tests that never touch MLflow
        return None
    return {(m, a): getattr(importlib.import_module(m), a) for m, a in _URI_GLOBALS}


def _set_mlflow_uri_globals(saved: dict | None) -> None:
    if "mlflow" not in sys.modules:
        return
    for (m, a), value in (saved or dict.fromkeys(_URI_GLOBALS)).items():
        setattr(importlib.import_module(m), a, value)


# ----------------------------------------------------------------------------------------------- ports


def free_port() -> int:
    """A loopback port the kernel just reported free. Check-then-use: another process can bind it before
    the server does, so start servers through `on_free_port`, which confirms the bind and retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_free_port(start: Callable[[int], T | None], what: str, attempts: int = 4) -> tuple[int, T]:
    """Call start(port) on fresh free ports until it returns non-None (None: the port was taken meanwhile)."""
    for _ in range(attempts):
        port = free_port()
        started = start(port)
        if started is not None:
            return port, started
    raise RuntimeError(f"{what}: every one of {attempts} free ports was taken before the server could bind it")


def wait_for_start(proc: subprocess.Popen, log: Path, ready: str, port_taken: str, what: str,
                   timeout_s: float = 120) -> bool:
    """Poll a server's log: True once `ready` appears, False if `port_taken` appears or it exits with it
    (caller retries another port); any other exit or the timeout raises with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while True:
        exited = proc.poll() is not None  # before reading: an exited process's log is complete
        text = log.read_text(errors="replace")
        if re.search(port_taken, text):
            return False
        if re.search(ready, text) and not exited:
            return True
        if exited or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()}); {log}:\n{text[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that is guaranteed to refuse connections for the whole test.

    The socket is bound but never listens: Linux answers SYNs to it with RST (ECONNREFUSED), and while we
    hold the bind no other process can listen there. (Port 9 only refuses if nothing happens to serve it.)
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
        yield port


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (4 logical CPUs on this 2-core box: Train workers reserve one each; the dashboard serves the state API Ray Train polls), started once per test session and shut down after.

    Workers get the repository root on PYTHONPATH so they import `pipelines`/`workers` from this checkout.
    If a test session already runs Ray (e.g. RAY_ADDRESS or an earlier init), it is reused and left alone.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=4, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (sqlite backend, proxied artifacts); yields its URI.

    MLFLOW_TRACKING_URI is set for the whole session so the driver, Ray workers and clients all use it.
    """
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")

    def start(port: int):
        log_path = root / f"server-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=root,
            )
        # uvicorn logs this line only after *it* bound the port, so /health then answers from our process
        # (on a taken port it logs Errno 98 and exits 0)
        if wait_for_start(proc, log_path, rf"Uvicorn running on http://127\.0\.0\.1:{port}\b",
                          r"address already in use", "mlflow server"):
            return proc
        proc.kill()
        proc.wait()
        return None

    port, proc = on_free_port(start, "mlflow server")
    uri = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{uri}/health", timeout=10) as r:
        assert r.status == 200, f"mlflow server at {uri}: /health answered {r.status}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory, ray_local):
    """Factory: modality -> (demo corpus dir, shard dir), built once per session from the small demo corpus."""
    from pipelines.demo import build_demo
    from pipelines.shard import run_shard

    cache: dict[str, tuple] = {}

    def get(modality: str):
        if modality not in cache:
            root = tmp_path_factory.mktemp(f"demo-{modality}")
            build_demo(modality, root / "demo", size="small")
            run_shard(modality, str(root / "demo" / "pretrain"), str(root / "shards"), samples_per_shard=16,
                      block_size=128, vocab_size=512)
            cache[modality] = (root / "demo", root / "shards")
        return cache[modality]

    return get
