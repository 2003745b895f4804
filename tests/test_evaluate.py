"""`d2v evaluate` against a real MLflow server: probe accuracy, pooling with padding, tags, promotion, errors;
the raw-input baseline against sklearn / librosa / PIL computed here from the files; fine-tuning that learns.

Checkpoints are made without training: a random-init tiny encoder (informative features) and a
"degenerate" one whose weights are all zero (every pooled feature identical -> exactly chance accuracy).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.data2vec import Data2Vec
from model.encoder import Encoder
from model.presets import get_preset
from workers.cli import main

pytestmark = pytest.mark.slow

KEYS = {"accuracy", "baseline_accuracy", "raw_accuracy", "task", "model", "version", "modality", "num_train",
        "num_test", "classes", "pooling", "data", "data_fingerprint", "promoted", "promotion_reason", "eval_run_id"}
PROBE = "eval.linear-probe."
PATTERNS = ("horizontal", "vertical", "checker")
FT_EPOCHS = 20  # measured on the pattern task: 1.0 from a random head (batch 16), 0.92 with the CLI's recipe at 30


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
def pattern_data(tmp_path_factory) -> Path:
    """A task learnable by design: 32x32 RGB PNGs whose class is the pattern drawn (horizontal stripes,
    vertical stripes, checkerboard), with random stripe width (3-4 px) and phase, random ink and paper
    colours and pixel noise. 3 classes (chance 1/3), 32 train / 16 test pictures each. 8x8 grey pixels
    cannot see 3-4 px stripes (raw_accuracy 0.44), nor can a random-init encoder's probe (0.33)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("eval-patterns") / "labelled"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for split, n in (("train", 32), ("test", 16)):
        for cls in PATTERNS:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                half, phase = int(rng.integers(3, 5)), int(rng.integers(0, 8))
                bands = {"horizontal": yy // half, "vertical": xx // half, "checker": yy // half + xx // half}[cls]
                on = ((bands + phase) % 2 == 1)[..., None]  # (32, 32, 1)
                ink, paper = rng.uniform(0, 110, 3), rng.uniform(145, 255, 3)
                img = np.where(on, ink, paper) + rng.normal(0, 12, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / cls / f"{cls}_{i}.png")
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


# ---------------------------------------------------- the raw-input baseline, computed here from the files
def listed(root: Path, split: str) -> list[tuple[Path, int]]:
    classes = sorted(d.name for d in (root / "train").iterdir())
    return [(f, classes.index(c.name)) for c in sorted((root / split).iterdir()) for f in sorted(c.iterdir())]


def sklearn_accuracy(featurize, root: Path, scale: bool = True) -> float:
    """sklearn's LogisticRegression (after StandardScaler when `scale`) on featurize(train files, test files)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train, test = listed(root, "train"), listed(root, "test")
    x_train, x_test = featurize([f for f, _ in train], [f for f, _ in test])
    lr = LogisticRegression(max_iter=2000, random_state=0)
    model = make_pipeline(StandardScaler(), lr) if scale else lr
    return float(model.fit(x_train, [y for _, y in train]).score(x_test, [y for _, y in test]))


def pixels_8x8(train: list[Path], test: list[Path]):
    from PIL import Image

    def grey(f: Path) -> np.ndarray:
        return np.asarray(Image.open(f).convert("L").resize((8, 8), Image.BOX), dtype=np.float64).ravel()

    return np.stack([grey(f) for f in train]), np.stack([grey(f) for f in test])


def mfcc_mean_std(train: list[Path], test: list[Path]):
    import librosa

    def stats(f: Path) -> np.ndarray:
        m = librosa.feature.mfcc(y=librosa.load(f, sr=16000)[0], sr=16000, n_mfcc=20)  # (20, frames)
        return np.concatenate([m.mean(1), m.std(1)])

    return np.stack([stats(f) for f in train]), np.stack([stats(f) for f in test])


def tfidf_words(train: list[Path], test: list[Path]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b")
    return vec.fit_transform([f.read_text() for f in train]), vec.transform([f.read_text() for f in test])


def raw_reference_vision(root: Path) -> float:
    return sklearn_accuracy(pixels_8x8, root)


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
    assert float(tags[PROBE + "raw_accuracy"]) == out["raw_accuracy"] == raw_reference_vision(vision_data)
    assert tags[PROBE + "data_fingerprint"] == out["data_fingerprint"]
    assert tags[PROBE + "run_id"] == out["eval_run_id"]
    assert tags[PROBE + "promotion"] == out["promotion_reason"]
    run = c.get_run(out["eval_run_id"])
    assert c.get_experiment(run.info.experiment_id).name == "d2v-eval-vision"
    assert run.data.tags["model.name"] == name and run.data.tags["model.version"] == v_zero
    assert run.data.tags["model.source_run_id"] == c.get_model_version(name, v_zero).run_id
    assert run.data.tags[PROBE + "promotion"] == out["promotion_reason"]
    assert run.data.metrics == {k: out[k] for k in ("accuracy", "baseline_accuracy", "raw_accuracy")}
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


def test_audio_probe(capsys, mlflow_server, tmp_path, audio_data):
    ckpt = make_checkpoint(tmp_path / "audio", "audio")
    rc, out, err = d2v(capsys, "evaluate", ckpt, "--data", audio_data)
    assert rc == 0, err
    assert out["modality"] == "audio" and out["classes"] == ["high", "low"] and out["accuracy"] >= 0.75
    assert "frames" in out["pooling"]
    assert out["raw_accuracy"] == sklearn_accuracy(mfcc_mean_std, audio_data)


def test_finetune_through_the_cli_learns_a_pattern_task(capsys, mlflow_server, ckpts, pattern_data):
    """Both encoders here are random init, so both fine-tunes (the vision recipe: linear probe, then 30
    epochs of 3 steps) must learn the task: >= 0.8 (chance 1/3)."""
    rc, out, err = d2v(capsys, "evaluate", ckpts["random"], "--data", pattern_data, "--task", "finetune",
                       "--epochs", 30)
    assert rc == 0, err
    assert out["task"] == "finetune" and out["accuracy"] >= 0.8 and out["baseline_accuracy"] >= 0.8
    assert out["raw_accuracy"] == raw_reference_vision(pattern_data)
    params = client(mlflow_server).get_run(out["eval_run_id"]).data.params
    assert params["finetune.epochs"] == "30" and params["task"] == "finetune"
    assert params["finetune.layer_decay"] == "0.75"  # the vision recipe


def test_finetune_from_a_random_head_learns_a_pattern_task(pattern_data):
    """No linear-probe stage: a random-init encoder and a random head must learn the task by fine-tuning
    alone, >= 0.8 test accuracy (chance 1/3), with the training loss falling along the way."""
    from workers.evaluate import FINETUNE_PRESETS, finetune_accuracy, load_split, random_encoder

    cfg = get_preset("vision", "tiny")
    ft = replace(FINETUNE_PRESETS["vision"], epochs=FT_EPOCHS, probe_steps=0, batch_size=16)
    losses: list[float] = []
    acc = finetune_accuracy(random_encoder(cfg), cfg, load_split(pattern_data, "vision"), None, ft,
                            torch.device("cpu"), on_epoch=lambda epoch, m: losses.append(m["loss"]))
    assert acc >= 0.8, (acc, losses)
    assert len(losses) == FT_EPOCHS and losses[-1] < 0.7 * losses[0], losses


def test_raw_baseline_matches_sklearn_on_the_files(tmp_path, vision_data, audio_data):
    """raw_accuracy == LogisticRegression on 8x8 PIL grey pixels / librosa MFCC mean+std (standardised) /
    sklearn TF-IDF, computed here from the files; the features themselves agree too."""
    from workers.evaluate import RAW, load_split, raw_accuracy

    text = tmp_path / "text"
    rng = np.random.default_rng(0)
    words = {"cats": ["purr", "whisker", "meow"], "dogs": ["bark", "fetch", "leash"], "fish": ["fin", "gill", "reef"]}
    common = ["the", "a", "runs", "sleeps", "near", "house", "x", "7"]
    for split, n in (("train", 12), ("test", 6)):
        for cls, own in words.items():
            (text / split / cls).mkdir(parents=True)
            for i in range(n):  # mostly shared words, a few class words, some of another class: not trivially separable
                other = words[list(words)[(list(words).index(cls) + 1) % 3]]
                pick = list(rng.choice(common, 12)) + list(rng.choice(own, 2)) + list(rng.choice(other, 1))
                (text / split / cls / f"{i}.txt").write_text(" ".join(rng.permutation(pick)))

    for modality, root, ref, scale in (("vision", vision_data, pixels_8x8, True),
                                       ("audio", audio_data, mfcc_mean_std, True), ("text", text, tfidf_words, False)):
        split = load_split(root, modality)
        assert raw_accuracy(split) == sklearn_accuracy(ref, root, scale), modality
        files = [f for f, _ in split.train]
        ours, theirs = RAW[modality].featurize(files, files)[0], ref(files, files)[0]
        if modality == "text":
            ours, theirs = ours.toarray(), theirs.toarray()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3, err_msg=modality)



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


def test_layer_decay_groups_follow_beit():
    """Each parameter's lr scale is BEiT's `layer_decay ** (depth + 1 - get_num_layer_for_vit(name))` (CLS,
    patch embedding: layer 0; block i: i + 1; relative position table, final norm, head: depth + 1), the head
    also times head_lr_mult; 1-D tensors, CLS and the position table get no weight decay."""
    from workers.evaluate import ClassifierHead, FinetuneConfig
    from workers.evaluate.finetune import param_groups

    cfg = get_preset("vision", "tiny")
    enc = Encoder(cfg.model)
    head = ClassifierHead(cfg.model.trunk.dim, 10)
    ft = FinetuneConfig(layer_decay=0.5, head_lr_mult=3.0, weight_decay=0.05)
    scale, decay = {}, {}
    for g in param_groups(enc, head, ft):
        for p in g["params"]:
            scale[id(p)], decay[id(p)] = g["lr_scale"], g["weight_decay"]
    depth = cfg.model.trunk.depth  # 4
    expect = {"frontend.cls_token": 0.5 ** 5, "frontend.patch_embed.weight": 0.5 ** 5,
              "blocks.0.attn.qkv.weight": 0.5 ** 4, "blocks.3.mlp.fc1.weight": 0.5 ** 1,
              "frontend.rel_pos.table": 1.0, "final_norm.weight": 1.0}
    named = dict(enc.named_parameters())
    for name, want in expect.items():
        assert scale[id(named[name])] == pytest.approx(want), name
    assert scale[id(head.fc.weight)] == 3.0 and decay[id(head.fc.weight)] == 0.05
    for n, p in named.items():
        no_decay = p.ndim <= 1 or "cls_token" in n or "rel_pos" in n
        assert decay[id(p)] == (0.0 if no_decay else 0.05), n
    assert len(scale) == len(named) + 4 and depth == 4  # + the head's norm and linear layer


def test_schedule_is_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    from workers.evaluate.finetune import lr_scale_at

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for step in range(50):
        assert lr_scale_at(step, 50, 7) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_linear_probe_stage_is_sklearns_logistic_regression():
    """The LP stage of fine-tuning fits the head to the same optimum as sklearn's LogisticRegression (C=1,
    i.e. sum of cross-entropies + |W|^2 / 2, intercept unpenalised) on the LayerNorm'd features."""
    from sklearn.linear_model import LogisticRegression

    from workers.evaluate import ClassifierHead, FinetuneConfig
    from workers.evaluate.finetune import fit_head

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = rng.normal(size=(120, 8)) + rng.normal(scale=0.6, size=(3, 8))[y]  # (N, D) overlapping classes
    z = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)  # LayerNorm, no affine
    want = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(z, y).predict_proba(z)  # (N, C)
    torch.manual_seed(0)
    head = ClassifierHead(8, 3).double()
    fit_head(head, torch.from_numpy(x), torch.from_numpy(y), FinetuneConfig(probe_steps=500))
    got = torch.softmax(head(torch.from_numpy(x)), -1).detach().numpy()
    assert 0.5 < (want.argmax(1) == y).mean() < 1.0  # overlapping classes: the penalty shapes the optimum
    np.testing.assert_allclose(got, want, atol=1e-4)
