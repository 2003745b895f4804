"""data2vec: student (encoder + regression head), teacher targets, loss -- as named steps.

    pred, feats = student(batch.inputs, batch.mask, batch.padding_mask)  # (N, D) at masked steps
    target      = teacher_targets(teacher.model, cfg, batch, feats)     # (N, D), no grad
    loss        = regression_loss(pred, target, ...)                     # scalar

The EMA update and everything distributed live in the training loop (workers/), not here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, ContextManager

import torch
from torch import nn

from .config import Config, ModelConfig
from .encoder import Encoder, EncoderOutput
from .layers import normal_init_
from .targets import build_targets, regression_loss


@dataclass
class Batch:
    """What the loader yields and the step consumes.

    inputs: student inputs -- vision (B, 3, H, W) float; audio (B, S) float waveform; text (B, T) long ids
            (already masked with <mask> for text).
    mask: (B, T) bool over the masked sequence (patches / frames / tokens), True = masked = loss position.
    padding_mask: (B, S or T) bool over `inputs`, True = padded; None = no padding.
    teacher_inputs: what the teacher sees when it differs from `inputs` (text: the unmasked ids); None = same.
    """

    inputs: torch.Tensor
    mask: torch.Tensor
    padding_mask: torch.Tensor | None = None
    teacher_inputs: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        def move(v):
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def __len__(self) -> int:
        return self.inputs.shape[0]


class Head(nn.Module):
    """Regression head: Linear(D, D), or Linear(D, hD) -> GELU -> Linear(hD, D) (text)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.trunk.dim
        if cfg.head.kind == "linear":
            self.net: nn.Module = nn.Linear(d, d)
        else:
            h = d * cfg.head.hidden_mult
            self.net = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
        if cfg.init_outer == "normal":  # BEiT: like the trunk; fairseq: nn.Linear's own init (left as is)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    normal_init_(m.weight, cfg.init_std, cfg.init_trunc)
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Data2Vec(nn.Module):
    """The student: what the optimiser trains and DDP wraps."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.encoder = Encoder(cfg)
        self.head = Head(cfg)

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None]]:
        """-> (pred (N, D) at the N masked steps in row-major order,
               (local features (B, T, D) before masking, their padding mask (B, T) or None))."""
        feats, pad = self.encoder.features(inputs, padding_mask)  # (B, T, D)
        _check_mask(mask, feats)
        out = self.encoder.context(self.encoder.apply_mask(feats, mask), pad)
        x = out.last[:, out.prefix_len :]  # (B, T, D)
        return self.head(x[mask]), (feats, pad)  # (N, D)


@torch.no_grad()
def teacher_targets(
    teacher: Encoder,
    cfg: Config,
    batch: Batch,
    student_features: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Top-K teacher block outputs, normalised and averaged, at the masked steps -> (N, D) float32.

    With scope='layers' the front end is shared with the student, so the student's unmasked local
    features are reused (as the reference code does for speech) unless the teacher sees other inputs (text).
    """
    teacher.eval()
    if student_features is not None and cfg.teacher.scope == "layers" and batch.teacher_inputs is None:
        x, pad = student_features
        x = x.detach().float()
    else:
        inputs = batch.teacher_inputs if batch.teacher_inputs is not None else batch.inputs
        x, pad = teacher.features(inputs, batch.padding_mask)
    y, _ = layer_targets(teacher.context(x, pad, layer_output=cfg.targets.layer_output), cfg)  # (B, T, D)
    return y[batch.mask]  # (N, D)


def layer_targets(out: EncoderOutput, cfg: Config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher per-block outputs (prefix dropped) -> targets (B, T, D) and their padding mask (B, T) or None."""
    P = out.prefix_len
    pad_t = out.padding_mask[:, P:] if out.padding_mask is not None else None
    t = cfg.targets
    return build_targets([h[:, P:] for h in out.layers], t.top_k, t.layer_norm, t.final_norm, pad_t), pad_t


def data2vec_loss(
    student: nn.Module,
    teacher: Encoder,
    cfg: Config,
    batch: Batch,
    *,
    student_precision: Callable[[], ContextManager] = nullcontext,
    teacher_precision: Callable[[], ContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One data2vec objective evaluation -> (loss, pred (N, D), target (N, D)).

    The student's forward runs under student_precision(), the teacher's under teacher_precision() (e.g.
    autocast for the student only, as data2vec_vision does); the loss itself is computed in float32.
    """
    with student_precision():
        pred, feats = student(batch.inputs, batch.mask, batch.padding_mask)
    with teacher_precision():
        target = teacher_targets(teacher, cfg, batch, feats)
    l = cfg.loss
    loss = regression_loss(pred, target, l.kind, l.beta, l.dim_reduce, l.scale)
    return loss, pred, target


def _check_mask(mask: torch.Tensor, feats: torch.Tensor) -> None:
    if mask.shape != feats.shape[:2]:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match the {tuple(feats.shape[:2])} (batch, steps) "
            "the front end produced; the loader must build masks for the model's sequence length"
        )
    if not mask.any():
        raise ValueError("batch has no masked step: nothing to predict (check the masking config)")
