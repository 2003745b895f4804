"""Pretraining on a real local Ray cluster (2 Train workers, DDP) and on a `ray start --head` cluster reached
through RAY_ADDRESS, tracked in a real `mlflow server`.

Registration of each modality's result (checkpoint files, run params/tags/metrics/artifacts, the
`candidate` alias) is checked by tests/test_workflow.py, whose pretrain stage is this same driver."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import Lines, registered, wait_for, worker_pids
from workers.pretrain import DataError, pretrain

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY_RUN = ["train.max_steps=6", "train.checkpoint_every=3", "train.log_every=2", "train.batch_size=4",
            "data.num_workers=1"]


def _client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_worker_failure_recovers_then_resume_by_name_on_a_ray_head(demo_shards, ray_local, mlflow_server, tmp_path):
    """1. `d2v pretrain` on the session's Ray (RAY_ADDRESS): one Train worker is SIGKILLed right after the
       step-4 checkpoint is registered; the group restarts from the last checkpoint and finishes, and the
       console says so.
    2. `ray start --head` on 127.0.0.1, then `d2v pretrain` with RAY_ADDRESS (code shipped as working_dir)
       under the same run name with more steps: it continues from the last step in the same MLflow run."""
    _, shards = demo_shards("text")
    name = "resume-text"
    run_dir = tmp_path / name
    overrides = ["train.max_steps=32", "train.checkpoint_every=4", "train.log_every=4", "train.batch_size=4",
                 "data.num_workers=1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "D2V_STORAGE": str(tmp_path),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = ["pretrain", "text", "--data", str(shards), "--workers", "2", "--run-name", name,
            *[a for o in overrides for a in ("--set", o)]]
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    err = Lines(proc)
    try:
        # the workers' pids come from the run's own driver.log (its startup lines, long before step 4), so the
        # kill follows the registration of the step-4 checkpoint within ~0.1 s, far from the end at step 32
        def started():
            found = worker_pids(run_dir)
            return (found,) if len(found) == 2 or proc.poll() is not None else None

        (pids,) = wait_for(started, "the two Train workers' pids")
        wait_for(lambda: "step_00000004" in registered(run_dir) or proc.poll() is not None, "checkpoint step 4")
        assert proc.poll() is None and pids, err.text()[-3000:]
        os.kill(min(pids), signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = err.text()
    assert proc.returncode == 0, text[-3000:]
    first = json.loads(out.strip().splitlines()[-1])
    assert first["step"] == 32
    assert json.loads((run_dir / "step_00000032" / "state.json").read_text())["step"] == 32
    assert "d2v pretrain: resumed from checkpoint at step" in text, text[-3000:]  # our console (stderr)

    overrides[0] = "train.max_steps=36"
    p, port = _pretrain_on_ray_head(["text", "--data", str(shards), "--workers", "2", "--run-name", name],
                                    overrides, {"D2V_STORAGE": str(tmp_path)}, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    driver_log = (run_dir / "driver.log").read_text()  # Ray's own chatter goes here, not to the console
    assert f":{port}" in driver_log and "Connected to Ray cluster" in driver_log  # that cluster, not a new one
    assert "resumed from checkpoint at step 32" in p.stderr
    # a console that reads like a product: each line once, no traceback, no Ray internals, a closing summary
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    assert "Traceback" not in p.stderr and "TrainingReport(" not in p.stderr and "RayTrainWorker" in driver_log
    assert any(line.startswith("d2v pretrain: step 36/36") for line in lines), p.stderr[-2000:]
    summary = lines[lines.index(next(line for line in lines if line.startswith("d2v pretrain: done:"))):]
    assert [line.split()[0] for line in summary[1:]] == ["data", "checkpoint", "model", "MLflow", "log"], summary
    version = json.loads(p.stdout.splitlines()[-1])["version"]
    assert str(run_dir / "driver.log") in summary[-1] and f"(version {version})" in summary[3]
    second = json.loads(p.stdout.strip().splitlines()[-1])
    assert second["step"] == 36 and second["run_id"] == first["run_id"]
    assert json.loads((run_dir / "step_00000036" / "state.json").read_text())["step"] == 36
    c = _client()
    assert c.get_run(second["run_id"]).data.tags["d2v.resume_1"] == "train.max_steps: 32 -> 36"  # recorded
    steps = [m.step for m in c.get_metric_history(second["run_id"], "loss")]
    assert steps[-1] == 36 and 32 in steps
    assert c.get_model_version_by_alias("data2vec-text", "candidate").version == second["version"]


def _pretrain_on_ray_head(args: list[str], overrides: list[str], env: dict, cwd: Path):
    """Start `ray start --head` on loopback, run `d2v pretrain ARGS` against it with RAY_ADDRESS, tear it down."""
    import secrets
    import shutil
    import tempfile

    from tests.conftest import on_free_port, wait_for_start

    ray_bin = str(Path(sys.executable).parent / "ray")
    # Ray >= 2.59 authenticates every client with a token: the cluster and the submitter share it
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes

    def start(port: int):
        log = Path(temp_dir) / f"head-{port}.log"
        with open(log, "wb") as out:
            head = subprocess.Popen(
                [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                 "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **auth},
            )
        try:  # "Ray runtime started." comes after our GCS bound the port; a taken port fails the GCS grpc server
            if wait_for_start(head, log, r"Ray runtime started\.",
                              rf"Failed to start the grpc server\. The specified port is {port}\b", "ray head"):
                return head
        except BaseException:
            _kill_session(head)
            raise
        _kill_session(head)
        return None

    port, head = on_free_port(start, "ray start --head")
    try:
        cmd = [sys.executable, "-m", "workers.cli", "pretrain", *args]
        for o in overrides:
            cmd += ["--set", o]
        env = {**os.environ, **auth, **env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600, check=False), port
    finally:
        _kill_session(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_session(head: subprocess.Popen) -> None:
    """The whole head (gcs, raylet, workers) shares the session `ray start` was started in; SIGKILL because
    `ray start --block` spends ~35 s on a graceful SIGTERM shutdown of a throwaway cluster."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:  # a failed start already took its whole group down
        pass
    head.wait(timeout=60)


def test_bad_config_and_data_fail_before_ray(tmp_path, demo_shards):
    _, shards = demo_shards("audio")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "D2V_STORAGE": str(tmp_path / "runs")}
    cases = [
        (["pretrain", "audio", "--data", str(shards), "--set", "optim.lr=abc"], "optim.lr"),
        (["pretrain", "audio", "--data", str(shards), "--set", "optim.lrr=1"], "optim.lrr"),
        (["pretrain", "vision", "--data", str(shards)], "not 'vision'"),
        (["pretrain", "audio", "--data", str(tmp_path / "nope")], "no such directory"),
    ]
    procs = [  # concurrently: each pays only the CLI's imports, since nothing reaches Ray
        subprocess.Popen([sys.executable, "-m", "workers.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=ROOT)
        for args, _ in cases
    ]
    for (args, expect), proc in zip(cases, procs):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (args, err[-2000:])
        assert expect in err and "Traceback" not in err, (args, err[-2000:])
        assert "Ray" not in err
    assert not (tmp_path / "runs").exists()


def test_tracking_server_unreachable_fails_before_training(demo_shards, tmp_path, monkeypatch, refused_port):
    from workers.tracking import TrackingUnavailable

    _, shards = demo_shards("audio")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{refused_port}")
    with pytest.raises(TrackingUnavailable, match=f"127.0.0.1:{refused_port}"):
        pretrain("audio", shards, overrides=TINY_RUN, workers=1, run_name="x", storage=tmp_path)
    assert not (tmp_path / "x").exists()


def test_missing_data_names_the_path(tmp_path):
    (tmp_path / "stats.json").write_text("{}")
    with pytest.raises(DataError, match="manifest.parquet"):
        pretrain("vision", tmp_path, workers=1)
