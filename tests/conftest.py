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
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


# MLflow >= 3.5's server starts a job runner with seven huey consumer processes (GenAI jobs, unused by d2v) that
# import MLflow and poll continuously: ~20 CPU-s per start and ~17 % of a core while it runs, on a 2-core box
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(root: Path, artifacts: str) -> tuple[str, subprocess.Popen]:
    """`mlflow server` on a free loopback port (sqlite backend in `root`, proxied artifacts in `artifacts`: a
    folder or s3://...); returns (uri, process) once /health answers."""
    import urllib.request

    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")

    def start(port: int):
        log_path = root / f"server-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
                 "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                stdout=log, stderr=subprocess.STDOUT, cwd=root, env={**os.environ, **NO_JOB_RUNNER},
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
    return uri, proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (sqlite backend, proxied artifacts); yields its URI.

    MLFLOW_TRACKING_URI is set for the whole session so the driver, Ray workers and clients all use it.
    """
    root = tmp_path_factory.mktemp("mlflow")
    uri, proc = start_mlflow_server(root, str(root / "artifacts"))
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
        stop(proc)


# ------------------------------------------------------------------------------------- object storage
S3_BUCKET = "d2v-test"


@dataclass(frozen=True)
class S3Server:
    url: str  # what AWS_ENDPOINT_URL holds
    bucket: str
    log: Path  # the server's request log: one line per S3 call ("GET /bucket/key HTTP/1.1" 200)

S3_ENV = {"AWS_ACCESS_KEY_ID": "d2v-test-key", "AWS_SECRET_ACCESS_KEY": "d2v-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A real S3-compatible server (moto's `moto_server`) on loopback with bucket S3_BUCKET.

    For the rest of the session the standard variables point at it (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION), exactly as users point d2v at MinIO: d2v has no other
    storage setting. Its request log (`.log`) shows which objects were read.
    """
    require("moto", "the S3-compatible server of the object-storage tests")
    boto3 = require("boto3", "the independent S3 client that checks what d2v stored")
    root = tmp_path_factory.mktemp("s3")
    server_bin = os.path.join(os.path.dirname(sys.executable), "moto_server")

    def start(port: int):
        log_path = root / f"moto-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([server_bin, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                    stderr=subprocess.STDOUT, cwd=root)
        if wait_for_start(proc, log_path, rf"Running on http://127\.0\.0\.1:{port}\b",
                          r"Address already in use", "moto_server"):
            return proc, log_path
        stop(proc)
        return None

    port, (proc, log_path) = on_free_port(start, "moto_server")
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", *S3_ENV)}
    os.environ.update({"AWS_ENDPOINT_URL": url, **S3_ENV})
    try:
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield S3Server(url, S3_BUCKET, log_path)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop(proc)


@pytest.fixture(scope="session")
def mlflow_s3_server(tmp_path_factory, s3_server) -> str:
    """A second `mlflow server` whose artifacts live in the S3 server (s3://S3_BUCKET/mlartifacts), reached by
    it through the AWS_* variables alone; yields its URI (MLFLOW_TRACKING_URI is left to the test)."""
    root = tmp_path_factory.mktemp("mlflow-s3")
    uri, proc = start_mlflow_server(root, f"s3://{s3_server.bucket}/mlartifacts")
    try:
        yield uri
    finally:
        stop(proc)


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


# ------------------------------------------------------------------------------------ two-node cluster
@dataclass(frozen=True)
class RayCluster:
    address: str  # the GCS form of RAY_ADDRESS: 127.0.0.1:<port>
    dashboard: str  # the Jobs API form: http://127.0.0.1:<port>
    env: dict  # what every client of this cluster needs (its auth token) on top of os.environ
    nodes: dict  # custom resource ("head", "node2") -> Ray node id
    procs: dict  # "head" / "node2" -> the `ray start --block` process; each leads its own process group


def _wait_for_job_agent(dashboard: str, token: str, temp_dir: str, timeout_s: float = 90) -> None:
    """Until the head's job agent runs a trivial job: the dashboard answers before its agent registers, and a
    loaded machine can take a minute more ("No available agent to submit job"). Fails with the agent's log."""
    import urllib.error
    import urllib.request

    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call(path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(dashboard + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    deadline, job_id, last = time.monotonic() + timeout_s, None, ""
    while time.monotonic() < deadline:
        try:
            if job_id is None:
                job_id = call("/api/jobs/", {"entrypoint": "true"})["submission_id"]
            status = call(f"/api/jobs/{job_id}")["status"]
            if status == "SUCCEEDED":
                return
            if status in ("FAILED", "STOPPED"):
                job_id, last = None, f"probe job {status}"
        except (OSError, urllib.error.HTTPError, KeyError, ValueError) as err:
            last = repr(err)
        time.sleep(1)
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent*.log"))
    tail = logs[-1].read_text(errors="replace")[-3000:] if logs else "(no dashboard_agent log)"
    raise RuntimeError(f"the head's Ray job agent never ran a job in {timeout_s:.0f} s ({last}); agent log:\n{tail}")


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory) -> Iterator[RayCluster]:
    """A real two-node Ray cluster on loopback: `ray start --head` (1 CPU, resource "head", dashboard + Jobs
    API) and `ray start --address` (1 CPU, resource "node2"), with token authentication as Ray >= 2.59 sets
    it up. One CPU per node: two Train workers (one CPU each) must land on different nodes.

    The nodes' environment has no AWS_* / MLFLOW_* variables: whatever a job needs to reach storage and
    tracking must travel with it (runtime_env env_vars), as on a real cluster. Killing a node = SIGKILL to
    its process group (`procs[...]`); teardown does that for both, so no Ray process outlives the session.
    """
    import secrets
    import shutil
    import signal
    import tempfile
    import urllib.request

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    node_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    node_env.update(auth, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    procs: dict[str, subprocess.Popen] = {}

    def kill(p: subprocess.Popen) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # gcs, raylet, dashboard, workers: the whole session of that node
        except ProcessLookupError:
            pass
        p.wait(timeout=60)

    def launch(name: str, args: list[str], ready: str, taken: str):
        log = Path(temp_dir) / f"{name}.log"
        with open(log, "wb") as out:
            p = subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                  f"--resources={{\"{name}\": 1}}", "--disable-usage-stats",
                                  # each node's agent its own HTTP port: the default (52365) is one per host,
                                  # and the Jobs API needs the head's agent to have it
                                  f"--dashboard-agent-listen-port={free_port()}", *args],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=node_env)
        try:
            if wait_for_start(p, log, ready, taken, f"ray {name}"):
                return p
        except BaseException:
            kill(p)
            raise
        kill(p)
        return None

    def start_head(port: int):
        dash = free_port()
        head = launch("head", ["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"],
                      r"Ray runtime started\.", rf"Failed to start the grpc server\. The specified port is {port}\b")
        return None if head is None else (head, dash)

    def api(dashboard: str, path: str) -> dict:
        req = urllib.request.Request(dashboard + path, headers={"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        port, (procs["head"], dash) = on_free_port(start_head, "ray start --head")
        dashboard = f"http://127.0.0.1:{dash}"
        procs["node2"] = launch("node2", [f"--address=127.0.0.1:{port}"], r"Ray runtime started\.",
                                r"(?!)")  # binds no fixed port
        deadline = time.monotonic() + 60
        while True:  # both raylets registered, as the dashboard's state API sees them
            try:
                rows = api(dashboard, "/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
            except OSError:
                rows = []
            nodes = {r: n["node_id"] for n in rows if n.get("state") == "ALIVE" for r in ("head", "node2")
                     if r in (n.get("resources_total") or {})}
            if len(nodes) == 2:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the two-node cluster did not come up: nodes {rows}; logs in {temp_dir}")
            time.sleep(0.5)
        _wait_for_job_agent(dashboard, auth["RAY_AUTH_TOKEN"], temp_dir)
        yield RayCluster(f"127.0.0.1:{port}", dashboard, auth, nodes, procs)
    finally:
        for p in procs.values():
            kill(p)
        shutil.rmtree(temp_dir, ignore_errors=True)
