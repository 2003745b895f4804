"""Promotion rules of `d2v evaluate --promote`, every branch, against a real MLflow server and through the CLI
(tests/test_evaluate.py covers "no champion yet", "better moves it" and "champion result missing"):

- the version is already the champion -> unchanged;
- a tie (the same weights registered twice) -> no move;
- the champion was scored on other data -> it is re-scored on this data (and re-tagged) before comparing;
- the champion has no result for this task -> it is scored on this task; probe and fine-tune tags stay apart;
- `models:/name/latest` -> the highest version number.

The split is model-ready .npy arrays (no decoding), so each evaluation takes well under a second."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.registry_helpers import log_training_run, make_checkpoint
from workers.cli import main

pytestmark = pytest.mark.slow
NAME = "test-promotion-vision"
PROBE, FT = "eval.linear-probe.", "eval.finetune."


def d2v(capsys, *args) -> tuple[dict, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads([ln for ln in out.splitlines() if ln.strip()][-1]), err


def labelled(root: Path, per_class: tuple[int, int]) -> Path:
    """{train,test}/{dark,bright}/*.npy, (3, 32, 32) normalised pixels of two brightness levels plus noise."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for cls, level in (("dark", -1.0), ("bright", 1.0)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                x = level + 0.5 * rng.standard_normal((3, 32, 32))
                np.save(root / split / cls / f"{i}.npy", x.astype(np.float32))
    return root


@pytest.fixture(scope="module")
def setup(mlflow_server, tmp_path_factory):
    """Versions 1 and 2 of NAME hold the same weights (from two runs), version 3 other weights; data A and B."""
    from mlflow import MlflowClient

    from workers import tracking

    c = MlflowClient(mlflow_server)
    root = tmp_path_factory.mktemp("promotion")
    same, other = make_checkpoint(root / "same", "vision", seed=1), make_checkpoint(root / "other", "vision", seed=2)
    vs = [tracking.register_checkpoint(log_training_run(c, ck, "vision", f"promo-{i}"), "checkpoint", "vision",
                                       name=NAME)[1] for i, ck in enumerate((same, same, other))]
    data_a = labelled(root / "a", (6, 3))
    data_b = labelled(root / "b", (6, 3))
    shutil.rmtree(data_b / "train" / "dark")  # B: other files -> another fingerprint
    shutil.copytree(data_a / "train" / "dark", data_b / "train" / "dark", ignore=shutil.ignore_patterns("0.npy"))
    return c, vs, data_a, data_b


def test_promotion_branches(capsys, setup):
    c, (v1, v2, v3), data_a, data_b = setup
    champion = lambda: c.get_model_version_by_alias(NAME, "champion").version  # noqa: E731

    out, _ = d2v(capsys, "evaluate", f"models:/{NAME}/{v1}", "--data", data_a, "--promote")
    assert out["promoted"] and champion() == v1
    acc_a, fp_a = out["accuracy"], out["data_fingerprint"]

    # already the champion -> unchanged
    out, _ = d2v(capsys, "evaluate", f"models:/{NAME}/{v1}", "--data", data_a, "--promote")
    assert out["promoted"] is False and out["promotion_reason"] == f"unchanged: v{v1} is already the champion ({acc_a:.4f})"

    # a tie: the same weights score the same -> no move (promotion needs strictly better)
    out, _ = d2v(capsys, "evaluate", f"models:/{NAME}/{v2}", "--data", data_a, "--promote")
    assert out["accuracy"] == acc_a and out["promoted"] is False and champion() == v1
    assert out["promotion_reason"] == f"not promoted: {acc_a:.4f} <= champion v{v1} {acc_a:.4f}"

    # the champion was scored on data A; comparing on B scores it on B first and records that
    out, err = d2v(capsys, "evaluate", f"models:/{NAME}/{v2}", "--data", data_b, "--promote")
    assert out["data_fingerprint"] != fp_a
    assert "has no linear-probe result on this data; evaluating it now" in err
    champ_tags = c.get_model_version(NAME, v1).tags
    assert champ_tags[PROBE + "data_fingerprint"] == out["data_fingerprint"]
    acc_b = float(champ_tags[PROBE + "accuracy"])
    assert acc_b == out["accuracy"]  # same weights, same data
    assert out["promotion_reason"] == f"not promoted: {out['accuracy']:.4f} <= champion v{v1} {acc_b:.4f}"
    assert champion() == v1

    # another task: the champion has only probe results -> it is fine-tuned now; probe tags are left alone
    probe_before = {k: v for k, v in c.get_model_version(NAME, v1).tags.items() if k.startswith(PROBE)}
    v2_probe_reason = c.get_model_version(NAME, v2).tags[PROBE + "promotion"]
    out, err = d2v(capsys, "evaluate", f"models:/{NAME}/{v2}", "--data", data_b, "--task", "finetune",
                   "--epochs", "1", "--promote")
    assert "has no finetune result on this data; evaluating it now" in err
    champ_tags = c.get_model_version(NAME, v1).tags
    assert {k: v for k, v in champ_tags.items() if k.startswith(PROBE)} == probe_before
    assert champ_tags[FT + "data_fingerprint"] == out["data_fingerprint"] and FT + "accuracy" in champ_tags
    v2_tags = c.get_model_version(NAME, v2).tags
    assert v2_tags[PROBE + "promotion"] == v2_probe_reason  # the probe's reason is not overwritten
    assert v2_tags[FT + "promotion"] == out["promotion_reason"] and float(v2_tags[FT + "accuracy"]) == out["accuracy"]
    assert out["accuracy"] == float(champ_tags[FT + "accuracy"])  # fine-tuning is seeded: same weights, same score
    assert out["promoted"] is False and champion() == v1

    # models:/name/latest is the highest version number, pinned before scoring
    out, _ = d2v(capsys, "evaluate", f"models:/{NAME}/latest", "--data", data_a)
    assert out["version"] == v3 == max((v1, v2, v3), key=int)
    run = c.get_run(out["eval_run_id"])
    assert run.data.tags["model.version"] == v3 and run.data.tags["model.uri"] == f"models:/{NAME}/latest"
