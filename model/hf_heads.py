"""Hugging Face exports of fine-tuned models: an encoder + its task head -> a stock HF `*For*` class.

    export_hf_ctc(encoder, cfg, head_state, out_dir, files)            -> Data2VecAudioForCTC (+ processor files)
    export_hf_classifier(encoder, cfg, head_state, head, classes, out) -> Data2VecTextForSequenceClassification,
                                                                          Data2VecVisionForImageClassification
The encoder part is model/hf.py's (same names, config and refusals); this file adds only each head's mapping.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import Config, ConfigError
from .encoder import Encoder
from .hf import _BASE_PREFIX, _hf_config, _to_hf_state, _write_hf_dir


def export_hf_ctc(
    encoder: Encoder, cfg: Config, head_state: dict[str, torch.Tensor], out_dir: str | os.PathLike,
    files: dict[str, str], **config: Any,
) -> Path:
    """A CTC fine-tuned audio encoder -> a HF `Data2VecAudioForCTC` directory: the encoder under
    `data2vec_audio.`, the head's projection (model/ctc.py CtcHead `proj`) as `lm_head`, blank = pad id 0.
    `files`: extra text files (the processor's, model/ctc.py `hf_processor_files`); `config`: extra HF
    config fields (e.g. final_dropout, SpecAugment settings for further fine-tuning in HF)."""
    if cfg.model.modality != "audio":
        raise ValueError(f"a CTC model needs an audio encoder, not {cfg.model.modality}")
    w, b = head_state["proj.weight"], head_state["proj.bias"]  # (V, D), (V,)
    hf_cfg = _hf_config(cfg.model)
    hf_cfg.update(architectures=["Data2VecAudioForCTC"], vocab_size=w.shape[0], pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, ctc_zero_infinity=True, dtype=str(w.dtype).removeprefix("torch."), **config)
    state = {f"{_BASE_PREFIX['audio']}{k}": v for k, v in _to_hf_state(encoder.state_dict(), cfg.model).items()}
    state.update({"lm_head.weight": w, "lm_head.bias": b})
    return _write_hf_dir(out_dir, hf_cfg, state, files=files)


# fine-tuned classifiers: (modality, head kind) -> (HF architecture, our head's names -> HF's)
_CLASSIFIERS = {
    ("text", "sentence"): ("Data2VecTextForSequenceClassification", {
        "dense.weight": "classifier.dense.weight", "dense.bias": "classifier.dense.bias",
        "out_proj.weight": "classifier.out_proj.weight", "out_proj.bias": "classifier.out_proj.bias"}),
    ("vision", "mean"): ("Data2VecVisionForImageClassification", {
        "norm.weight": "data2vec_vision.pooler.layernorm.weight", "norm.bias": "data2vec_vision.pooler.layernorm.bias",
        "fc.weight": "classifier.weight", "fc.bias": "classifier.bias"}),
}


def export_hf_classifier(
    encoder: Encoder, cfg: Config, head_state: dict[str, torch.Tensor], head: str, classes: list[str],
    out_dir: str | os.PathLike, tokenizer_json: str | os.PathLike | None = None,
) -> Path:
    """A fine-tuned classifier (model/heads.py) -> a HF directory whose logits equal ours (eval mode):
    text + SentenceHead -> `Data2VecTextForSequenceClassification` (`classifier.dense/out_proj` on <s>);
    vision + MeanPoolHead -> `Data2VecVisionForImageClassification` with `use_mean_pooling=True`: HF's final
    `layernorm` is then Identity and its pooler LayerNorms the mean of the patch tokens, which is exactly our
    head reading the last block before the final norm (BEiT fine-tuning drops the pretrained final norm), so
    our `final_norm` weights are not exported. `classes` become id2label / label2id."""
    m = cfg.model
    if (m.modality, head) not in _CLASSIFIERS:
        raise ConfigError(f"no Hugging Face classifier for a {m.modality} encoder with a {head!r} head (exported: "
                          f"{sorted(_CLASSIFIERS)})")
    arch, names = _CLASSIFIERS[(m.modality, head)]
    hf_cfg = _hf_config(m)
    labels = {str(i): str(c) for i, c in enumerate(classes)}
    hf_cfg.update(architectures=[arch], id2label=labels, label2id={c: int(i) for i, c in labels.items()},
                  problem_type="single_label_classification",
                  dtype=str(next(encoder.parameters()).dtype).removeprefix("torch."))
    enc_state = encoder.state_dict()
    if m.modality == "vision":
        hf_cfg["use_mean_pooling"] = True
        enc_state = {k: v for k, v in enc_state.items() if not k.startswith("final_norm.")}
    if m.modality == "text":
        hf_cfg["classifier_dropout"] = None
    state = {f"{_BASE_PREFIX[m.modality]}{k}": v for k, v in _to_hf_state(enc_state, m).items()}
    state.update({names[k]: v for k, v in head_state.items()})
    return _write_hf_dir(out_dir, hf_cfg, state, tokenizer_json, m.frontend)


__all__ = ["export_hf_ctc", "export_hf_classifier"]
