"""Shared fixtures."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance (2 CPUs, no dashboard), started once per test session and shut down after.

    Workers get the repository root on PYTHONPATH so they import `pipelines`/`workers` from this checkout.
    If a test session already runs Ray (e.g. RAY_ADDRESS or an earlier init), it is reused and left alone.
    """
    import ray

    if ray.is_initialized():
        yield ray
        return
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()
