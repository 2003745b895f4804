"""Resuming a run name with another config: unsafe changes refused before Ray (naming the fields), safe ones
allowed and recorded in the real MLflow run (a local sqlite store; no Ray, no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.tracking._tracking_service import utils as mlflow_uri

from model.config import Config, apply_overrides
from model.presets import get_preset
from workers import pretrain as driver
from workers.resume import SAFE_FIELDS, ResumeConflict, check_resume, config_changes

ROOT = Path(__file__).resolve().parent.parent


def test_config_changes_name_every_differing_field():
    old = get_preset("audio", "tiny")
    new = apply_overrides(old, ["train.max_steps=20", "model.trunk.depth=3", "masking.mask_prob=0.5"])
    assert config_changes(old, new) == [
        ("masking.mask_prob", 0.65, 0.5), ("model.trunk.depth", 4, 3), ("train.max_steps", 300, 20)]
    text = get_preset("text", "tiny")  # switching the masking kind: the other kind's fields show as unset
    bert = apply_overrides(text, ["masking.kind=bert"])
    changed = {k: (o, n) for k, o, n in config_changes(text, bert)}
    assert changed["masking.kind"] == ("span", "bert") and changed["masking.span_length"] == (4, "(unset)")


@pytest.mark.parametrize("override,field", [
    ("model.trunk.depth=3", "model.trunk.depth"), ("masking.mask_prob=0.5", "masking.mask_prob"),
    ("train.batch_size=3", "train.batch_size"), ("train.grad_accum=2", "train.grad_accum"),
    ("data.num_workers=3", "data.num_workers"), ("optim.lr=0.1", "optim.lr"), ("train.seed=7", "train.seed"),
])
def test_unsafe_changes_are_refused_with_the_field_named(override, field):
    old = get_preset("audio", "tiny")
    new = apply_overrides(old, [override, "train.max_steps=900"])
    with pytest.raises(ResumeConflict) as err:
        check_resume("run 'r1'", old, new)
    msg = str(err.value)
    assert f"{field}: " in msg and "'r1'" in msg and "--run-name" in msg
    assert "train.max_steps" not in msg.split("Changed: ")[1].split(". Resume")[0]  # only the unsafe ones listed


def test_safe_changes_are_returned_and_outside_settings_checked():
    old = get_preset("vision", "tiny")
    new = apply_overrides(old, ["train.max_steps=900", "train.log_every=5", "train.checkpoint_every=7"])
    assert check_resume("run 'r'", old, new) == [
        ("train.checkpoint_every", 250, 7), ("train.log_every", 10, 5), ("train.max_steps", 1000, 900)]
    assert {c[0] for c in check_resume("run 'r'", old, new)} <= set(SAFE_FIELDS)
    with pytest.raises(ResumeConflict, match="--workers: 2 -> 4"):
        check_resume("run 'r'", old, old, [("--workers", "2", "4")])


# ------------------------------------------------------------------------------- driver + real MLflow
@pytest.fixture
def sqlite_tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(mlflow_uri, "_tracking_uri", mlflow_uri._tracking_uri)  # undo tracking.client()'s set
    return uri


def fake_shards(root: Path, fingerprint: str = "fp-1") -> Path:
    """What inspect_data checks (stats.json, manifest, a tar): enough for the driver to reach the run check."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stats.json").write_text(json.dumps({"modality": "audio", "samples": 10, "fingerprint": fingerprint}))
    (root / "manifest.parquet").write_bytes(b"")
    (root / "audio-000000.tar").write_bytes(b"")
    return root


def test_resume_records_safe_changes_in_mlflow_and_refuses_unsafe_before_ray(tmp_path, sqlite_tracking, monkeypatch):
    info = driver.inspect_data("audio", fake_shards(tmp_path / "shards"))
    cfg = get_preset("audio", "tiny")
    run_id = driver._start_or_resume_run(cfg, info, "r", "audio", workers=2)

    # resume 1: same config; resume 2: longer run -> recorded as tags + the config it ran with
    assert driver._start_or_resume_run(cfg, info, "r", "audio", workers=2) == run_id
    longer = apply_overrides(cfg, ["train.max_steps=400"])
    assert driver._start_or_resume_run(longer, info, "r", "audio", workers=2) == run_id
    c = MlflowClient(sqlite_tracking)
    run = c.get_run(run_id)
    assert run.data.tags["d2v.resumes"] == "2"
    assert run.data.tags["d2v.resume_1"] == "no config change"
    assert run.data.tags["d2v.resume_2"] == "train.max_steps: 300 -> 400"
    assert run.data.params["train.max_steps"] == "300"  # the original param stays (MLflow params are immutable)
    logged = Path(c.download_artifacts(run_id, "resume_2/config.yaml", str(tmp_path)))
    assert Config.from_yaml(logged.read_text()) == longer
    # resume 3 compares with what resume 2 ran with, not with the original
    assert driver._start_or_resume_run(longer, info, "r", "audio", workers=2) == run_id
    assert c.get_run(run_id).data.tags["d2v.resume_3"] == "no config change"

    # unsafe: through the driver, refused before Ray is touched, storage untouched
    monkeypatch.setattr(driver, "_init_ray", lambda workers: pytest.fail("reached Ray"))
    with pytest.raises(ResumeConflict, match=r"model\.trunk\.depth: 4 -> 3"):
        driver.pretrain("audio", tmp_path / "shards", overrides=["model.trunk.depth=3"], workers=2, run_name="r",
                        storage=tmp_path / "runs")
    with pytest.raises(ResumeConflict, match="--workers: 2 -> 1"):
        driver.pretrain("audio", tmp_path / "shards", workers=1, run_name="r", storage=tmp_path / "runs")
    with pytest.raises(ResumeConflict, match="--data fingerprint: fp-1 -> fp-2"):
        driver.pretrain("audio", fake_shards(tmp_path / "other", "fp-2"), workers=2, run_name="r",
                        storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() and c.get_run(run_id).data.tags["d2v.resumes"] == "3"

    # the CLI reports it as a user error (exit 2, no traceback) naming the field
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_tracking, "D2V_STORAGE": str(tmp_path / "runs")}
    p = subprocess.run([sys.executable, "-m", "workers.cli", "pretrain", "audio", "--data", str(tmp_path / "shards"),
                        "--workers", "2", "--run-name", "r", "--set", "train.batch_size=3"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "train.batch_size: 16 -> 3" in p.stderr and "Traceback" not in p.stderr
