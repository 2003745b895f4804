"""Optimiser and learning-rate schedules (pure functions of the step), per SPEC 2 optimiser rows."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import OptimConfig

def _matches(name: str, patterns: list[str]) -> bool:
    """`name` is one of `patterns` or ends with "." + one of them (`cls_token` ~ `encoder.frontend.cls_token`)."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def decays(name: str, p: torch.Tensor, cfg: OptimConfig) -> bool:
    """Whether parameter `name` gets weight decay, by the preset's rule (data, not a modality branch).

    fairseq (speech, text): one parameter group, every parameter decayed (`no_decay_1d` False, lists empty).
    BEiT / data2vec_vision `get_parameter_groups`: no decay on 1-D tensors, `.bias` and `no_weight_decay()`
    names; `decay` re-admits tensors that are 1-D only in our layout (the mask embedding).
    """
    if _matches(name, cfg.no_decay):
        return False
    if cfg.no_decay_1d and (p.ndim <= 1 or name.endswith(".bias")):
        return _matches(name, cfg.decay)
    return True


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """[decayed group] or [decayed, not decayed]: the second group only when the rule leaves something out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p, cfg) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam and AdamW both with decoupled weight decay: fairseq's Adam shrinks p by lr * wd before the Adam
    update, as torch's AdamW does."""
    return torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for update `step` (0-based) of `max_steps`."""
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * progress))
    # tri_stage (fairseq): linear warmup from lr*0.01, hold, exponential decay to lr*final_scale
    warm, hold, decay = (round(f * max_steps) for f in cfg.tri_stage)
    init = cfg.lr * 0.01
    if step < warm:
        return init + (cfg.lr - init) * step / max(1, warm)
    if step < warm + hold:
        return cfg.lr
    t = min(step - warm - hold, decay)
    return cfg.lr * math.exp(math.log(cfg.tri_stage_final_scale) * t / max(1, decay))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
