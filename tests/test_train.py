"""The training loop without Ray (plain-process Hooks): schedules, stop conditions, checkpoint contents,
and metric logging that survives an unreachable tracking server."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from model.config import apply_overrides
from model.data2vec import Batch
from model.presets import get_preset
from tests.test_model import make_batch
from workers.optim import lr_at, param_groups
from workers.train import Hooks, train


def run(cfg, batch: Batch, ckpt_from: Path | None = None):
    reports = []

    def report(metrics, d, name):
        files = sorted(p.name for p in Path(d).iterdir()) if d else None
        reports.append((metrics, files, name))
        if d and ckpt_from is not None:
            import shutil

            shutil.copytree(d, ckpt_from / name)

    def batches(start):
        while True:
            yield batch

    out = train(cfg, batches, Hooks(report=report, progress=lambda s: None))
    return out, reports


def tiny(modality="audio", *extra):
    return apply_overrides(get_preset(modality, "tiny"), ["train.max_steps=4", "train.checkpoint_every=2",
                                                          "train.log_every=1", *extra])


def test_checkpoints_every_n_steps_with_all_files(tmp_path):
    cfg = tiny()
    out, reports = run(cfg, make_batch(cfg), tmp_path)
    assert [r[2] for r in reports] == ["step_00000002", "step_00000004"]
    assert reports[-1][1] == ["config.yaml", "model.safetensors", "optimizer.pt", "state.json", "teacher.safetensors"]
    assert out["step"] == 4 and out["stopped"] is None and math.isfinite(out["loss"])
    # optimizer state loads without unpickling code
    state = torch.load(tmp_path / "step_00000004" / "optimizer.pt", weights_only=True)
    assert state["state"] and state["param_groups"][0]["weight_decay"] == cfg.optim.weight_decay


def test_resume_from_a_checkpoint_continues_at_its_step(tmp_path):
    cfg = tiny()
    run(cfg, make_batch(cfg), tmp_path)

    @contextmanager
    def latest():
        yield str(tmp_path / "step_00000004")

    more = apply_overrides(cfg, ["train.max_steps=6"])
    reports, said = [], []
    out = train(more, lambda s: iter([make_batch(cfg)] * 10),
                Hooks(report=lambda m, d, n: reports.append(n), latest_checkpoint=latest, progress=said.append))
    assert "resumed from checkpoint at step 4" in said and reports == ["step_00000006"] and out["step"] == 6


def test_non_finite_loss_stops_cleanly_without_a_checkpoint():
    cfg = tiny()
    bad = make_batch(cfg)
    bad = Batch(torch.full_like(bad.inputs, float("nan")), bad.mask)
    out, reports = run(cfg, bad)
    assert out["stopped"].startswith("loss is nan at step 0")
    assert reports == [({"step": 0, "stopped": out["stopped"]}, None, None)]


def test_collapse_guard_stops_when_target_spread_is_below_threshold():
    cfg = tiny("audio", "train.collapse_after=1", "train.collapse_min_target_var=1e6")
    out, reports = run(cfg, make_batch(cfg))
    assert "representation collapse at step 1" in out["stopped"] and reports[-1][1] is None


def test_lr_schedules_are_pure_functions_of_the_step():
    cos = get_preset("vision", "base").optim
    assert lr_at(0, cos, 100_000) == cos.lr / cos.warmup_steps
    assert lr_at(cos.warmup_steps - 1, cos, 100_000) == cos.lr
    mid = cos.warmup_steps + (100_000 - cos.warmup_steps) // 2
    assert math.isclose(lr_at(mid, cos, 100_000), cos.final_lr + 0.5 * (cos.lr - cos.final_lr), rel_tol=1e-4)
    assert math.isclose(lr_at(100_000, cos, 100_000), cos.final_lr)
    tri = get_preset("audio", "base").optim  # fairseq tri_stage: 3% warmup from 1%, 90% hold, 7% exp decay
    n = 1000
    assert math.isclose(lr_at(0, tri, n), tri.lr * 0.01)
    assert lr_at(30, tri, n) == tri.lr and lr_at(929, tri, n) == tri.lr
    assert math.isclose(lr_at(1000, tri, n), tri.lr * tri.tri_stage_final_scale)


def test_no_weight_decay_on_1d_positional_and_cls_parameters():
    from model.data2vec import Data2Vec

    model = Data2Vec(get_preset("vision", "tiny").model)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no = {names[id(p)] for p in no_decay["params"]}
    yes = {names[id(p)] for p in decay["params"]}
    assert "encoder.frontend.cls_token" in no and "encoder.frontend.rel_pos.table" in no
    assert all(model.get_parameter(n).ndim >= 2 for n in yes)
    assert {n for n in no if model.get_parameter(n).ndim >= 2} <= {
        "encoder.frontend.cls_token", "encoder.frontend.rel_pos.table"}


def test_metric_logger_survives_an_unreachable_server(monkeypatch):
    from workers.tracking import MetricLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = MetricLogger("0" * 32, max_backlog=5, retry_every_s=0.0)
    for step in range(4):
        logger.log({"loss": 1.0, "lr": 0.1}, step)  # must not raise
    assert len(logger.backlog) == 5 and logger.dropped == 3  # oldest points dropped past the bound
    assert logger.close() == (0, 8)
