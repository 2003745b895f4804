"""Pretraining on a real local Ray cluster (2 Train workers, DDP) tracked in a real `mlflow server`.

Registration of each modality's result (checkpoint files, run params/tags/metrics/artifacts, the
`candidate` alias) is checked by tests/test_workflow.py, whose pretrain stage is this same driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workers.pretrain import DataError, pretrain

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY_RUN = ["train.max_steps=6", "train.checkpoint_every=3", "train.log_every=2", "train.batch_size=4",
            "data.num_workers=1"]


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_resume_and_worker_failure(demo_shards, mlflow_server, tmp_path, capfd):
    """SIGKILL one Train worker mid-run: the group restarts from the last checkpoint and finishes;
    rerunning the same run name with more steps continues from the last step in the same MLflow run."""
    _, shards = demo_shards("text")
    name = "resume-text"
    run_dir = tmp_path / name
    killed = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "step_00000004").exists():
            time.sleep(0.2)
        out = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
        pids = [int(p) for p in out.stdout.split()]
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    overrides = ["train.max_steps=16", "train.checkpoint_every=4", "train.log_every=4", "train.batch_size=4",
                 "data.num_workers=1"]
    first = pretrain("text", shards, overrides=overrides, workers=2, run_name=name, storage=tmp_path)
    t.join(timeout=5)
    assert killed, "no Train worker was found to kill"
    assert first["step"] == 16
    assert json.loads((run_dir / "step_00000016" / "state.json").read_text())["step"] == 16
    assert "resumed from checkpoint at step" in capfd.readouterr().out

    overrides[0] = "train.max_steps=20"
    second = pretrain("text", shards, overrides=overrides, workers=2, run_name=name, storage=tmp_path)
    assert "resumed from checkpoint at step 16" in capfd.readouterr().out
    assert second["step"] == 20 and second["run_id"] == first["run_id"]
    steps = [m.step for m in _client().get_metric_history(second["run_id"], "loss")]
    assert steps[-1] == 20 and 16 in steps


def test_bad_config_and_data_fail_before_ray(tmp_path, demo_shards):
    _, shards = demo_shards("audio")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "D2V_STORAGE": str(tmp_path / "runs")}
    cases = [
        (["pretrain", "audio", "--data", str(shards), "--set", "optim.lr=abc"], "optim.lr"),
        (["pretrain", "audio", "--data", str(shards), "--set", "optim.lrr=1"], "optim.lrr"),
        (["pretrain", "vision", "--data", str(shards)], "not 'vision'"),
        (["pretrain", "audio", "--data", str(tmp_path / "nope")], "no such directory"),
    ]
    for args, expect in cases:
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=120)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert expect in p.stderr and "Traceback" not in p.stderr
        assert "Ray" not in p.stderr and not (tmp_path / "runs").exists()
        assert time.time() - t0 < 60


def test_tracking_server_unreachable_fails_before_training(demo_shards, tmp_path, monkeypatch):
    from workers.tracking import TrackingUnavailable

    _, shards = demo_shards("audio")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(TrackingUnavailable, match="127.0.0.1:9"):
        pretrain("audio", shards, overrides=TINY_RUN, workers=1, run_name="x", storage=tmp_path)
    assert not (tmp_path / "x").exists()


def test_missing_data_names_the_path(tmp_path):
    (tmp_path / "stats.json").write_text("{}")
    with pytest.raises(DataError, match="manifest.parquet"):
        pretrain("vision", tmp_path, workers=1)


def test_submit_to_ray_head_on_loopback(demo_shards, mlflow_server, tmp_path):
    """`ray start --head` on 127.0.0.1, then `d2v pretrain` with RAY_ADDRESS: code shipped as working_dir."""
    from tests.conftest import free_port

    import secrets
    import tempfile

    _, shards = demo_shards("vision")
    port = free_port()
    ray_bin = str(Path(sys.executable).parent / "ray")
    # Ray >= 2.59 authenticates every client with a token: the cluster and the submitter share it
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**os.environ, **auth, "RAY_ADDRESS": f"127.0.0.1:{port}", "D2V_STORAGE": str(tmp_path / "runs")}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **auth},
    )
    try:
        args = ["pretrain", "vision", "--data", str(shards), "--workers", "2", "--run-name", "head-vision"]
        for o in TINY_RUN:
            args += ["--set", o]
        p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f":{port}" in p.stderr and "Connected to Ray cluster" in p.stderr  # that cluster, not a new one
        out = json.loads(p.stdout.strip().splitlines()[-1])
        assert out["step"] == 6 and (tmp_path / "runs" / "head-vision" / "step_00000006").is_dir()
        assert _client().get_model_version_by_alias("data2vec-vision", "candidate").version == out["version"]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
