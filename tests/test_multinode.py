"""The cluster path for real: a two-node Ray cluster (tests/conftest.py: ray_two_nodes, 1 CPU per node) reached
through both forms of RAY_ADDRESS, with shards, checkpoints and MLflow artifacts in the loopback S3 server
(conftest: s3_server, mlflow_s3_server), configured only by the standard AWS_* variables.

- `RAY_ADDRESS=127.0.0.1:<gcs port> d2v shard ... --output s3://...`: this process is the Ray driver.
- `RAY_ADDRESS=http://127.0.0.1:<dashboard> d2v pretrain --data s3://... --storage s3://... --workers 2`:
  submitted through the Ray Jobs API; its driver runs on the head, the two Train workers one per node (one
  CPU each); where each rank ran is read back from the run's MLflow tags and compared with the node ids the
  dashboard's state API lists. Registration goes through an MLflow server whose artifacts live in the bucket.
- `d2v evaluate models:/data2vec-vision/<version>` reads the registered weights back out of the bucket.

The nodes were started without AWS_* / MLFLOW_* variables, so storage and tracking work on them only because
d2v sends those variables with the job (runtime_env env_vars). The independent reader is boto3 against the
same S3 server: what d2v claims to have written must be there as objects, and the server's request log shows
evaluation reading the weights from the bucket. One cluster start-up and one pass through the stages cover
both the object-storage and the multi-node path (the suite's time budget).

The same cluster then runs `d2v workflow` through both RAY_ADDRESS forms, and last (it kills the second node)
an elastic `d2v pretrain --workers 2 --min-workers 1` that loses a node mid-run and finishes on the head.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.runs import registered, wait_for
from workers.submit import job_argv

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

TINY = ["train.max_steps=4", "train.checkpoint_every=2", "train.log_every=2", "train.batch_size=4",
        "data.num_workers=0"]


def _d2v(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=300, check=False)
    assert p.returncode == 0, f"d2v {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _keys(s3, bucket: str, prefix: str) -> dict[str, int]:
    """key -> size of every object under `prefix`, listed by boto3 (paginated)."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def _body(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_shard_pretrain_register_evaluate_on_object_storage_across_two_nodes(
        ray_two_nodes, s3_server, mlflow_s3_server, demo_shards, tmp_path):
    boto3 = require("boto3", "the independent S3 client")
    from mlflow import MlflowClient

    cluster, bucket, s3 = ray_two_nodes, s3_server.bucket, boto3.client("s3")
    demo, _ = demo_shards("vision")  # the session's small demo corpus (its local shards are not used here)
    shards, storage = f"s3://{bucket}/shards/vision", f"s3://{bucket}/runs"
    env = {**os.environ, **cluster.env, "MLFLOW_TRACKING_URI": mlflow_s3_server, "D2V_STORAGE": ""}
    assert env["AWS_ENDPOINT_URL"] == s3_server.url  # the only place S3 is configured

    # 1. the GCS form: `d2v shard` drives the cluster from here; its Ray Data tasks write to the bucket
    p = _d2v(["shard", "vision", "--input", str(demo / "pretrain"), "--output", shards, "--samples-per-shard", "16"],
             {**env, "RAY_ADDRESS": cluster.address}, tmp_path)
    assert f"connected to {cluster.address}" in p.stderr
    stored = _keys(s3, bucket, "shards/vision/")
    assert any(re.fullmatch(r"shards/vision/vision-\d{6}\.tar", k) for k in stored), stored
    assert {"shards/vision/manifest.parquet", "shards/vision/stats.json"} <= set(stored), stored
    assert not any(k.endswith(".tmp") for k in stored)  # every write completed its rename
    stats = json.loads(_body(s3, bucket, "shards/vision/stats.json"))
    assert stats["modality"] == "vision" and stats["samples"] > 0

    # 2. the Jobs API form: the same command line runs as a job on the head; 2 ranks on 2 nodes, data streamed
    #    from the bucket, checkpoints into it
    run = "s3-two-nodes"
    args = ["pretrain", "vision", "--data", shards, "--storage", storage, "--workers", "2", "--run-name", run,
            *[a for o in TINY for a in ("--set", o)]]
    p = _d2v(args, {**env, "RAY_ADDRESS": cluster.dashboard}, tmp_path)
    assert re.search(rf"submitted job \S+ to {re.escape(cluster.dashboard)}", p.stderr), p.stderr[-2000:]
    out = json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("{")))
    assert out["step"] == 4 and out["run_name"] == run and out["model"].startswith("models:/data2vec-vision@")
    assert out["checkpoint"].startswith(f"{storage}/{run}/"), out["checkpoint"]  # a URI, not a bucket path
    c = MlflowClient(mlflow_s3_server)
    finished = c.get_run(out["run_id"])
    assert finished.info.status == "FINISHED" and finished.data.tags["data"] == shards
    tags = finished.data.tags
    assert {tags[f"d2v.rank_{r}.node_id"] for r in (0, 1)} == set(cluster.nodes.values()), (tags, cluster.nodes)
    ckpts = _keys(s3, bucket, f"runs/{run}/")
    final = [k for k in ckpts if re.fullmatch(rf"runs/{run}/[^/]*0*4/model\.safetensors", k)]
    assert len(final) == 1, sorted(ckpts)
    assert json.loads(_body(s3, bucket, final[0].replace("model.safetensors", "state.json")))["step"] == 4
    assert not (tmp_path / "runs").exists() and not (ROOT / "runs" / run).exists()  # the job's log is on the head

    # 3. MLflow's artifacts (the run's checkpoint, the registered model) are objects in the bucket, byte-equal
    arts = _keys(s3, bucket, "mlartifacts/")
    logged = [k for k in arts if k.endswith(f"{out['run_id']}/artifacts/checkpoint/model.safetensors")]
    assert len(logged) == 1, sorted(arts)
    assert _body(s3, bucket, logged[0]) == _body(s3, bucket, final[0])
    assert c.get_model_version("data2vec-vision", out["version"]).run_id == out["run_id"]
    assert [k for k in arts if k.endswith(".safetensors") and k != logged[0]], "no registered weights in the bucket"

    # 4. evaluation resolves the registered version, reading it from the bucket (server-issued presigned URLs)
    seen = len(s3_server.log.read_text(errors="replace"))
    p = _d2v(["evaluate", f"models:/data2vec-vision/{out['version']}", "--data", str(demo / "labelled")], env, tmp_path)
    assert 0.0 <= json.loads(p.stdout.strip().splitlines()[-1])["accuracy"] <= 1.0
    reads = s3_server.log.read_text(errors="replace")[seen:]
    assert re.search(rf"GET /{bucket}/mlartifacts/\S+\.safetensors[? ]\S* HTTP/1\.1\S*\" 20[06]", reads), reads[-3000:]


def test_job_arguments_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
    """A submitted job runs in its own working dir (the uploaded code): a relative path would name another
    folder there, so the path options are made absolute; URIs and other arguments pass unchanged."""
    monkeypatch.chdir(tmp_path)
    argv = ["pretrain", "vision", "--data", "shards", "--storage=s3://b/runs", "--set", "train.max_steps=4",
            "--output", "~/out", "--run-name", "data"]
    assert job_argv(argv) == ["pretrain", "vision", "--data", str(tmp_path / "shards"), "--storage=s3://b/runs",
                              "--set", "train.max_steps=4", "--output", os.path.expanduser("~/out"),
                              "--run-name", "data"]


@pytest.mark.parametrize("argv", [["shard", "vision", "--input", "in", "--output", "out"],
                                  ["pretrain", "vision", "--data", "shards"]])
def test_jobs_api_address_is_used_not_refused(argv, refused_port, monkeypatch, capsys):
    """With RAY_ADDRESS=http://... every Ray stage goes to the Jobs API there (here: nothing listens, so the
    error says so, naming the address) instead of refusing the form or starting a local Ray."""
    from workers.cli import main

    address = f"http://127.0.0.1:{refused_port}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Ray Jobs API at RAY_ADDRESS={address!r}" in err and "Traceback" not in err


@pytest.mark.parametrize("workers,low", [("2", "3"), ("2", "0")])
def test_min_workers_outside_one_to_workers_is_refused_before_anything_runs(workers, low, tmp_path, capsys):
    """--min-workers is the lower bound of Ray Train's elastic worker group: 1 <= N <= --workers, checked before
    the data is read or a cluster is reached (the --data folder here does not even exist)."""
    from workers.cli import main

    assert main(["pretrain", "vision", "--data", str(tmp_path / "none"), "--workers", workers,
                 "--min-workers", low]) == 2
    err = capsys.readouterr().err
    assert f"--min-workers must be between 1 and --workers={workers}, got {low}" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ d2v workflow
def test_workflow_runs_on_the_cluster_in_both_address_forms(ray_two_nodes, mlflow_server, demo_shards, tmp_path):
    """`d2v workflow audio` with RAY_ADDRESS (the audio case of tests/test_workflow.py, run here instead of on a
    local Ray): the GCS form connects this process to the cluster (no local Ray start: `ray.init(num_cpus=...)`
    is refused by a running cluster) and runs shard -> pretrain (2 workers, one per node) -> register ->
    evaluate there, checked as test_workflow checks each modality; the http:// form submits the same command
    as a job whose driver finds every stage up to date."""
    from mlflow import MlflowClient

    from model.presets import DEFAULT_VERSION, get_preset
    from tests.test_workflow import STEPS, check_children, check_registered

    cluster, (demo, _), storage = ray_two_nodes, demo_shards("audio"), tmp_path / "runs"
    env = {**os.environ, **cluster.env, "MLFLOW_TRACKING_URI": mlflow_server, "D2V_STORAGE": str(storage)}
    steps = [o if not o.startswith("data.num_workers") else "data.num_workers=0" for o in STEPS]  # 1 CPU a node
    args = ["workflow", "audio", "--input", str(demo / "pretrain"), "--data", str(tmp_path / "shards"),
            "--labelled", str(demo / "labelled"), "--workers", "2", *[a for o in steps for a in ("--set", o)]]
    p = _d2v(args, {**env, "RAY_ADDRESS": cluster.address}, tmp_path)
    assert f"[d2v workflow] ray: connected to {cluster.address}" in p.stderr, p.stderr[-3000:]
    assert "Started a local Ray instance" not in p.stderr
    state, evaluated = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")][-2:]
    assert {k: v["status"] for k, v in state.items()} == {"shard": "done", "pretrain": "done", "evaluate": "done"}
    num_test = sum(1 for f in (demo / "labelled" / "test").rglob("*") if f.is_file())
    assert evaluated["num_test"] == num_test and 0.0 <= evaluated["accuracy"] <= 1.0
    assert evaluated["raw_accuracy"] >= 1 / len(evaluated["classes"]) + 0.4  # as in test_workflow
    recorded = json.loads((tmp_path / "shards.workflow.json").read_text())
    pre = recorded["pretrain"]["outputs"]
    c = MlflowClient(mlflow_server)
    check_registered(c, "audio", pre, storage, get_preset("audio", "tiny", DEFAULT_VERSION["audio"]).preset)
    tags = c.get_run(pre["run_id"]).data.tags
    assert tags["d2v.world_size"] == "2"
    assert {tags[f"d2v.rank_{r}.node_id"] for r in (0, 1)} == set(cluster.nodes.values()), tags
    mv = c.get_model_version("data2vec-audio", evaluated["version"])
    assert float(mv.tags["eval.linear-probe.accuracy"]) == pytest.approx(evaluated["accuracy"])

    p = _d2v(args, {**env, "RAY_ADDRESS": cluster.dashboard}, tmp_path)
    assert re.search(rf"submitted job \S+ to {re.escape(cluster.dashboard)}", p.stderr), p.stderr[-2000:]
    for stage in ("shard", "pretrain", "evaluate"):
        assert f"[d2v workflow] {stage}: up to date" in p.stdout, p.stdout[-3000:]
    assert json.loads((tmp_path / "shards.workflow.json").read_text()) == recorded
    check_children(c, "audio", {"skipped"})


# ----------------------------------------------------------------------------------- a node is lost
# Runs last in this module: it kills the fixture's second node (the module's cluster is not used after it).
def _placement(c, run_id: str) -> dict[str, str]:
    """rank tag -> node id, as the run records the latest attempt's placement (plus d2v.world_size)."""
    tags = c.get_run(run_id).data.tags
    return {k: v for k, v in tags.items() if k.startswith("d2v.rank_") or k == "d2v.world_size"}


def test_a_lost_node_shrinks_the_run_onto_what_is_left(ray_two_nodes, mlflow_server, demo_shards, tmp_path):
    """`d2v pretrain --workers 2 --min-workers 1` through the GCS address: one rank per node. Once the first
    checkpoint is registered, the second node's raylet and workers are SIGKILLed. Ray Train's elastic worker
    group (ScalingConfig(num_workers=(1, 2))) restarts from that checkpoint with the one worker the head still
    has room for, and the run finishes: one MLflow run, FINISHED, its metric history covering every step, its
    placement tags naming the head alone; the driver's log shows both ranks before and rank 0 alone after."""
    from mlflow import MlflowClient

    cluster, (_, shards) = ray_two_nodes, demo_shards("vision")
    storage, run, steps = tmp_path / "runs", "node-lost", 24
    # Ray Train sizes a restart from the nodes GCS still lists; the lost node is listed for a few seconds more, so
    # its first restart may ask for 2 workers and wait RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60 s) for
    # them before asking again with what is there: 10 s here, the behaviour is the same
    env = {**os.environ, **cluster.env, "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_server,
           "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    args = ["pretrain", "vision", "--data", str(shards), "--storage", str(storage), "--run-name", run,
            "--workers", "2", "--min-workers", "1",
            *[a for o in (f"train.max_steps={steps}", "train.checkpoint_every=2", "train.log_every=1",
                          "train.batch_size=4", "data.num_workers=0") for a in ("--set", o)]]
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        c = MlflowClient(mlflow_server)
        wait_for(lambda: registered(storage / run) or proc.poll() is not None, "the first checkpoint")
        assert proc.poll() is None, proc.communicate()[1][-4000:]
        exp = c.get_experiment_by_name("d2v-vision").experiment_id
        (first,) = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{run}'")
        before = wait_for(lambda: (p := _placement(c, first.info.run_id)).get("d2v.rank_1.node_id") and p,
                       "the placement tags")
        assert before["d2v.world_size"] == "2"
        assert {before["d2v.rank_0.node_id"], before["d2v.rank_1.node_id"]} == set(cluster.nodes.values()), before
        killed_at = registered(storage / run)[-1]
        assert proc.poll() is None, "the run ended before the node could be killed"
        os.killpg(cluster.procs["node2"].pid, signal.SIGKILL)  # raylet, its workers: the whole node
        out, err = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    log = (storage / run / "driver.log").read_text()
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{err[-4000:]}\n{log[-4000:]}"
    result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    assert result["step"] == steps and result["run_id"] == first.info.run_id

    # one run, FINISHED, every step's metrics; placement now: one rank, on the head
    (again,) = c.search_runs([exp], filter_string=f"tags.`d2v.run_name` = '{run}'")
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert {m.step for m in c.get_metric_history(first.info.run_id, "loss")} == set(range(1, steps + 1))
    assert _placement(c, first.info.run_id) == {"d2v.world_size": "1", "d2v.rank_0.node_id": cluster.nodes["head"]}

    # the driver's log (a line may be forwarded more than once: both nodes' log monitors read this host's files):
    # the workers before the kill, one per node as the tags said; after it one worker, rank 0 on the head, resuming
    # from a checkpoint written before the kill, to the last step
    resumed = re.search(r"pid=(\d+)[^)]*\) \[d2v rank 0\] resumed from checkpoint at step (\d+)", log)
    assert resumed, log[-4000:]
    pid, step = resumed.group(1), int(resumed.group(2))
    assert int(killed_at[5:13]) <= step < steps, (killed_at, step)
    placed = set(re.findall(r"pid=(\d+)[^)]*\) \[d2v rank (\d)\] on node (\w+)", log))
    assert {(r, n) for p, r, n in placed if p != pid} == {(r, before[f"d2v.rank_{r}.node_id"]) for r in "01"}, placed
    assert {(r, n) for p, r, n in placed if p == pid} == {("0", cluster.nodes["head"])}, placed
    after = log[resumed.end():]
    assert set(re.findall(r"pid=(\d+)[^)]*\) \[d2v rank", after)) == {pid} and f"step {steps}/{steps}" in after
