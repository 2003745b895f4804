"""`d2v evaluate` against a real MLflow server: probe accuracy, pooling with padding, tags, promotion, errors.

Checkpoints are made without training: a random-init tiny encoder (informative features) and a
"degenerate" one whose weights are all zero (every pooled feature identical -> exactly chance accuracy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.data2vec import Data2Vec
from model.presets import get_preset
from workers.cli import main

pytestmark = pytest.mark.slow

KEYS = {"accuracy", "baseline_accuracy", "task", "model", "version", "modality", "num_train", "num_test", "classes",
        "pooling", "data", "data_fingerprint", "promoted", "promotion_reason", "eval_run_id"}
PROBE = "eval.linear-probe."


def make_checkpoint(out: Path, modality: str = "vision", seed: int | None = 2) -> Path:
    """A tiny-preset checkpoint: random init with `seed`, or all weights zero when seed is None."""
    cfg = get_preset(modality, "tiny")
    torch.manual_seed(seed or 0)
    model = Data2Vec(cfg.model)
    if seed is None:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return save_checkpoint(out, cfg, model)


def d2v(capsys, *args) -> tuple[int, dict | None, str]:
    """Run the CLI in-process -> (exit code, the JSON line it printed or None, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return rc, (json.loads(lines[-1]) if rc == 0 else None), err


@pytest.fixture(scope="module")
def vision_data(tmp_path_factory) -> Path:
    from pipelines.demo import build_demo

    out = tmp_path_factory.mktemp("eval-vision") / "demo"
    build_demo("vision", out, size="small")
    return out / "labelled"


@pytest.fixture(scope="module")
def audio_data(tmp_path_factory) -> Path:
    """Two keyword-free classes of 16 kHz FLAC tones (low / high pitch) of different lengths: padding matters."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("eval-audio") / "labelled"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for cls, hz in (("low", 220.0), ("high", 1760.0)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                t = np.arange(int(rng.integers(4000, 12000))) / 16000
                wave = np.sin(2 * np.pi * hz * (1 + 0.05 * rng.standard_normal()) * t) + 0.05 * rng.standard_normal(len(t))
                sf.write(root / split / cls / f"{cls}_{i}.flac", (0.5 * wave).astype(np.float32), 16000)
    return root


@pytest.fixture(scope="module")
def register(mlflow_server, tmp_path_factory):
    """Factory: checkpoint dir -> version of data2vec-vision (logged as a run's artifacts, then registered)."""
    from workers import tracking

    def reg(ckpt: Path, kind: str) -> str:
        c = tracking.client()
        run = c.create_run(tracking.experiment_id("test-eval-source"), run_name=kind)
        c.log_artifacts(run.info.run_id, str(ckpt), "checkpoint")
        c.set_terminated(run.info.run_id)
        _, version = tracking.register_checkpoint(run.info.run_id, "checkpoint", "vision", {"kind": kind})
        return version

    return reg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-ckpts")
    return {"random": make_checkpoint(root / "random"), "zero": make_checkpoint(root / "zero", seed=None)}


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


# ---------------------------------------------------------------------------------------------------------
def test_promotion_moves_champion_only_for_better_versions(capsys, mlflow_server, register, ckpts, vision_data):
    c = client(mlflow_server)
    name = "data2vec-vision"
    v_zero = register(ckpts["zero"], "zero")
    if c.get_registered_model(name).aliases.get("champion"):  # a champion left by another test: start clean
        c.delete_registered_model_alias(name, "champion")

    # 1) no champion yet -> the degenerate version is promoted; its accuracy is exactly chance
    rc, out, err = d2v(capsys, "evaluate", f"models:/{name}@candidate", "--data", vision_data, "--promote")
    assert rc == 0, err
    assert set(out) == KEYS
    chance = 1 / len(out["classes"])
    assert out["version"] == v_zero and out["modality"] == "vision" and out["task"] == "linear-probe"
    assert out["accuracy"] == pytest.approx(chance)
    assert (out["num_train"], out["num_test"], len(out["classes"])) == (160, 40, 10)
    assert out["promoted"] is True and out["promotion_reason"].startswith("promoted: no champion yet")
    assert c.get_model_version_by_alias(name, "champion").version == v_zero
    tags = c.get_model_version(name, v_zero).tags
    assert float(tags[PROBE + "accuracy"]) == out["accuracy"]
    assert float(tags[PROBE + "baseline_accuracy"]) == out["baseline_accuracy"]
    assert tags[PROBE + "data_fingerprint"] == out["data_fingerprint"]
    assert tags[PROBE + "run_id"] == out["eval_run_id"]
    assert tags[PROBE + "promotion"] == out["promotion_reason"]
    run = c.get_run(out["eval_run_id"])
    assert c.get_experiment(run.info.experiment_id).name == "d2v-eval-vision"
    assert run.data.tags["model.name"] == name and run.data.tags["model.version"] == v_zero
    assert run.data.tags["model.source_run_id"] == c.get_model_version(name, v_zero).run_id
    assert run.data.tags[PROBE + "promotion"] == out["promotion_reason"]
    assert run.data.metrics == {"accuracy": out["accuracy"], "baseline_accuracy": out["baseline_accuracy"]}
    assert run.data.params["task"] == "linear-probe" and run.data.params["pooling"] == out["pooling"]
    assert run.data.params["data"] == str(vision_data.resolve())

    # 2) the random-init version beats it -> champion moves
    v_rand = register(ckpts["random"], "random")
    rc, out, err = d2v(capsys, "evaluate", f"models:/{name}/{v_rand}", "--data", vision_data, "--promote")
    assert rc == 0, err
    assert out["accuracy"] > chance
    assert out["promoted"] is True
    assert out["promotion_reason"] == f"promoted: {out['accuracy']:.4f} > champion v{v_zero} {chance:.4f}"
    assert c.get_model_version_by_alias(name, "champion").version == v_rand
    rand_acc = out["accuracy"]

    # 3) the champion's result is gone (e.g. evaluated on other data): it is re-evaluated and re-tagged;
    #    another degenerate version does not beat it -> champion stays, the reason is recorded
    c.delete_model_version_tag(name, v_rand, PROBE + "accuracy")
    v_zero2 = register(ckpts["zero"], "zero-again")
    rc, out, err = d2v(capsys, "evaluate", f"models:/{name}/{v_zero2}", "--data", vision_data, "--promote")
    assert rc == 0, err
    assert "has no linear-probe result on this data; evaluating it now" in err
    reason = f"not promoted: {chance:.4f} <= champion v{v_rand} {rand_acc:.4f}"
    assert out["promoted"] is False and out["promotion_reason"] == reason
    assert c.get_model_version_by_alias(name, "champion").version == v_rand
    assert c.get_model_version(name, v_zero2).tags[PROBE + "promotion"] == reason
    assert c.get_run(out["eval_run_id"]).data.tags[PROBE + "promotion"] == reason
    assert float(c.get_model_version(name, v_rand).tags[PROBE + "accuracy"]) == rand_acc

    # 4) the same checkpoint through runs:/ scores the same, is linked to its run, but has no version to promote
    src = c.get_model_version(name, v_rand).run_id
    rc, out, err = d2v(capsys, "evaluate", f"runs:/{src}/checkpoint", "--data", vision_data)
    assert rc == 0, err
    assert out["accuracy"] == rand_acc and out["version"] is None
    assert c.get_run(out["eval_run_id"]).data.tags["model.source_run_id"] == src
    rc, _, err = d2v(capsys, "evaluate", f"runs:/{src}/checkpoint", "--data", vision_data, "--promote")
    assert rc == 2 and "not a registered model version" in err


def test_random_encoder_probe_beats_chance(capsys, mlflow_server, ckpts, vision_data):
    """Independent reference: chance = 1/#classes (0.1); the all-zero encoder of the promotion test scores
    exactly that, random features score above it."""
    rc, out, err = d2v(capsys, "evaluate", ckpts["random"], "--data", vision_data)
    assert rc == 0, err
    assert out["version"] is None and out["promoted"] is False and out["promotion_reason"] is None
    chance = 1 / len(out["classes"])
    assert out["accuracy"] > chance and out["baseline_accuracy"] > chance
    run = client(mlflow_server).get_run(out["eval_run_id"])
    assert "model.version" not in run.data.tags and run.data.tags["model.uri"] == str(ckpts["random"])
    # the baseline is seeded: the same number for every model of this config
    rc, again, _ = d2v(capsys, "evaluate", ckpts["zero"], "--data", vision_data)
    assert again["baseline_accuracy"] == out["baseline_accuracy"] and again["data_fingerprint"] == out["data_fingerprint"]


def test_pooling_with_padding_matches_one_input_at_a_time(tmp_path, audio_data):
    """Batched, padded features == the mean over each input's own positions, computed alone (no padding)."""
    from model.checkpoint import load_encoder
    from workers.evaluate import features, load_split

    for modality in ("audio", "text"):
        cfg, enc = load_encoder(make_checkpoint(tmp_path / modality, modality))
        if modality == "audio":
            items = load_split(audio_data, "audio").train
        else:
            rng = np.random.default_rng(0)
            items = []
            for i in range(6):  # token-id files of different lengths: <s> ids </s>
                p = tmp_path / f"t{i}.json"
                p.write_text(json.dumps([0, *rng.integers(5, 200, 3 + 4 * i).tolist(), 2]))
                items.append((p, i % 2))
        batched = features(enc, cfg, items, None, batch_size=4, device=torch.device("cpu"))
        lengths = set()
        with torch.no_grad():
            for row, (path, _) in zip(batched, items):
                from workers.evaluate import read_input

                x = read_input(path, cfg, None)[None]
                lengths.add(x.shape[1])
                alone = enc(x).last[0, enc.prefix_len :].mean(0).numpy()  # (D,)
                np.testing.assert_allclose(row, alone, atol=2e-5, rtol=1e-4, err_msg=f"{modality} {path.name}")
        assert len(lengths) > 2, "inputs must differ in length for this test to mean anything"


def test_audio_probe_and_finetune(capsys, mlflow_server, tmp_path, audio_data, ckpts, vision_data):
    ckpt = make_checkpoint(tmp_path / "audio", "audio")
    rc, out, err = d2v(capsys, "evaluate", ckpt, "--data", audio_data)
    assert rc == 0, err
    assert out["modality"] == "audio" and out["classes"] == ["high", "low"] and out["accuracy"] >= 0.75
    assert "frames" in out["pooling"]

    rc, out, err = d2v(capsys, "evaluate", ckpts["random"], "--data", vision_data, "--task", "finetune", "--epochs", "1")
    assert rc == 0, err
    assert out["task"] == "finetune" and 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["baseline_accuracy"] <= 1.0
    params = client(mlflow_server).get_run(out["eval_run_id"]).data.params
    assert params["finetune.epochs"] == "1" and params["task"] == "finetune"


def test_errors_name_the_thing_at_fault(capsys, mlflow_server, tmp_path, register, ckpts, vision_data, audio_data):
    register(ckpts["zero"], "zero-for-errors")

    def fails(*args) -> str:
        rc, _, err = d2v(capsys, "evaluate", *args)
        assert rc == 2, err
        return err

    err = fails("models:/data2vec-vision@nope", "--data", vision_data)
    assert "'nope'" in err and "candidate -> v" in err
    err = fails("models:/data2vec-nothing@candidate", "--data", vision_data)
    assert "'data2vec-nothing'" in err and "data2vec-vision" in err
    err = fails("models:/data2vec-vision/999", "--data", vision_data)
    assert "no version '999'" in err

    err = fails(ckpts["random"], "--data", audio_data)  # vision model, audio files
    first = sorted(sorted((audio_data / "train").iterdir())[0].iterdir())[0]
    assert str(first) in err and "vision" in err

    bad = shutil.copytree(ckpts["random"], tmp_path / "bad")
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(100)
    err = fails(bad, "--data", vision_data)
    assert "model.safetensors" in err

    empty = tmp_path / "empty"
    shutil.copytree(vision_data / "train", empty / "train")
    (empty / "test" / "digit_0").mkdir(parents=True)
    assert "empty split" in fails(ckpts["random"], "--data", empty)
    one = tmp_path / "one"
    shutil.copytree(vision_data / "train", one / "train")
    shutil.copytree(vision_data / "test" / "digit_3", one / "test" / "digit_3")
    assert "at least 2 class" in fails(ckpts["random"], "--data", one)

    assert "--promote" in fails(ckpts["random"], "--data", vision_data, "--promote")
    assert "--epochs" in fails(ckpts["random"], "--data", vision_data, "--epochs", "1")
