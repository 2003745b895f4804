"""`d2v finetune` (issue 12): GLUE TSV reading against pandas, the classify task's learning, and one real job on
the session Ray cluster + MLflow server that registers `data2vec-vision-classify@candidate`."""

from __future__ import annotations

import csv
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.config import apply_overrides
from model.data2vec import Data2Vec
from model.presets import get_preset
from tests.conftest import require
from workers.cli import main

PATTERNS = ("horizontal", "vertical", "checker")


def d2v(capsys, *args) -> tuple[int, dict | None, str]:
    """Run the CLI in-process -> (exit code, the last line's JSON or None, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    lines = [line for line in cap.out.splitlines() if line.strip()]
    return rc, (json.loads(lines[-1]) if rc == 0 and lines else None), cap.err


# ------------------------------------------------------------------------------------------ GLUE TSV
SST2 = ["sentence\tlabel", "it 's a charming and often affecting journey . \t1", 'unflinchingly "bleak" \t0',
        "the acting , costumes , music ... are all superb\t1"]
MRPC = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\tReferring to him as '
        'only " the witness " , Amrozi accused his brother .',
        "0\t2108705\t2108831\tYucaipa owned Dominick 's before selling the chain .\tYucaipa bought Dominick 's in 1995 ."]


def write_tsv(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("lines,texts,label", [(SST2, ["sentence"], "label"),
                                                (MRPC, ["#1 String", "#2 String"], "Quality")])
def test_glue_tsv_reads_as_pandas_does(tmp_path, lines, texts, label):
    """GLUE ships TSV without quoting (fields hold `"`): our rows equal pandas' read_csv(sep='\\t', QUOTE_NONE)
    of the same file, and a line with a missing field is an error naming file:line."""
    pd = require("pandas", "reference TSV reader")
    from workers.finetune import FinetuneError
    from workers.finetune.glue import read_glue, read_rows

    root = tmp_path / "task"
    write_tsv(root / "train.tsv", lines)
    write_tsv(root / "dev.tsv", lines[:2])
    names, rows = read_rows(root / "train.tsv")
    ref = pd.read_csv(root / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    assert list(names) == texts
    assert [r.texts for r in rows] == [tuple(r) for r in ref[texts].itertuples(index=False)]
    assert [r.label for r in rows] == list(ref[label].str.strip())
    assert read_glue(root).classes == sorted(set(ref[label]))

    bad = write_tsv(tmp_path / "bad" / "train.tsv", lines[:2] + [lines[2].rsplit("\t", 1)[0]] + lines[3:])
    with pytest.raises(FinetuneError, match=rf"{bad}:3: {len(lines[0].split(chr(9))) - 1} tab-separated fields"):
        read_rows(bad)


def test_demo_glue_fixture_is_deterministic(tmp_path):
    """The GLUE-format demo tasks built from a labelled text split: same bytes twice, SST-2 and MRPC layouts
    readable by pandas, every document once in DOCS with its module as label, MRPC labels 0/1."""
    pd = require("pandas", "reference TSV reader")
    from workers.finetune.glue import write_demo_glue

    labelled = tmp_path / "labelled"
    for split, n in (("train", 6), ("test", 3)):
        for mod in ("json", "os", "re"):
            for i in range(n):
                write_tsv(labelled / split / mod / f"{mod}_{i}.txt", [f"The {mod} module,\tdoc {i}.", "", "more"])
    a, b = write_demo_glue(labelled, tmp_path / "a"), write_demo_glue(labelled, tmp_path / "b")
    for task in ("DOCS", "PAIRS"):
        for f in ("train.tsv", "dev.tsv"):
            assert (a[task] / f).read_bytes() == (b[task] / f).read_bytes()
    docs = pd.read_csv(a["DOCS"] / "train.tsv", sep="\t", quoting=csv.QUOTE_NONE)
    assert list(docs.columns) == ["sentence", "label"] and len(docs) == 18
    assert sorted(docs["label"]) == sorted(["json", "os", "re"] * 6) and not docs["sentence"].str.contains("\t").any()
    pairs = pd.read_csv(a["PAIRS"] / "dev.tsv", sep="\t", quoting=csv.QUOTE_NONE)
    assert list(pairs.columns) == ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"] and len(pairs) == 9
    assert set(pairs["Quality"]) == {0, 1}
    same = pairs["#1 ID"].str.split("_").str[0] == pairs["#2 ID"].str.split("_").str[0]
    assert (same == (pairs["Quality"] == 1)).all()


# ----------------------------------------------------------------------------------- learning (no Ray)
def keyword_glue(root: Path, tok_json: Path) -> Path:
    """A learnable sentence task in SST-2 layout: the label is which of two keywords the sentence holds,
    amid random filler words (chance 0.5)."""
    rng = np.random.default_rng(0)
    filler = "the a of river stone light cloud paper window garden music table".split()
    for name, n in (("train.tsv", 64), ("dev.tsv", 32)):
        lines = ["sentence\tlabel"]
        for i in range(n):
            words = list(rng.choice(filler, 6))
            words.insert(int(rng.integers(0, 7)), ("happy", "angry")[i % 2])
            lines.append(f"{' '.join(words)}\t{i % 2}")
        write_tsv(root / name, lines)
    return root


def tiny_text_checkpoint(out: Path) -> Path:
    from pipelines.tokenizer import train_bpe

    words = "the a of river stone light cloud paper window garden music table happy angry".split()
    tok = train_bpe([" ".join(words)] * 20, vocab_size=300)
    cfg = apply_overrides(get_preset("text", "tiny"), [f"model.frontend.vocab_size={tok.get_vocab_size()}"])
    torch.manual_seed(0)
    return save_checkpoint(out, cfg, Data2Vec(cfg.model), extra_files={"tokenizer.json": tok.to_str().encode()})


@contextmanager
def one_thread():
    """Tiny models step faster on one thread than on two contended ones (measured 0.02 s vs 0.6 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_sentence_classification_learns_a_keyword_task(tmp_path):
    """The text recipe (RoBERTa head on <s>, linear warm-up 6% then linear decay) on a random-init tiny encoder
    learns a keyword task read from GLUE TSV in 60 updates: test accuracy >= 0.9 (chance 0.5; measured 1.0
    after ~40 updates), training loss falling."""
    from model.checkpoint import load_encoder
    from workers.finetune.classify import TASK
    from workers.finetune.loop import fit

    ckpt = tiny_text_checkpoint(tmp_path / "ckpt")
    data = keyword_glue(tmp_path / "KEYWORD", ckpt / "tokenizer.json")
    cfg, enc = load_encoder(ckpt)
    train, test = TASK.load(data, cfg, ckpt / "tokenizer.json")
    assert train[0].x[0] == 0 and train[0].x[-1] == 2  # <s> ... </s>
    recipe = TASK.recipe("text")
    assert (recipe.schedule, recipe.warmup) == ("linear", 0.06)
    torch.manual_seed(0)
    head = TASK.build_head(cfg, train)
    with one_thread():
        out = fit(TASK, cfg, enc, head, train, test, replace(recipe, epochs=15, batch_size=16))
    losses = [h["loss"] for h in out["history"]]
    assert out["accuracy"] >= 0.9 and losses[-1] < 0.5 * losses[0], (out["accuracy"], losses)


# ------------------------------------------------------------------------------------- the Ray job
def pattern_split(root: Path) -> Path:
    """3 classes of 32x32 stripe/checker pictures (as tests/test_evaluate.py's pattern task), 16 train / 8 test."""
    from PIL import Image

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:32, :32]
    for split, n in (("train", 16), ("test", 8)):
        for cls in PATTERNS:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                half, phase = int(rng.integers(3, 5)), int(rng.integers(0, 8))
                bands = {"horizontal": yy // half, "vertical": xx // half, "checker": yy // half + xx // half}[cls]
                on = ((bands + phase) % 2 == 1)[..., None]
                img = np.where(on, rng.uniform(0, 110, 3), rng.uniform(145, 255, 3)) + rng.normal(0, 12, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / cls / f"{cls}_{i}.png")
    return root


def test_finetune_job_registers_a_classifier(capsys, tmp_path, mlflow_server, ray_local):
    """`d2v finetune models:/data2vec-vision@candidate --task classify --baseline` on the session Ray cluster
    (2 DDP workers, 2 epochs: learning is tested above, this tests the job): the last line is JSON with accuracy and
    baseline_accuracy; an MlflowClient reads back
    data2vec-vision-classify@candidate with the parent's name/version and the test accuracy as tags, the parent
    version tagged finetune.classify.accuracy, the run's loss curve; the registered model reloads and scores the
    same. (Resume by run name goes through the same Ray Train mechanism as pretraining, tested in
    tests/test_pretrain.py; here it would cost another ~15 s of Train start-up.)"""
    from mlflow import MlflowClient

    from workers import tracking

    c = MlflowClient(mlflow_server)
    torch.manual_seed(3)
    cfg = get_preset("vision", "tiny")
    ckpt = save_checkpoint(tmp_path / "enc", cfg, Data2Vec(cfg.model), state={"step": 1})
    run = c.create_run(tracking.experiment_id("test-finetune-source"))
    c.log_artifacts(run.info.run_id, str(ckpt), "checkpoint")
    _, parent = tracking.register_checkpoint(run.info.run_id, "checkpoint", "vision")
    data = pattern_split(tmp_path / "patterns")
    args = ["finetune", "models:/data2vec-vision@candidate", "--task", "classify", "--data", data, "--set",
            "epochs=2", "--set", "batch_size=16", "--workers", 2, "--run-name", "ft-job", "--storage",
            tmp_path / "runs"]
    rc, out, err = d2v(capsys, *args, "--baseline")
    assert rc == 0, err[-3000:]
    assert set(out) >= {"accuracy", "baseline_accuracy"} and out["model"] == "models:/data2vec-vision-classify@candidate"
    mv = c.get_model_version_by_alias("data2vec-vision-classify", "candidate")
    assert mv.version == out["version"] and mv.run_id == out["run_id"]
    assert mv.tags["parent.name"] == "data2vec-vision" and mv.tags["parent.version"] == parent
    assert float(mv.tags["test.accuracy"]) == out["accuracy"] and mv.tags["task"] == "classify"
    tags = c.get_model_version("data2vec-vision", parent).tags
    assert float(tags["finetune.classify.accuracy"]) == out["accuracy"]
    assert float(tags["finetune.classify.baseline_accuracy"]) == out["baseline_accuracy"]
    assert tags["finetune.classify.model"] == f"data2vec-vision-classify/{mv.version}"
    assert [m.step for m in c.get_metric_history(out["run_id"], "train_loss")][-1] > 0
    assert "curves.png" in [a.path for a in c.list_artifacts(out["run_id"])]

    # the registered classifier loads as a checkpoint: encoder + head give the reported accuracy
    from workers.finetune.export import load_finetuned

    task, cfg2, enc, head = load_finetuned("models:/data2vec-vision-classify@candidate")
    _, test = task.load(data, cfg2, None)
    assert task.evaluate(enc, head, test)["accuracy"] == out["accuracy"]


# --------------------------------------------------------------------------------- Hugging Face export
def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its init (unit LayerNorms, zero biases cannot hide a mapping error)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


@pytest.mark.parametrize("modality", ["text", "vision"])
def test_hf_export_of_a_finetuned_classifier_matches_transformers(capsys, tmp_path, modality):
    """`d2v export --format hf` of a fine-tuned classifier checkpoint: transformers'
    Data2VecTextForSequenceClassification / Data2VecVisionForImageClassification.from_pretrained load it with
    no missing weights and give our logits to <= 1e-5 (text with padding); text's head also equals transformers'
    RobertaClassificationHead loaded with the same weights."""
    transformers = require("transformers", "the independent reference for exported models")
    from model.encoder import Encoder
    from model.heads import head_logits
    from workers.finetune.classify import TASK, forward
    from workers.finetune.loop import write_finetuned

    torch.manual_seed(0)
    cfg = get_preset(modality, "tiny", "v1")
    tok = None
    if modality == "text":
        from pipelines.tokenizer import train_bpe

        bpe = train_bpe(["a small corpus for a tiny tokenizer"] * 5, vocab_size=300)
        cfg = apply_overrides(cfg, [f"model.frontend.vocab_size={bpe.get_vocab_size()}"])
        tok = bpe.to_str().encode()
    enc = perturbed(Encoder(cfg.model), 1)
    classes = ["neg", "neu", "pos"]
    head = perturbed(TASK.restore_head(cfg, {"classes": classes, "head": TASK.ft(modality).head}), 2)
    ckpt = write_finetuned(tmp_path / "ft", TASK, cfg, enc, head, {"epoch": 1}, tok)
    rc, _, err = d2v(capsys, "export", ckpt, "--format", "hf", "--out", tmp_path / "hf")
    assert rc == 0, err

    if modality == "text":
        hf_cls, (x, pad) = transformers.Data2VecTextForSequenceClassification, text_batch(cfg)
        kwargs = {"input_ids": x, "attention_mask": (~pad).long()}
    else:
        hf_cls, x, pad = transformers.Data2VecVisionForImageClassification, torch.randn(2, 3, 32, 32), None
        kwargs = {"pixel_values": x}
    hf, info = hf_cls.from_pretrained(tmp_path / "hf", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.config.id2label == dict(enumerate(classes))
    with torch.no_grad():
        ours = head_logits(head, forward(enc, x, pad))  # (B, 3)
        theirs = hf.eval()(**kwargs).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    if modality == "text":
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

        ref = RobertaClassificationHead(transformers.RobertaConfig(hidden_size=cfg.model.trunk.dim, num_labels=3))
        ref.load_state_dict(head.state_dict())
        with torch.no_grad():
            states = enc(x, pad).last  # (B, T, D)
            torch.testing.assert_close(ref.eval()(states), head(states[:, 0]), atol=1e-6, rtol=0)


def text_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Two id sequences <s> ... </s>, the second right-padded with the pad id; (B, T) ids and pad mask."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(5, cfg.model.frontend.vocab_size, (2, 12), generator=g)
    x[:, 0], x[0, -1], x[1, 7] = 0, 2, 2
    x[1, 8:] = cfg.model.frontend.pad_id
    return x, x == cfg.model.frontend.pad_id


def test_promotion_of_finetuned_versions_follows_the_task_metric(mlflow_server):
    """Lower WER wins, higher accuracy wins, versions tested on other data are not compared (real MLflow)."""
    from mlflow import MlflowClient

    from workers import tracking
    from workers.finetune.register import promote

    c = MlflowClient(mlflow_server)
    run = c.create_run(tracking.experiment_id("test-finetune-promotion")).info.run_id

    def version(name: str, metric: str, value: float, data: str = "d1") -> str:
        if not c.search_registered_models(f"name = '{name}'"):
            c.create_registered_model(name)
        tags = {f"test.{metric}": repr(value), "data_fingerprint": data}
        return c.create_model_version(name, source=f"runs:/{run}/finetuned", run_id=run, tags=tags).version

    asr = "test-promo-audio-asr"
    v1, v2 = version(asr, "wer", 0.40), version(asr, "wer", 0.30)
    assert promote(asr, v1, "wer", True)[0]  # no champion yet
    ok, reason = promote(asr, v2, "wer", True)
    assert ok and reason == f"promoted: wer 0.3000 < champion v{v1} 0.4000 (lower is better)"
    other = version(asr, "wer", 0.01, data="d2")
    assert not promote(asr, other, "wer", True)[0]  # not comparable
    assert c.get_model_version_by_alias(asr, "champion").version == v2
    clf = "test-promo-vision-classify"
    a, b = version(clf, "accuracy", 0.8), version(clf, "accuracy", 0.7)
    assert promote(clf, a, "accuracy", False)[0] and not promote(clf, b, "accuracy", False)[0]
    assert c.get_model_version(clf, b).tags["finetune.promotion"] == (
        f"not promoted: accuracy 0.7000 <= champion v{a} 0.8000 (higher is better)")


def test_recipe_overrides_fail_before_any_cluster_time(capsys, tmp_path, monkeypatch, refused_port):
    """`--set` names recipe fields only, with typed values and ranges checked; errors name the key. The CLI
    reports them (exit 2) before Ray or MLflow are touched: the tracking server here refuses connections."""
    from model.config import ConfigError
    from workers.finetune.classify import TASK
    from workers.finetune.job import apply_recipe_overrides

    r = apply_recipe_overrides(TASK.recipe("vision"), ["epochs=3", "lr=1e-3", "betas=[0.9, 0.95]"])
    assert (r.epochs, r.lr, r.betas) == (3, 1e-3, (0.9, 0.95))
    budget = replace(r, updates=50)  # an updates budget: 50 updates at 4 an epoch = 13 epochs, the last cut short
    assert budget.length(4) == (13, 50) and apply_recipe_overrides(budget, ["epochs=2"]).length(4) == (2, 8)
    for bad, match in (("model.trunk.depth=2", "KEY one of"), ("epochs=two", "epochs must be a int"),
                       ("layer_decay=1.5", "layer_decay=1.5")):
        with pytest.raises(ConfigError, match=match):
            apply_recipe_overrides(r, [bad])
    ckpt = save_checkpoint(tmp_path / "enc", get_preset("vision", "tiny"), Data2Vec(get_preset("vision", "tiny").model))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{refused_port}")
    rc, _, err = d2v(capsys, "finetune", ckpt, "--task", "classify", "--set", "epochs=0")
    assert rc == 2 and "epochs=0" in err and "must be" in err, err
