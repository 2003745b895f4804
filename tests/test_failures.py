"""Failures, with the real components: a torn newest checkpoint, the driver SIGKILLed, the tracking server
away for part of a run, worker failures beyond train.max_failures, a collapse stop inside Ray, a run already
at max_steps. The `d2v pretrain` drivers run as CLI processes on the session Ray cluster (RAY_ADDRESS), so
no test pays for a Ray start of its own; the tracking-blip test owns an auth-enabled `mlflow server` that
it stops and starts, the others log to the session server.

Bit-exact resume (same loss at every step after the resume point as the uninterrupted run) is tested for v1
in tests/test_train.py and for v2 in tests/test_v2.py (plain process: Ray only hands the loop a directory)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from pyarrow.fs import LocalFileSystem
from safetensors import SafetensorError
from safetensors.torch import load_file

from tests.mlflow_servers import MlflowServer
from tests.runs import Lines, alive, registered, wait_for, worker_pids
from tests.test_train import run_until, tiny
from workers.resume import checkpoint_problem, newest_whole, next_name

ROOT = Path(__file__).resolve().parent.parent
RUN = ["train.checkpoint_every=2", "train.log_every=1", "train.batch_size=4", "data.num_workers=1"]


# ------------------------------------------------------------------------------------ torn checkpoints
def _tear(d: Path, how: str) -> None:
    if how == "truncated model.safetensors":
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "truncated optimizer.pt":
        f = d / "optimizer.pt"
        f.write_bytes(f.read_bytes()[:-100])
    elif how == "missing state.json":
        (d / "state.json").unlink()
    elif how == "empty teacher.safetensors":
        (d / "teacher.safetensors").write_bytes(b"")


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory) -> Path:
    """Checkpoints step 2, 4, 6 of a plain-process tiny run (the loop refuses to report one that is not whole)."""
    out = tmp_path_factory.mktemp("ckpts")
    cfg = tiny("audio", "train.max_steps=6")
    losses = run_until(cfg, out)[0]
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return out


@pytest.mark.parametrize("how,why", [
    ("truncated model.safetensors", "model.safetensors is truncated"),
    ("empty teacher.safetensors", "teacher.safetensors is truncated"),
    ("truncated optimizer.pt", "optimizer.pt is truncated"),
    ("missing state.json", "state.json is missing"),
])
def test_a_torn_checkpoint_is_named_and_the_one_before_it_chosen(plain_checkpoints, tmp_path, how, why):
    """The check agrees with the libraries that would load the files (safetensors, torch.load): what they
    cannot read it rejects, with the file named; resume then takes the newest whole checkpoint."""
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(plain_checkpoints, run_dir)
    fs = LocalFileSystem()
    for name in ("step_00000002", "step_00000004", "step_00000006"):  # whole: loadable, and the check agrees
        assert checkpoint_problem(fs, str(run_dir / name)) is None
        load_file(run_dir / name / "model.safetensors")
        torch.load(run_dir / name / "optimizer.pt", weights_only=True)
    _tear(run_dir / "step_00000006", how)
    if "safetensors" in how:  # the independent reference: the library refuses the torn file too
        with pytest.raises(SafetensorError):
            load_file(run_dir / "step_00000006" / how.split()[-1])
    elif "optimizer" in how:
        with pytest.raises(RuntimeError):
            torch.load(run_dir / "step_00000006" / "optimizer.pt", weights_only=True)
    assert why in checkpoint_problem(fs, str(run_dir / "step_00000006"))
    _tear(run_dir / "step_00000004", "missing state.json")
    name, skipped = newest_whole(fs, str(run_dir))
    assert name == "step_00000002"
    assert [s[0] for s in skipped] == ["step_00000006", "step_00000004"] and why in skipped[0][1]
    # Ray Train deletes old checkpoints by path: a step written again after the fallback gets a new name
    assert next_name(6, {"step_00000006"}) == "step_00000006.1" and next_name(8, {"step_00000006"}) == "step_00000008"


# ------------------------------------------------------------------------------------ drivers on Ray
def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "workers.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, **kw)


def _pretrain_args(shards: Path, name: str, overrides: list[str]) -> list[str]:
    args = ["pretrain", "audio", "--data", str(shards), "--version", "v1", "--run-name", name]
    for o in overrides:
        args += ["--set", o]
    return args


def _run_text(c, run_id: str, tmp: Path) -> str:
    """Everything MLflow holds for a run, as text: params, tags, metric keys, every artifact's bytes."""
    run = c.get_run(run_id)
    parts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(sorted(run.data.metrics))]
    local = Path(c.download_artifacts(run_id, "", str(tmp)))
    parts += [p.read_bytes().decode("latin-1") for p in local.rglob("*") if p.is_file()]
    return "\n".join(parts)


@pytest.fixture(scope="module")
def stop_drivers(demo_shards, ray_local, mlflow_server, tmp_path_factory):
    """Two `d2v pretrain` drivers started in the background, to overlap with the other Ray test of this module:
    one whose collapse guard stops it inside Ray, one whose rank-0 Train worker is SIGKILLed after its step-2
    checkpoint with train.max_failures=0. -> {name: (exit code, stderr)} once both ended."""
    _, shards = demo_shards("audio")
    storage = tmp_path_factory.mktemp("stops")
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "D2V_STORAGE": str(storage),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    procs = {
        "collapse": _cli(_pretrain_args(shards, "collapse", ["train.max_steps=6", "train.collapse_after=1",
                                                             "train.collapse_min_target_var=1e9", *RUN]), env),
        "fails": _cli(_pretrain_args(shards, "fails", ["train.max_steps=400", "train.max_failures=0", *RUN]), env),
    }
    errors: dict[str, str] = {}

    def collect(name: str, proc: subprocess.Popen) -> None:
        if name == "fails":
            wait_for(lambda: "step_00000002" in registered(storage / name) or proc.poll() is not None, "fails: step 2")
            os.kill(min(wait_for(lambda: worker_pids(storage / name), "its workers' pids")), signal.SIGKILL)
        errors[name] = proc.communicate(timeout=600)[1]

    threads = [threading.Thread(target=collect, args=item, daemon=True) for item in procs.items()]
    for t in threads:
        t.start()

    def results() -> dict[str, tuple[int, str]]:
        for t in threads:
            t.join(timeout=600)
        return {name: (proc.returncode, errors.get(name, "")) for name, proc in procs.items()}

    yield results
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_driver_killed_torn_checkpoints_tracking_away_then_register(demo_shards, ray_local, stop_drivers, tmp_path,
                                                                    capsys, monkeypatch):
    """1. `d2v pretrain` is SIGKILLed after its step-6 checkpoint. 2. The two newest checkpoints are torn
    (model.safetensors truncated, state.json removed). 3. The same command resumes from the third, says which
    it skipped and why, and continues the same MLflow run, while the (auth-enabled) MLflow server is down for
    the whole training: it finishes, and exits 5 with the command that records it. Meanwhile a metric logger
    of another run holds what it could not send and delivers it once the server is back. 4. With the server
    back, the printed command sends the metrics kept meanwhile, registers the model and marks the run FINISHED.
    5. The same command again: nothing to do, exit 6. (4 and 5 run the CLI's main in this process.) Credentials come only from the standard variables, an
    unauthenticated client is refused, and the password never lands in the run's params, tags, artifacts,
    checkpoints or logs."""
    from mlflow import MlflowClient

    from workers import cli
    from workers.tracking import MetricLogger, TrackingUnavailable, check_reachable

    _, shards = demo_shards("audio")
    server = MlflowServer(tmp_path / "mlflow", auth=True).start()
    storage, name = tmp_path / "runs", "blip"
    run_dir = storage / name
    os.environ.update(server.client_env())  # this test's clients too (conftest restores MLFLOW_* afterwards)
    env = {**os.environ, "D2V_STORAGE": str(storage), "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    args = _pretrain_args(shards, name, ["train.max_steps=12", *RUN])
    try:
        # 1. the driver dies (no chance to clean up) once step 6 is registered; its job's workers go with it
        first = _cli(args, env)
        wait_for(lambda: "step_00000006" in registered(run_dir) or first.poll() is not None, "checkpoint step 6")
        assert first.poll() is None, first.communicate()[1][-3000:]
        first.send_signal(signal.SIGKILL)
        first.communicate()
        workers = worker_pids(run_dir)
        assert workers
        wait_for(lambda: not any(alive(p) for p in workers), "the killed job's Train workers to go", 120)
        c = MlflowClient(server.uri)
        (run,) = c.search_runs([c.get_experiment_by_name("d2v-audio").experiment_id])
        assert run.info.status == "RUNNING"  # nobody closed it

        # 2. tear the two newest registered checkpoints
        kept = registered(run_dir)
        assert len(kept) == 3, kept
        _tear(run_dir / kept[2], "truncated model.safetensors")
        _tear(run_dir / kept[1], "missing state.json")
        resume_step = int(kept[0][5:])

        # 3. resume with the tracking server down from before the first step to after the last
        blip = MetricLogger(c.create_run(c.create_experiment("blip")).info.run_id, retry_every_s=0.0)
        blip.log({"loss": 1.0}, 1)
        second = _cli(args, {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        err = Lines(second)
        wait_for(lambda: err.has("d2v pretrain: ray: connected") or second.poll() is not None, "the driver on Ray")
        server.stop()
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        blip.log({"loss": 2.0}, 2)  # must not raise: held
        blip.log({"loss": 3.0}, 3)
        assert len(blip.backlog) == 2
        second.wait(timeout=300)
        text = err.text()
        assert second.returncode == 5, text[-4000:]
        assert f"skipping checkpoint {kept[2]}: model.safetensors is truncated" in text, text[-4000:]
        assert f"skipping checkpoint {kept[1]}: state.json is missing" in text
        assert f"resumed from checkpoint at step {resume_step}" in text and "step 12/12" in text
        command = f"d2v register {name} --storage {storage}"
        assert command in text and "Traceback" not in text
        assert "kept for `d2v register`" in text and list(run_dir.glob("unsent_metrics-*.jsonl"))
        assert checkpoint_problem(LocalFileSystem(), str(run_dir / registered(run_dir)[-1])) is None

        # 4. the server is back: what was held arrives; the printed command records the run
        server.start()
        assert blip.close() == (3, 0)
        assert [(m.step, m.value) for m in c.get_metric_history(blip.run_id, "loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
        monkeypatch.setenv("D2V_STORAGE", str(storage))  # the CLI's main in this process from here (saves imports)
        capsys.readouterr()
        assert cli.main(command.split()[1:]) == 0, capsys.readouterr().err[-3000:]
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert out["step"] == 12 and out["run_id"] == run.info.run_id and out["metrics_sent"] > 0
        (again,) = c.search_runs([run.info.experiment_id])  # one run: the same one, FINISHED
        assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
        assert again.data.tags["d2v.resumes"] == "1"
        steps = sorted({m.step for m in c.get_metric_history(run.info.run_id, "loss")})
        assert steps == list(range(1, 13)), steps  # before the kill, and after the resume point
        assert c.get_model_version_by_alias("data2vec-audio", "candidate").run_id == run.info.run_id
        assert not list(run_dir.glob("unsent_metrics-*"))

        # 5. the same command again: the run is complete, nothing to train
        code, third = cli.main(args), capsys.readouterr().err
        assert code == 6, third[-3000:]
        said = [ln for ln in third.splitlines() if ln.startswith("d2v pretrain:")]
        assert len(said) == 1 and "train.max_steps=12 already reached" in said[0], third
        done = c.get_run(run.info.run_id)
        assert done.info.status == "FINISHED" and "already reached" in done.data.tags["d2v.end_reason"]

        # credentials: required, taken only from the environment, never recorded
        secret = server.password
        assert secret not in _run_text(c, run.info.run_id, tmp_path / "dl")
        for f in run_dir.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/runs/get?run_id={run.info.run_id}", timeout=10)
        assert refused.value.code == 401
        del os.environ["MLFLOW_TRACKING_PASSWORD"]
        with pytest.raises(TrackingUnavailable, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"):
            check_reachable()
    finally:
        server.stop()


def test_collapse_stop_and_failures_exhausted_end_with_exit_codes(stop_drivers, mlflow_server):
    """The collapse guard stops a run inside Ray (exit 3); a SIGKILLed Train worker with train.max_failures=0
    exhausts the restarts (exit 4). Each: one paragraph, no traceback, the MLflow run FAILED with the reason as
    tag d2v.end_reason."""
    from mlflow import MlflowClient

    results = stop_drivers()
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("d2v-audio").experiment_id
    for name, code, said, reason in [
        ("collapse", 3, "training stopped: representation collapse at step 1", "representation collapse"),
        ("fails", 4, "gave up: the Train worker group failed more than train.max_failures=0 times",
         "failed more than train.max_failures=0 times"),
    ]:
        rc, err = results[name]
        assert rc == code, err[-4000:]
        mine = [ln for ln in err.splitlines() if ln.startswith(("d2v pretrain: error", "d2v pretrain: training"))]
        assert len(mine) == 1 and said in mine[0], err[-4000:]
        assert "Traceback" not in err
        (run,) = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{name}'")
        assert run.info.status == "FAILED" and reason in run.data.tags["d2v.end_reason"]
    assert re.search(r"The last whole checkpoint, step_\d{8}, is kept in ", results["fails"][1])


def test_drivers_starting_together_share_one_experiment(mlflow_server):
    """Drivers that start at the same moment (as the two above do) may all find the experiment missing and all
    create it; the losers of that race read the winner's id instead of failing with RESOURCE_ALREADY_EXISTS."""
    from mlflow import MlflowClient

    from workers import tracking

    name, n = f"d2v-race-{os.getpid()}", 6
    gate, ids, errors = threading.Barrier(n), [], []

    def start():
        gate.wait()
        try:
            ids.append(tracking.experiment_id(name))
        except Exception as err:  # what the driver would have died with
            errors.append(repr(err)[:300])

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and len(ids) == n and len(set(ids)) == 1, (errors, ids)
    assert MlflowClient(mlflow_server).get_experiment_by_name(name).experiment_id == ids[0]
