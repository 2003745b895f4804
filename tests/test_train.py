"""The training loop without Ray (plain-process Hooks): schedules, stop conditions, checkpoint contents,
resume (bit-exact against an uninterrupted run), mixed precision, and metric logging that survives an
unreachable tracking server."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.config import apply_overrides
from model.data2vec import Batch
from model.presets import get_preset
from tests.test_model import make_batch
from workers.optim import lr_at
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


def test_metric_logger_survives_an_unreachable_server(monkeypatch, refused_port):
    from workers.tracking import MetricLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{refused_port}")  # bound, never listening
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = MetricLogger("0" * 32, max_backlog=5, retry_every_s=0.0)
    for step in range(4):
        logger.log({"loss": 1.0, "lr": 0.1}, step)  # must not raise
    assert len(logger.backlog) == 5 and logger.dropped == 3  # oldest points dropped past the bound
    assert logger.close() == (0, 8)


# ------------------------------------------------------------------------------------------------ resume
class Crash(RuntimeError):
    """Stands in for a worker dying right after a checkpoint was committed."""


def stream(cfg, calls: list):
    """batches_from: micro-batch i of the stream is make_batch(seed=1000 + i), whatever the update step."""

    def batches_from(position):
        calls.append(position)
        for i in itertools.count(position):
            yield make_batch(cfg, batch_size=2, seed=1000 + i)

    return batches_from


def run_until(cfg, out: Path, crash_at: int | None = None, resume: Path | None = None):
    """Train with checkpoints copied to `out`; stop with Crash after checkpoint `crash_at`. -> (losses by step,
    positions batches_from was called with)."""
    losses, calls = {}, []

    def report(metrics, d, name):
        if d:
            shutil.copytree(d, out / name)
            if metrics["step"] == crash_at:
                raise Crash(name)

    @contextmanager
    def latest():
        yield str(resume)

    hooks = Hooks(report=report, latest_checkpoint=latest if resume else (lambda: None), progress=lambda s: None,
                  log_metrics=lambda m, step: losses.__setitem__(step, m["loss"]))
    try:
        train(cfg, stream(cfg, calls), hooks)
    except Crash:
        pass
    return losses, calls


def assert_same_checkpoint(a: Path, b: Path):
    for f in ("model.safetensors", "teacher.safetensors"):
        ta, tb = load_file(a / f), load_file(b / f)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)
    oa, ob = (torch.load(d / "optimizer.pt", weights_only=True) for d in (a, b))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), ("optimizer", i, k)
    assert json.loads((a / "state.json").read_text()) == json.loads((b / "state.json").read_text())


@pytest.mark.parametrize("modality,accum", [("vision", 1), ("audio", 1), ("vision", 3), ("text", 2)])
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, modality, accum):
    """Kill after the step-2 checkpoint, resume from it: every later loss, and the final student, teacher,
    optimizer state and training state, equal the uninterrupted run's exactly (dropout / drop path are on in
    the tiny presets, so the RNG must resume too; with grad_accum > 1 the data must resume at micro-batch
    2 x accum, not at the update step)."""
    cfg = apply_overrides(tiny(modality), ["train.max_steps=4", f"train.grad_accum={accum}"])
    (full := tmp_path / "full").mkdir()
    (part := tmp_path / "part").mkdir()
    (rest := tmp_path / "rest").mkdir()
    want, calls = run_until(cfg, full)
    assert calls == [0] and sorted(want) == [1, 2, 3, 4]
    run_until(cfg, part, crash_at=2)
    assert sorted(p.name for p in part.iterdir()) == ["step_00000002"]
    got, calls = run_until(cfg, rest, resume=part / "step_00000002")
    assert calls == [2 * accum]  # the data stream resumes at the micro-batches consumed
    assert json.loads((part / "step_00000002" / "state.json").read_text())["data_position"] == 2 * accum
    assert got == {s: want[s] for s in (3, 4)}
    assert_same_checkpoint(full / "step_00000004", rest / "step_00000004")


def test_resume_from_a_checkpoint_of_another_config_is_refused(tmp_path):
    """The loop's own check (the driver checks the MLflow run before Ray): a storage directory reused under
    another config names the changed field instead of loading mismatching weights or silently mixing runs."""
    from workers.resume import ResumeConflict

    cfg = tiny("vision", "train.max_steps=2")
    run(cfg, make_batch(cfg), tmp_path)

    @contextmanager
    def latest():
        yield str(tmp_path / "step_00000002")

    other = apply_overrides(cfg, ["masking.num_masked=8", "train.max_steps=3"])
    with pytest.raises(ResumeConflict, match=r"checkpoint .*step_00000002.*masking\.num_masked: 10 -> 8"):
        train(other, lambda s: iter([make_batch(other)] * 3), Hooks(latest_checkpoint=latest, progress=lambda s: None))


# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("modality,teacher_dtype", [("vision", torch.float32), ("audio", torch.bfloat16)])
def test_teacher_precision_under_bf16(modality, teacher_dtype):
    """train.precision=bf16 on CPU: the student's Linear layers run in bf16 under autocast; the vision
    teacher runs outside autocast in fp32 (data2vec_vision engine_for_cyclical: teacher under no_grad only,
    student under autocast), the speech teacher at the student's precision (fairseq: one fp16 model)."""
    cfg = tiny(modality, "train.precision=bf16", "train.max_steps=1")
    assert cfg.teacher.precision == ("fp32" if teacher_dtype == torch.float32 else "student")
    seen = []

    def hook(module, args, out):
        if isinstance(module, torch.nn.Linear):
            seen.append((module.training, out.dtype))  # the teacher is always in eval mode, the student in train

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        out, _ = run(cfg, make_batch(cfg))
    finally:
        handle.remove()
    assert out["stopped"] is None
    assert {d for training, d in seen if training} == {torch.bfloat16}
    assert {d for training, d in seen if not training} == {teacher_dtype}
