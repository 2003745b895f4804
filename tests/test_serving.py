"""Registered versions as consumers use them, against a real MLflow server: `mlflow.pyfunc.load_model` in a
Python that cannot import d2v (only the code the model carries), and `mlflow models serve` over real HTTP
(curl in another process). Both must give `d2v embed`'s numbers (<= 1e-5).

The versions are tiny random-init checkpoints registered through `register_checkpoint` (the same call
`d2v pretrain` makes at the end; tests/test_workflow.py covers that path end to end)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.registry_helpers import (
    MODALITIES, consumer_inputs, embed_reference, log_training_run, make_checkpoint, pooled, write_inputs,
)
from tests.conftest import on_free_port, wait_for_start

pytestmark = pytest.mark.slow
ATOL = 1e-5

# The consumer: a Python without site processing (-S: .pth files, including d2v's editable-install finder, never
# run) and isolated (-I: no PYTHONPATH, no cwd on sys.path), given only the venv's site-packages directory.
CONSUMER_START = r"""
import importlib.util, json, sys
sys.path.append(sys.argv[1])
for name in ("model", "workers", "pipelines"):
    assert importlib.util.find_spec(name) is None, f"{name} is importable before loading the model"
import numpy as np, pickle, torch, mlflow, mlflow.pyfunc
def refuse(*a, **k):
    raise AssertionError("loading the model tried to unpickle something")
pickle.load = pickle.loads = torch.load = refuse
spec = json.load(open(sys.argv[2]))
"""
CONSUMER = CONSUMER_START + r"""out = {"errors": {}, "modules": {}}
for modality, s in spec.items():
    m = mlflow.pyfunc.load_model(s["uri"])
    items = [bytes.fromhex(x["hex"]) if isinstance(x, dict) and "hex" in x else x for x in s["inputs"]]
    np.save(f"{s['out']}-pooled.npy", m.predict(items))
    for i, st in enumerate(m.predict(items, params={"output": "states"})):
        np.save(f"{s['out']}-states{i}.npy", st)
    try:
        m.predict(s["bad"])
    except Exception as err:
        out["errors"][modality] = str(err)
out["modules"] = {k: getattr(v, "__file__", None) for k, v in sys.modules.items()
                  if k.split(".")[0] in ("model", "workers", "pipelines")}
print(json.dumps(out))
"""
NOT_AN_IMAGE = {"b64": "bm90IGFuIGltYWdl"}  # base64 of b"not an image"
BAD = {  # JSON-friendly batches where item 1 is good (filled in per modality), and what the error must say
    "vision": ([NOT_AN_IMAGE, "GOOD", 7, {"b64": "%%%"}],
               ["[0] cannot decode the image", "[2] wrong type int", "[3] 'b64' is not valid base64"]),
    "audio": ([[], "GOOD", "/no/such.wav", [[0.1, 0.2]]],
              ["[0] empty audio", "[2] no such audio file", "[3] a waveform must be 1-D"]),
    "text": ([None, "GOOD", 3.5, {"a": 1}], ["[0] wrong type NoneType", "[2] wrong type float", "[3] wrong type dict"]),
}


def bad_batch(modality: str, good) -> list:
    return [good if b == "GOOD" else b for b in BAD[modality][0]]


def check_bad(message: str, modality: str) -> None:
    """All three bad items are named with their index and reason; the good one is not."""
    assert f"3 of 4 {modality} inputs cannot be embedded" in message, message
    for piece in BAD[modality][1]:
        assert piece in message, (piece, message)
    assert "[1]" not in message, message


@pytest.fixture(scope="module")
def registered(mlflow_server, tmp_path_factory):
    """modality -> dict(uri, paths, reference states from `d2v embed` on the registered version)."""
    from mlflow import MlflowClient

    from workers import tracking

    c = MlflowClient(mlflow_server)
    root = tmp_path_factory.mktemp("serving")
    out = {}
    for modality in MODALITIES:
        ckpt = make_checkpoint(root / f"ckpt-{modality}", modality, seed=11)
        run_id = log_training_run(c, ckpt, modality, f"serve-{modality}")
        name, version = tracking.register_checkpoint(run_id, "checkpoint", modality)
        assert c.get_model_version_by_alias(name, "candidate").version == version
        paths = write_inputs(root / f"in-{modality}", modality)
        ref = embed_reference(f"models:/{name}@candidate", paths, root / f"embed-{modality}.npz")
        out[modality] = {"uri": f"models:/{name}@candidate", "paths": paths, "states": ref, "root": root}
    return out


def test_consumer_without_d2v_loads_pyfunc_and_matches_embed(registered, tmp_path):
    spec = {}
    for modality, r in registered.items():
        items = [{"hex": x.hex()} if isinstance(x, bytes) else x for x in consumer_inputs(modality, r["paths"])]
        good = consumer_inputs(modality, r["paths"], json_only=True)[1]
        spec[modality] = {"uri": r["uri"], "inputs": items, "out": str(tmp_path / modality),
                          "bad": bad_batch(modality, good)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "consumer.py").write_text(CONSUMER)
    site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "consumer.py"), site, str(tmp_path / "spec.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    repo = str(Path(__file__).resolve().parent.parent)
    assert result["modules"] and all(f and not f.startswith(repo) and f"{os.sep}code{os.sep}" in f
                                     for f in result["modules"].values()), result["modules"]
    for modality, r in registered.items():
        want_states = r["states"]
        got = np.load(tmp_path / f"{modality}-pooled.npy")
        assert got.shape == (len(want_states), want_states[0].shape[1])
        np.testing.assert_allclose(got, pooled(want_states, modality), atol=ATOL, rtol=0, err_msg=modality)
        for i, want in enumerate(want_states):
            np.testing.assert_allclose(np.load(tmp_path / f"{modality}-states{i}.npy"), want, atol=ATOL, rtol=0)
        check_bad(result["errors"][modality], modality)


def _serve(uri: str, root: Path) -> tuple[int, subprocess.Popen]:
    """`mlflow models serve` on a port it is confirmed to own (the suite's on_free_port / wait_for_start)."""
    bin_dir = os.path.dirname(sys.executable)  # `mlflow models serve` execs `uvicorn` from PATH
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}

    def start(port: int):
        log = root / f"serve-{port}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True, env=env,
            )
        try:
            if wait_for_start(proc, log, rf"Uvicorn running on http://127\.0\.0\.1:{port}\b", r"address already in use",
                              f"mlflow models serve -m {uri}", timeout_s=240):
                return proc
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        return None

    return on_free_port(start, f"mlflow models serve -m {uri}")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (mlflow execs uvicorn in it), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _ping(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10) as r:
        assert r.status == 200


def _curl(port: int, payload: dict, path: Path) -> tuple[int, dict]:
    """POST from another process, the way the README shows it."""
    path.write_text(json.dumps(payload))
    proc = subprocess.run(
        ["curl", "-sS", "-o", str(path.with_suffix(".out")), "-w", "%{http_code}", "-X", "POST",
         "-H", "Content-Type: application/json", "--data-binary", f"@{path}",
         f"http://127.0.0.1:{port}/invocations"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout), json.loads(path.with_suffix(".out").read_text())


def test_rest_serving_matches_embed(registered, tmp_path):
    """One `mlflow models serve` per modality, started concurrently (start-up dominates), each from the alias."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(registered)) as pool:
        futures = {m: pool.submit(_serve, r["uri"], tmp_path) for m, r in registered.items()}
    servers = {}
    try:
        for modality, fut in futures.items():
            servers[modality] = fut.result()
        for modality, (port, _) in servers.items():
            _ping(port)
            r = registered[modality]
            items = consumer_inputs(modality, r["paths"], json_only=True)
            status, body = _curl(port, {"inputs": items}, tmp_path / f"{modality}-pooled.json")
            assert status == 200, body
            np.testing.assert_allclose(np.array(body["predictions"]), pooled(r["states"], modality), atol=ATOL,
                                       rtol=0, err_msg=modality)
            status, body = _curl(port, {"inputs": items, "params": {"output": "states"}},
                                 tmp_path / f"{modality}-states.json")
            assert status == 200, body
            for got, want in zip(body["predictions"], r["states"], strict=True):
                np.testing.assert_allclose(np.array(got), want, atol=ATOL, rtol=0, err_msg=modality)
            status, body = _curl(port, {"inputs": bad_batch(modality, items[1])}, tmp_path / f"{modality}-bad.json")
            assert status == 400, body
            check_bad(body["message"], modality)
    finally:
        for _, proc in servers.values():
            _stop(proc)
        for fut in futures.values():  # a server whose start raised was stopped by _serve itself
            fut.exception()
