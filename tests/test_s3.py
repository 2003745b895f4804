"""Object storage for real: the driver's view of a shard set in an S3-compatible server on loopback (moto's,
tests/conftest.py: s3_server), configured only by the standard AWS_* variables, written by boto3 (the
independent client).

The end-to-end path (d2v shard --output s3:// -> d2v pretrain --data s3:// --storage s3:// -> registration
-> d2v evaluate models:/...) runs twice: here with a local Ray (no RAY_ADDRESS), in the same run as a tracking
outage (the MLflow server stopped and started again mid-training); in tests/test_multinode.py on the two-node
cluster through both RAY_ADDRESS forms, with MLflow's artifacts in the bucket too.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from tests.conftest import require


def test_the_driver_reads_a_text_shard_set_from_object_storage_before_any_cluster_time(s3_server):
    """inspect_data lists the shards and reads stats.json from the bucket, the tokenizer's vocabulary sizes the
    model, and a missing manifest or the wrong modality is refused naming the object — no Ray involved."""
    boto3 = require("boto3", "the independent S3 client")
    from tokenizers import Tokenizer, models

    from model.presets import get_preset
    from workers.pretrain import DataError, fit_config_to_data, inspect_data
    from workers.storage import local_copy

    s3, bucket, prefix = boto3.client("s3"), s3_server.bucket, "inspect/text"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *"abcdef"])}, unk_token="[UNK]")).to_str()
    objects = {"stats.json": json.dumps({"modality": "text", "samples": 3, "fingerprint": "fp-s3"}),
               "manifest.parquet": "", "text-000000.tar": "", "text-000001.tar": "", "tokenizer.json": tok}
    for name, body in objects.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body.encode())
    uri = f"s3://{bucket}/{prefix}"

    info = inspect_data("text", uri)
    assert info.shards == [f"{uri}/text-000000.tar", f"{uri}/text-000001.tar"]
    assert (info.num_samples, info.fingerprint, info.root, info.tokenizer) == (3, "fp-s3", uri, f"{uri}/tokenizer.json")
    assert fit_config_to_data(get_preset("text", "tiny"), info, []).model.frontend.vocab_size == 7
    assert local_copy(info.tokenizer).read_text() == tok  # what each Train worker copies into its checkpoints

    with pytest.raises(DataError, match="'text' data, not 'audio'"):
        inspect_data("audio", uri)
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet")
    with pytest.raises(DataError, match=rf"--data {uri}: manifest.parquet is missing"):
        inspect_data("text", uri)
    with pytest.raises(DataError, match="no such directory"):
        inspect_data("text", f"s3://{bucket}/nothing/here")


def test_local_ray_on_object_storage_through_a_tracking_outage(s3_server, tmp_path, monkeypatch, capsys):
    """No RAY_ADDRESS: each command starts its own local Ray. `d2v shard --output s3://`, then `d2v pretrain
    --data s3:// --storage s3://` while its (test-owned) MLflow server is stopped after the first logged steps
    and started again, on the same port and backend store, before training ends. Training never stops (steps
    advance while the server is down); afterwards the metric history holds every step exactly once, the run is
    FINISHED and registered; boto3 finds the checkpoints in the bucket; the same command with more steps
    resumes from the newest checkpoint in the bucket, in the same MLflow run; `d2v evaluate models:/...` reads
    the version back. Storage is configured only by the AWS_* variables the s3_server fixture sets."""
    boto3 = require("boto3", "the independent S3 client")
    from mlflow import MlflowClient

    from pipelines.demo import build_demo
    from tests.mlflow_servers import MlflowServer
    from tests.runs import Lines, wait_for
    from workers import cli

    s3, bucket, steps, run = boto3.client("s3"), s3_server.bucket, 80, "local-s3"
    shards, storage = f"s3://{bucket}/local/shards", f"s3://{bucket}/local/runs"
    build_demo("vision", tmp_path / "demo", size="small")
    for f in sorted((tmp_path / "demo" / "pretrain").rglob("*.png"))[48:]:  # 48 images: 3 shards (keep it fast)
        f.unlink()
    server = MlflowServer(tmp_path / "mlflow").start()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "D2V_STORAGE")}
    env.update(server.client_env())
    try:
        p = subprocess.run([sys.executable, "-m", "workers.cli", "shard", "vision", "--input",
                            str(tmp_path / "demo" / "pretrain"), "--output", shards, "--samples-per-shard", "16"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        stats = json.loads(s3.get_object(Bucket=bucket, Key="local/shards/stats.json")["Body"].read())
        assert stats["modality"] == "vision" and stats["samples"] == 48

        overrides = [f"train.max_steps={steps}", "train.checkpoint_every=40", "train.log_every=1",
                     "train.batch_size=4", "data.num_workers=0"]
        args = ["pretrain", "vision", "--data", shards, "--storage", storage, "--run-name", run,
                *[a for o in overrides for a in ("--set", o)]]
        proc = subprocess.Popen([sys.executable, "-m", "workers.cli", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        err = Lines(proc)  # stderr, read as it comes; stdout (the JSON summary) by its own thread, not communicate()
        stdout: list[str] = []
        threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True).start()

        def seen() -> int:  # the last step rank 0 reported on the console
            found = re.findall(r"d2v pretrain: step (\d+)/", "".join(list(err.lines)))
            return int(found[-1]) if found else 0

        wait_for(lambda: seen() >= 2 or proc.poll() is not None, "the first logged steps")
        server.stop()
        down_at = seen()
        server.start()  # the same port and backend store; it takes seconds to come up, training goes on meanwhile
        up_at = seen()
        assert proc.poll() is None and up_at < steps, f"training ended before the server was back:\n{err.text()}"
        assert up_at > down_at, err.text()  # steps were trained and logged while the server was away
        proc.wait(timeout=300)
        text = err.text()  # joins the reader: every stderr line is in
        out = wait_for(lambda: stdout, "the driver's stdout to close", 30)[0]
        assert proc.returncode == 0, text[-4000:]
        assert re.search(r"MLflow metrics: \d+ points sent, 0 dropped\b", text), text[-3000:]
        result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))

        c = MlflowClient(server.uri)
        assert c.get_run(result["run_id"]).info.status == "FINISHED" and result["step"] == steps
        for key in ("loss", "lr", "target_std"):  # every step once: held points sent, none twice
            assert sorted(m.step for m in c.get_metric_history(result["run_id"], key)) == list(range(1, steps + 1)), key
        assert c.get_model_version("data2vec-vision", result["version"]).run_id == result["run_id"]

        # the checkpoints, as boto3 lists them: whole (a state.json that names its step) and nothing half-written
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"local/runs/{run}/")
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        for step in (40, 80):
            (state,) = [k for k in keys if re.fullmatch(rf"local/runs/{run}/step_0*{step}/state\.json", k)]
            assert json.loads(s3.get_object(Bucket=bucket, Key=state)["Body"].read())["step"] == step
            assert state.replace("state.json", "model.safetensors") in keys
        assert not any(k.endswith(".tmp") for k in keys) and result["checkpoint"].startswith(f"{storage}/{run}/")

        # the same command, same run name, more steps (what re-running a killed driver does; tests/test_failures.py
        # SIGKILLs one on local storage): the driver finds the newest whole checkpoint in the bucket and continues
        # the same MLflow run from it
        longer = [f"train.max_steps={steps + 4}" if o.startswith("train.max_steps") else o for o in overrides]
        p = subprocess.run([sys.executable, "-m", "workers.cli", "pretrain", "vision", "--data", shards, "--storage",
                            storage, "--run-name", run, *[a for o in longer for a in ("--set", o)]],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"d2v pretrain: resumed from checkpoint at step {steps}" in p.stderr, p.stderr[-3000:]
        again = json.loads(p.stdout.strip().splitlines()[-1])
        assert again["run_id"] == result["run_id"] and again["step"] == steps + 4
        assert sorted(m.step for m in c.get_metric_history(result["run_id"], "loss")) == list(range(1, steps + 5))

        # evaluation resolves the registered version from this tracking server (the CLI in-process)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        capsys.readouterr()
        code = cli.main(["evaluate", f"models:/data2vec-vision/{result['version']}", "--data",
                         str(tmp_path / "demo" / "labelled")])
        assert code == 0, capsys.readouterr().err[-3000:]
        assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] <= 1.0
    finally:
        server.stop()
