"""v1 presets and initialisation against the reference code's values (issue 9).

Sources: data2vec_vision beit/README.md pretraining commands and beit/modeling_cyclical.py (trunc_normal_
wrapper a=-std, b=std); fairseq examples/data2vec/config/audio/pretraining/base_librispeech.yaml and
text/pretraining/base.yaml; fairseq data2vec_audio.py (collapse guard after 5000 updates, default
min_target_var .1 / min_pred_var .01); fairseq init_bert_params (normal(0, .02), untruncated) and the
pos_conv_depth > 1 positional conv stack, which keeps nn.Conv1d's own init. Distribution facts come from
scipy.stats, not from our code.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from model.data2vec import Data2Vec
from model.layers import Block
from model.presets import (audio_base, audio_large, audio_tiny, text_base, text_large, text_tiny, vision_base,
                           vision_large, vision_large_phase2, vision_tiny)

IMAGENET_TRAIN = 1_281_167  # ImageNet-1K train images


# ------------------------------------------------------------------------------------- preset values
def test_vision_attention_dropout_as_the_pretraining_commands():
    assert vision_base().model.trunk.attn_dropout == 0.05  # ViT-B: --attn_drop_rate 0.05
    assert vision_large().model.trunk.attn_dropout == 0.15  # ViT-L: --attn_drop_rate 0.15
    assert vision_large_phase2().model.trunk.attn_dropout == 0.15


def test_vision_schedules_in_reference_epochs():
    # ViT-B: 128 x 16 GPUs, 800 epochs, 10 warmup epochs (BEiT: len(dataset) // total batch per epoch)
    b = vision_base()
    spe_b = IMAGENET_TRAIN // (128 * 16)  # 625
    assert (b.train.batch_size, b.train.max_steps, b.optim.warmup_steps) == (128, 800 * spe_b, 10 * spe_b)
    # ViT-L phase 1: 64 x 64 GPUs = 4096 images, 312 updates per epoch, 800 epochs, 80 warmup, EMA .9998
    spe_l = IMAGENET_TRAIN // (64 * 64)
    assert spe_l == 312
    large = vision_large()
    assert (large.train.batch_size, large.train.max_steps, large.optim.warmup_steps) == (64, 800 * spe_l, 80 * spe_l)
    assert large.train.max_steps == 249_600 and large.optim.lr == 1e-3
    assert (large.teacher.tau0, large.teacher.tau_end) == (0.9998, 0.9998)
    # phase 2 (the 1600-epoch model): another 800 epochs, constant EMA .9999, 40 warmup epochs
    p2 = vision_large_phase2()
    assert (p2.train.max_steps, p2.optim.warmup_steps) == (800 * spe_l, 40 * spe_l)
    assert (p2.teacher.tau0, p2.teacher.tau_end, p2.teacher.tau_steps) == (0.9999, 0.9999, 0)
    assert p2.model == large.model and p2.optim.lr == large.optim.lr and p2.masking == large.masking


def test_speech_crop_masks_and_token_budget_as_base_librispeech():
    for cfg in (audio_base(), audio_large()):
        assert (cfg.data.max_samples, cfg.data.min_samples) == (320_000, 32_000)  # max/min_sample_size
        assert cfg.train.max_tokens == 3_800_000  # per GPU, 16 GPUs
        assert cfg.masking.require_same_masks and (cfg.masking.mask_prob, cfg.masking.span_length) == (0.65, 10)
    assert audio_tiny().train.max_tokens is None  # tiny keeps clip counts


def test_text_masking_and_batching_as_base_yaml():
    for cfg in (text_base(), text_large()):
        m = cfg.masking
        # mask_prob .35, mask_multiple_length 4, random_token_prob 0, leave_unmasked_prob 0, no minimum
        assert (m.kind, m.mask_prob, m.span_length, m.min_spans) == ("span", 0.35, 4, 0)
        assert cfg.data.block_size == 512 and cfg.train.max_tokens == 8192  # tokens_per_sample, max_tokens
    assert text_tiny().train.max_tokens is None


@pytest.mark.parametrize("preset,guard", [
    (audio_base, (0.1, 0.01, 5000)), (audio_large, (0.1, 0.01, 5000)),
    (vision_base, (0.0, 0.0)), (vision_large, (0.0, 0.0)), (text_base, (0.0, 0.0)), (text_large, (0.0, 0.0)),
])
def test_collapse_guard_only_where_the_reference_has_one(preset, guard):
    t = preset().train
    # thresholds 0 = off: the guard stops when a mean std (>= sqrt(eps) > 0) is *below* them, never here
    assert (t.collapse_min_target_var, t.collapse_min_pred_var) == guard[:2]
    if len(guard) == 3:
        assert t.collapse_after == guard[2]


# ---------------------------------------------------------------------------------------- initialisation
def _trunk_linear_weights(model: nn.Module) -> torch.Tensor:
    ws = [m.weight.detach().flatten() for blk in model.modules() if isinstance(blk, Block)
          for m in blk.modules() if isinstance(m, nn.Linear)]
    return torch.cat(ws)


def _rescaled_back(model: Data2Vec) -> torch.Tensor:
    """Trunk Linear weights with BEiT's fix_init_weight (proj / fc2 divided by sqrt(2 * layer)) undone."""
    ws = []
    for i, blk in enumerate(b for b in model.modules() if isinstance(b, Block)):
        for name, m in blk.named_modules():
            if isinstance(m, nn.Linear):
                scale = math.sqrt(2.0 * (i + 1)) if name in ("attn.proj", "mlp.fc2") else 1.0
                ws.append(m.weight.detach().flatten() * scale)
    return torch.cat(ws)


def test_vision_init_is_beit_trunc_normal_at_one_sigma():
    torch.manual_seed(0)
    cfg = vision_base()
    assert cfg.model.init_trunc == 1.0
    model = Data2Vec(vision_tiny().model)
    std = cfg.model.init_std
    w = _rescaled_back(model)
    assert w.abs().max() <= std + 1e-7  # cut at +-1 sigma
    assert abs(w.std().item() - stats.truncnorm(-1, 1, scale=std).std()) < 0.02 * std  # 0.5396 std
    fe = model.encoder.frontend
    for t in (fe.patch_embed.weight, fe.cls_token, fe.mask_emb, model.head.net.weight):
        assert t.abs().max() <= std + 1e-7


@pytest.mark.parametrize("preset", [audio_tiny, text_tiny])
def test_fairseq_init_is_untruncated_normal(preset):
    torch.manual_seed(0)
    cfg = preset()
    assert cfg.model.init_trunc is None
    w = _trunk_linear_weights(Data2Vec(cfg.model))
    std = cfg.model.init_std
    assert abs(w.std().item() - std) < 0.03 * std
    beyond = (w.abs() > 2 * std).float().mean().item()  # normal: 4.55% beyond 2 sigma; cut at 2 sigma: 0
    assert abs(beyond - 2 * stats.norm.sf(2)) < 0.006


def _torch_default_bound(m: nn.Module) -> float:
    """nn.Linear / nn.Conv1d reset_parameters: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
    fan_in = m.weight[0].numel()
    return 1 / math.sqrt(fan_in)


def test_speech_pos_conv_projection_and_head_keep_pytorch_default_init():
    torch.manual_seed(0)
    cfg = audio_tiny()
    model = Data2Vec(cfg.model)
    fe = model.encoder.frontend
    for m in [layer.conv for layer in fe.pos_conv] + [fe.proj, model.head.net]:
        bound = _torch_default_bound(m)
        w = m.weight.detach()
        assert w.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform, not normal(0, .02)
        assert m.bias.abs().max() > 0  # default bias init, not zeros


def test_text_regression_head_keeps_pytorch_default_init():
    torch.manual_seed(0)
    model = Data2Vec(text_tiny().model)
    for m in model.head.net:
        if isinstance(m, nn.Linear):
            bound = _torch_default_bound(m)
            assert m.weight.abs().max() <= bound and abs(m.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
