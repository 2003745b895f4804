"""Optimiser and learning-rate schedules (pure functions of the step), per SPEC 2 optimiser rows."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.config import OptimConfig

# Parameters that never get weight decay besides 1-D tensors (biases, norms, layer scale): positions, CLS,
# mask embeddings, relative position tables (BEiT/data2vec_vision `no_weight_decay`).
NO_DECAY_NAMES = ("cls_token", "mask_emb", "rel_pos.table", "positions.weight", "pos_conv")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weight matrices, and everything 1-D / positional / CLS without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam and AdamW both with decoupled weight decay (fairseq's Adam applies decoupled decay too)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
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
