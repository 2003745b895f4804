"""`d2v workflow` end to end on a real local Ray cluster and a real MLflow server, per modality:
shard -> pretrain (2 Train workers, DDP) -> register -> evaluate -> promote; a rerun skips every stage. The audio
case runs on the two-node cluster through both RAY_ADDRESS forms instead (tests/test_multinode.py).
The pretrain stage is `workers.pretrain.pretrain`, so this is also where registration is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.checkpoint import load_student
from model.presets import DEFAULT_VERSION, get_preset
from workers.workflow import Plan, WorkflowError, run_workflow

pytestmark = pytest.mark.slow

STEPS = ["train.max_steps=6", "train.checkpoint_every=3", "train.log_every=2", "train.batch_size=4",
         "data.num_workers=1"]


def check_registered(client, modality: str, pre: dict, storage: Path, preset: str) -> None:
    """The pretrain stage wrote checkpoints and registered them, as an MlflowClient reads them back."""
    run_dir = storage / pre["run_name"]
    assert (run_dir / "step_00000003" / "model.safetensors").is_file()
    final = run_dir / "step_00000006"
    assert json.loads((final / "state.json").read_text())["step"] == 6
    for f in ("model.safetensors", "teacher.safetensors", "optimizer.pt", "config.yaml"):
        assert (final / f).is_file(), f
    assert (final / "tokenizer.json").is_file() == (modality == "text")

    name = f"data2vec-{modality}"
    mv = client.get_model_version_by_alias(name, "candidate")
    assert mv.version == pre["version"] and mv.run_id == pre["run_id"]
    run = client.get_run(pre["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["modality"] == modality and run.data.tags["preset"] == preset
    assert len(run.data.tags["git_commit"]) >= 7 and run.data.tags["data_fingerprint"]
    assert run.data.params["train.max_steps"] == "6"
    assert [m.step for m in client.get_metric_history(pre["run_id"], "loss")] == [2, 4, 6]
    for key in ("lr", "ema_decay", "target_std", "pred_std", "grad_norm", "samples_per_s"):
        assert client.get_metric_history(pre["run_id"], key), key
    assert {"config.yaml", "curves.png", "checkpoint"} <= {a.path for a in client.list_artifacts(pre["run_id"])}

    import mlflow

    uri = client.tracking_uri  # explicit: never whatever process-global URI an earlier call left behind
    model = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@candidate", tracking_uri=uri, registry_uri=uri))
    assert (model / "MLmodel").is_file(), "the alias names an MLflow Model (pyfunc), workers/registry"
    cfg, _ = load_student(model / "artifacts")  # the files MLflow copied into the model
    assert cfg.model.modality == modality and cfg.train.max_steps == 6
    assert (model / "artifacts" / "model.safetensors").read_bytes() == (final / "model.safetensors").read_bytes()


def check_children(client, modality: str, statuses: set[str],
                   stages: tuple[str, ...] = ("evaluate", "pretrain", "shard")) -> None:
    exp = client.get_experiment_by_name(f"d2v-workflow-{modality}")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    last = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == last]
    assert sorted(r.data.tags["stage"] for r in children) == sorted(stages)
    assert {r.data.tags["status"] for r in children} == statuses


@pytest.mark.parametrize("modality", ["vision", "text"])  # audio: on the two-node cluster, tests/test_multinode.py
def test_workflow_end_to_end_then_rerun_skips(modality, demo_shards, mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    c = MlflowClient(mlflow_server)
    demo, _ = demo_shards(modality)
    storage = tmp_path / "runs"
    monkeypatch.setenv("D2V_STORAGE", str(storage))
    labelled = demo / "labelled"
    if modality == "vision":  # also: a failed stage re-runs from there, finished stages stay done
        empty = tmp_path / "empty"
        (empty / "train").mkdir(parents=True)
        (empty / "test").mkdir()
        labelled = empty
    plan = Plan(modality, demo / "pretrain", tmp_path / "shards", labelled, overrides=STEPS, workers=2)
    if modality == "vision":  # and a fine-tune stage after evaluation (`--finetune classify --finetune-set ...`)
        plan.finetune, plan.finetune_data = "classify", demo / "labelled"
        plan.finetune_overrides = ["epochs=2", "batch_size=16"]
    if modality == "vision":
        with pytest.raises(WorkflowError, match="evaluate"):
            run_workflow(plan)
        failed = json.loads(plan.state_file.read_text())
        assert failed["pretrain"]["status"] == "done" and failed["evaluate"]["status"] == "failed"
        plan.labelled = demo / "labelled"
    state = run_workflow(plan)
    assert [state[s]["status"] for s in ("shard", "pretrain", "evaluate")] == ["done"] * 3
    if modality == "vision":
        assert state["pretrain"] == failed["pretrain"]  # not re-run after the failure
    pre, ev = state["pretrain"]["outputs"], state["evaluate"]["outputs"]
    # no version given: the workflow pretrains the modality's default version (presets.DEFAULT_VERSION)
    assert plan.version is None and plan.resolved_version == DEFAULT_VERSION[modality]
    check_registered(c, modality, pre, storage, get_preset(modality, "tiny", DEFAULT_VERSION[modality]).preset)
    assert ev["version"] == pre["version"]
    # the probe of a 6-update model need not beat chance on these 10-40 test items (random-init probes measured
    # 0.10-0.40 on the small audio split); what the stage promises is a score over this split's test files
    # and, beside it, the raw-input baseline of a task built to be learnable: >= chance + 0.4 on every demo
    # (measured 0.725 vision, 0.80 audio, 0.72 text)
    num_test = sum(1 for f in (demo / "labelled" / "test").rglob("*") if f.is_file())
    assert ev["num_test"] == num_test and ev["accuracy"] * num_test == pytest.approx(round(ev["accuracy"] * num_test))
    assert ev["raw_accuracy"] >= 1 / len(ev["classes"]) + 0.4
    mv = c.get_model_version(f"data2vec-{modality}", ev["version"])
    assert float(mv.tags["eval.linear-probe.accuracy"]) == pytest.approx(ev["accuracy"])
    assert float(mv.tags["eval.linear-probe.raw_accuracy"]) == ev["raw_accuracy"]
    assert mv.tags["eval.linear-probe.promotion"] == ev["promotion_reason"]

    stages = ["evaluate", "pretrain", "shard"]
    if plan.finetune:
        stages.append("finetune")
        check_finetuned(c, state["finetune"], pre)

    recorded = json.loads(plan.state_file.read_text())
    assert run_workflow(plan) == recorded  # every stage skipped: outputs and timings unchanged
    check_children(c, modality, {"skipped"}, stages)


def check_finetuned(client, stage: dict, pre: dict) -> None:
    """The fine-tune stage registered data2vec-<modality>-classify from the pretrained version, with its test
    accuracy, and moved `champion` by that accuracy (workers/finetune/register.py promote) as MLflow reads it."""
    from workers.evaluate.record import CHAMPION

    ft = stage["outputs"]
    assert stage["status"] == "done" and ft["model"] == "models:/data2vec-vision-classify@candidate"
    mv = client.get_model_version("data2vec-vision-classify", ft["version"])
    assert mv.run_id == ft["run_id"] and mv.tags["parent.version"] == pre["version"]
    assert float(mv.tags["test.accuracy"]) == ft["accuracy"] and mv.tags["finetune.promotion"] == ft["promotion_reason"]
    champion = client.get_registered_model("data2vec-vision-classify").aliases.get(CHAMPION)
    assert (str(champion) == str(ft["version"])) == ft["promoted"], (champion, ft)
