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
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require
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
