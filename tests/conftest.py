"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on loopback (sqlite backend, proxied artifacts); yields its URI.

    MLFLOW_TRACKING_URI is set for the whole session so the driver, Ray workers and clients all use it.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(
        [mlflow_bin, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root,
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
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
        log.close()


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
