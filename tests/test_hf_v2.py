"""`d2v export --format hf` on data2vec 2.0 checkpoints, against Hugging Face transformers.

Text v2 keeps RoBERTa's encoder (the conv decoder is training state), so the exported directory must load in
stock `Data2VecTextModel` and give our encoder's hidden states. Speech v2 (ALiBi attention bias) and vision v2
(post-LN blocks with an embedding LayerNorm; HF's vision model is BEiT's pre-LN ViT) have no HF class that
holds them exactly: the command must refuse, exit 2, name the config field and write nothing.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require

transformers = require("transformers", "Data2VecTextModel is the reference for the exported text v2 encoder")

from model.checkpoint import save_checkpoint  # noqa: E402
from model.data2vec2 import Data2Vec2  # noqa: E402
from model.presets import get_preset  # noqa: E402
from tests.test_hf_parity import make_inputs, max_diff, perturb_  # noqa: E402
from workers.cli import main  # noqa: E402


def _v2_checkpoint(modality: str, path, seed: int = 0):
    """A v2 tiny student (encoder + conv decoder), every parameter perturbed, saved as a training checkpoint."""
    cfg = get_preset(modality, "tiny", "v2")
    torch.manual_seed(seed)
    student = Data2Vec2(cfg.model, cfg.v2)
    perturb_(student, seed=seed + 1)  # no zero bias / unit LayerNorm / zero position can hide a mapping error
    save_checkpoint(path, cfg, student.eval())
    return cfg, student.encoder.eval()


def test_text_v2_export_matches_hf_data2vec_text(tmp_path):
    cfg, enc = _v2_checkpoint("text", tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(out)]) == 0
    hf, info = transformers.Data2VecTextModel.from_pretrained(out, attn_implementation="eager",
                                                              output_loading_info=True)
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}  # not part of data2vec
    assert not info["unexpected_keys"] and not info["mismatched_keys"]  # the decoder stayed behind
    x, kw, valid = make_inputs(cfg, seed=3)  # 3 sequences, two of them padded
    with torch.no_grad():
        ours, ref = enc(x).last, hf.eval()(**kw).last_hidden_state
    assert ours.shape == ref.shape
    assert max_diff(ours, ref, valid) <= 1e-5


@pytest.mark.parametrize(
    "modality, field",
    [("audio", "model.frontend.alibi=True"), ("vision", "model.trunk.norm_style='post'")],
)
def test_v2_export_without_an_hf_class_is_refused_naming_the_field(tmp_path, capsys, modality, field):
    _v2_checkpoint(modality, tmp_path / "ckpt")
    out = tmp_path / "hf"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2v export: error: ") and "Traceback" not in err
    assert f"{field} cannot be exported to Hugging Face" in err
    assert "d2v embed" in err  # says what to do instead
    assert not out.exists()
