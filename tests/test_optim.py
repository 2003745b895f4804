"""Weight-decay groups against the reference code's rules, applied to the reference's own parameter shapes.

- vision: data2vec_vision / BEiT `optim_factory.get_parameter_groups` -- no decay where
  `len(param.shape) == 1 or name.endswith(".bias") or name in model.no_weight_decay()` with
  `no_weight_decay() == {"pos_embed", "cls_token"}`; evaluated on Hugging Face's Data2VecVisionModel (the
  reference layout: mask_token (1, 1, D), a 2-D relative position table) and mapped to our names.
- speech, text: fairseq builds `optim.build_optimizer(cfg.optimizer, params)` from every trainable
  parameter, one group, and its Adam decays each parameter by lr * weight_decay.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Data2VecVisionConfig, Data2VecVisionModel

from model.data2vec import Data2Vec
from model.hf import _BLOCK, _hf_config, hf_name
from model.presets import get_preset
from workers.optim import build_optimizer, param_groups

BEIT_NO_WEIGHT_DECAY = {"pos_embed": "embeddings.position_embeddings", "cls_token": "embeddings.cls_token"}


def beit_decays(name: str, p: torch.Tensor) -> bool:
    """BEiT get_parameter_groups, with no_weight_decay()'s names spelt as Hugging Face spells them."""
    return not (len(p.shape) == 1 or name.endswith(".bias") or name in BEIT_NO_WEIGHT_DECAY.values())


def reference_name(ours: str) -> str:
    """Our encoder parameter name -> the HF Data2VecVisionModel name of the same tensor (fused qkv: its q/v part)."""
    prefix, _, (q, _k, v) = _BLOCK["vision"]
    parts = ours.split(".")
    if parts[0] == "blocks" and parts[2] == "attn" and parts[3] in ("qkv", "q_bias", "v_bias"):
        leaf = {"qkv": f"{q}.weight", "q_bias": f"{q}.bias", "v_bias": f"{v}.bias"}[parts[3]]
        return f"{prefix}.{parts[1]}.{leaf}"
    return hf_name("vision", ours)


def decayed_names(model: torch.nn.Module, groups: list[dict]) -> dict[str, bool]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] > 0 for g in groups for p in g["params"]}


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_vision_groups_follow_beit_on_the_reference_parameter_shapes(size):
    cfg = get_preset("vision", size)
    if size == "base":  # the base rule on a small trunk: same parameter names, faster
        from model.config import apply_overrides

        cfg = apply_overrides(cfg, ["model.trunk.depth=2", "model.trunk.dim=64", "model.trunk.heads=4",
                                    "model.trunk.ffn_dim=128", "targets.top_k=2"])
    ours = Data2Vec(cfg.model)
    hf = {k: v for k, v in _hf_config(cfg.model).items() if k not in ("model_type", "architectures")}
    ref = dict(Data2VecVisionModel(Data2VecVisionConfig(**hf), add_pooling_layer=False).named_parameters())
    lm_head = dict(torch.nn.Linear(cfg.model.trunk.dim, cfg.model.trunk.dim).named_parameters(prefix="lm_head"))

    got = decayed_names(ours, param_groups(ours, cfg.optim))
    assert set(got) == {n for n, _ in ours.named_parameters()}  # every trainable parameter in exactly one group
    for name, decayed in got.items():
        if name.startswith("head."):
            want = beit_decays(f"lm_head.{name.rsplit('.', 1)[1]}", lm_head[f"lm_head.{name.rsplit('.', 1)[1]}"])
        else:
            r = reference_name(name.removeprefix("encoder."))
            want = beit_decays(r, ref[r])
        assert decayed == want, (name, decayed, want)
    # the two the issue names: the reference decays its mask token and its relative position table
    assert got["encoder.frontend.mask_emb"] and got["encoder.frontend.rel_pos.table"]
    assert not got["encoder.frontend.cls_token"] and not got["encoder.blocks.0.ls1"]


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_speech_and_text_decay_every_parameter_in_one_group(modality):
    cfg = get_preset(modality, "tiny")
    model = Data2Vec(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    assert len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.01 == get_preset(modality, "base").optim.weight_decay  # fairseq yaml
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}


def test_decoupled_decay_shrinks_by_lr_times_wd_like_fairseq_adam():
    """With a zero gradient Adam's moment update is zero, so one step leaves only fairseq's
    `p.add_(p, alpha=-weight_decay * lr)` (and nothing on a no-decay parameter)."""
    cfg = get_preset("vision", "tiny")
    model = Data2Vec(cfg.model)
    opt = build_optimizer(model, cfg.optim)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    lr, wd = cfg.optim.lr, cfg.optim.weight_decay
    for n, p in model.named_parameters():
        decayed = n in ("encoder.frontend.mask_emb", "encoder.frontend.rel_pos.table") or p.ndim >= 2
        decayed = decayed and n != "encoder.frontend.cls_token"
        want = before[n] * (1 - lr * wd) if decayed else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7, msg=n)
