"""The suite's own guarantees (tests/conftest.py): its references are installed and never skipped, servers
own the port they report, "unreachable" ports really refuse, and MLflow's global URI does not leak."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import tests.conftest as conftest

ROOT = Path(__file__).resolve().parent.parent
LEAKED = "sqlite:////nonexistent/leaked-by-an-earlier-test.db"


# --------------------------------------------------------------------------------- dependencies, no skips


def test_make_test_dependencies_are_installed():
    """Every dev-extra distribution (pytest, transformers, jsonschema) and espeak-ng: missing ones are named
    with the command that installs them; `make setup` installs all of them."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    reqs = [Requirement(r) for r in dev]
    assert {"transformers", "jsonschema", "pytest"} <= {r.name for r in reqs}, "tests import these directly"
    problems = []
    for req in reqs:
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed")
            continue
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} does not satisfy {req}")
    fix = "run `make setup` or `.venv/bin/uv pip install --python .venv/bin/python -e '.[dev]'`"
    assert not problems, f"{'; '.join(problems)}: {fix}"
    assert shutil.which("espeak-ng"), ("espeak-ng is not on PATH (the audio demo corpus needs it): "
                                       "`sudo apt-get install espeak-ng`, or `make setup`")

    make = (ROOT / "Makefile").read_text()
    assert re.search(r"apt-get install[^\n]*\bespeak-ng\b", make), "make setup no longer installs espeak-ng"
    assert "-e '.[dev]'" in make, "make setup no longer installs the dev extra"


def test_no_test_is_silently_left_out():
    """A missing reference must fail the suite, not be skipped past: no skip or expected-failure marks."""
    banned = re.compile(r"importor" r"skip|pytest\.skip\b|mark\.skip|skip" r"if|x" r"fail")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted((ROOT / "tests").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert not hits, "\n".join(hits)


# -------------------------------------------------------------------------------------------------- ports


def test_refused_port_refuses(refused_port):
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("127.0.0.1", refused_port))
    with socket.socket() as s, pytest.raises(OSError, match="in use"):  # and nobody else can take it
        s.bind(("127.0.0.1", refused_port))


SERVER = """
import socket, sys, time
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    print("bind:", e, flush=True)
    sys.exit(0)  # like uvicorn: a taken port is logged, the exit status says nothing
s.listen()
print("serving on", sys.argv[1], flush=True)
time.sleep(60)
"""


def test_a_server_whose_port_was_taken_is_restarted_on_another(tmp_path, monkeypatch):
    """The race free_port() cannot close: the port is taken between the probe and the server's bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1], conftest.free_port()])
        monkeypatch.setattr(conftest, "free_port", lambda: next(ports))
        tried, procs = [], []

        def start(port: int):
            tried.append(port)
            log = tmp_path / f"{port}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=out,
                                              stderr=subprocess.STDOUT))
            ok = conftest.wait_for_start(procs[-1], log, rf"serving on {port}\b", "Address already in use",
                                         "test server", timeout_s=30)
            return procs[-1] if ok else None

        try:
            port, proc = conftest.on_free_port(start, "test server")
            assert tried == [taken.getsockname()[1], port] and proc is procs[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            for p in procs:
                p.kill()
                p.wait()


def test_a_server_that_fails_otherwise_is_reported_not_retried(tmp_path):
    log = tmp_path / "s.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", "print('config error: bad flag')"], stdout=out)
    with pytest.raises(RuntimeError, match="config error: bad flag"):
        conftest.wait_for_start(proc, log, "serving", "already in use", "test server", timeout_s=30)


# ------------------------------------------------------------------------------------------------- mlflow


def test_mlflow_globals_restored_undoes_set_tracking_uri():
    import mlflow

    def state():
        env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        return mlflow.get_tracking_uri(), mlflow.get_registry_uri(), env

    before = state()
    with conftest.mlflow_globals_restored():
        mlflow.set_tracking_uri(LEAKED)
        mlflow.set_registry_uri(LEAKED)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "1"  # any MLFLOW_* variable set inside goes too
        assert state()[:2] == (LEAKED, LEAKED) and os.environ["MLFLOW_TRACKING_URI"] == LEAKED
    assert state() == before


def test_mlflow_uri_leaks_1_set_by_a_test():
    import mlflow

    mlflow.set_tracking_uri(LEAKED)  # and left set: the autouse fixture must undo it


def test_mlflow_uri_leaks_2_not_seen_by_the_next():
    import mlflow

    assert mlflow.get_tracking_uri() != LEAKED and os.environ.get("MLFLOW_TRACKING_URI") != LEAKED
