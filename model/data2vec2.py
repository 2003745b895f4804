"""data2vec 2.0: visible-tokens-only student, conv decoder, M masks per sample, one teacher pass -- named steps.

    mask          = clone_masks(batch.mask, M)                       # (B, M, T) -> (B*M, T), sample-major
    out           = student(batch.inputs, mask, batch.padding_mask)  # visible -> encode -> decode
    target, pad   = teacher_targets_v2(teacher, cfg, ..., out.features)   # (B, T, D): once per sample
    loss          = regression over the masked steps of all B*M copies (+ CLS loss, vision)

Student (fairseq examples/data2vec/models/data2vec2.py): local features are computed once per sample and
repeated M times; positions are added over the whole sequence, then only the kept steps go through the
blocks (masked ones are dropped, not replaced); the decoder gets the encoder outputs back in original
order with the masked slots filled by N(0, 0.01^2) noise and predicts every step. The teacher (EMA of the
encoder only; the decoder is never averaged) sees the unmasked input once per sample and its targets are
repeated for the M copies. The EMA update and everything distributed live in the training loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from .config import Config, ModelConfig, V2Config
from .data2vec import Batch, layer_targets
from .decoder import ConvDecoder, decoder_input
from .encoder import Encoder, EncoderOutput
from .targets import regression_loss


@dataclass
class StudentOutput:
    pred: torch.Tensor  # (B*M, T, D) decoder predictions at every step
    cls: torch.Tensor | None  # (B*M, D) final CLS state (vision), None without a prefix
    features: tuple[torch.Tensor, torch.Tensor | None]  # local features (B, T, D) and their padding (B, T)


def clone_masks(mask: torch.Tensor, clone_batch: int) -> torch.Tensor:
    """(B, M, T) loader masks -> (B*M, T), rows b*M .. b*M+M-1 = sample b's copies (repeat_interleave order)."""
    if mask.ndim != 3 or mask.shape[1] != clone_batch:
        raise ValueError(
            f"v2 masks must be (batch, v2.clone_batch={clone_batch}, steps), got {tuple(mask.shape)}; "
            "the loader builds them with model.masking_v2.make_masks"
        )
    return mask.reshape(-1, mask.shape[-1])


def visible(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the kept steps of each row, in original order: mask (R, T) True = masked -> keep (R, K).

    Every row must keep the same number K of steps (the kept tokens of a batch form one rectangle).
    """
    kept = (~mask).sum(1)  # (R,)
    if kept.numel() and (kept != kept[0]).any():
        raise ValueError(
            f"every v2 mask row must keep the same number of steps, got {sorted(set(kept.tolist()))}; "
            "build masks with model.masking_v2 (they fix the count per row)"
        )
    if kept.numel() == 0 or kept[0] == 0 or kept[0] == mask.shape[1]:
        raise ValueError(f"v2 masks keep {int(kept[0]) if kept.numel() else 0} of {mask.shape[1]} steps; "
                         "need at least one kept and one masked step")
    order = torch.sort(mask.to(torch.uint8), dim=1, stable=True).indices  # kept (0) first, original order
    return order[:, : int(kept[0])]  # (R, K)


class Data2Vec2(nn.Module):
    """The v2 student: what the optimiser trains and DDP wraps -- the shared Encoder + the conv decoder."""

    def __init__(self, model: ModelConfig, v2: V2Config) -> None:
        super().__init__()
        self.encoder = Encoder(model)
        grid = getattr(model.frontend, "grid", None) if v2.decoder.dims == 2 else None
        self.decoder = ConvDecoder(v2.decoder, model.trunk.dim, grid)
        self.clone_batch, self.noise_std = v2.clone_batch, v2.mask_noise_std
        if self.encoder.frontend.mask_emb is not None:
            # masked steps are dropped, never replaced: the mask embedding is unused (frozen so that DDP
            # does not wait for its gradient; it stays in the checkpoint for the v1 layout)
            self.encoder.frontend.mask_emb.requires_grad_(False)

    def forward(
        self, inputs: torch.Tensor, mask: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> StudentOutput:
        """inputs: B samples; mask: (B*M, T) bool, True = masked, sample-major (see `clone_masks`)."""
        feats, pad = self.encoder.features(inputs, padding_mask)  # (B, T, D): once per sample
        if mask.shape != (feats.shape[0] * self.clone_batch, feats.shape[1]):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit {feats.shape[0]} samples x M={self.clone_batch} "
                f"copies x {feats.shape[1]} steps (what the front end produced)"
            )
        keep = visible(mask)  # (B*M, K)
        out = self.encode(feats, pad, mask, keep)  # (B*M, P+K, D)
        pred = self.decode(out, keep, feats.shape[1])  # (B*M, T, D)
        cls = out.last[:, out.prefix_len - 1] if out.prefix_len else None  # (B*M, D)
        return StudentOutput(pred=pred, cls=cls, features=(feats, pad))

    def encode(
        self, feats: torch.Tensor, pad: torch.Tensor | None, mask: torch.Tensor, keep: torch.Tensor
    ) -> EncoderOutput:
        """Repeat the local features M times and run the trunk on the kept steps only."""
        M = self.clone_batch
        # masked steps are dropped after the positions are added; only speech's positional conv sees them,
        # as zeros (the reference's encoder_zero_mask)
        x = feats.repeat_interleave(M, 0).masked_fill(mask[..., None], 0.0)  # (B*M, T, D)
        pad = pad.repeat_interleave(M, 0) if pad is not None else None
        return self.encoder.context(x, pad, keep=keep)  # (B*M, P+K, D)

    def decode(self, out: EncoderOutput, keep: torch.Tensor, length: int) -> torch.Tensor:
        """Encoder outputs (prefix removed) back at their steps, noise elsewhere -> decoder -> (B*M, T, D)."""
        vis = self.decoder.input_drop(out.last[:, out.prefix_len :])  # (B*M, K, D)
        return self.decoder(decoder_input(vis, keep, length, self.noise_std))


@torch.no_grad()
def teacher_targets_v2(
    teacher: Encoder,
    cfg: Config,
    inputs: torch.Tensor,
    padding_mask: torch.Tensor | None,
    student_features: tuple[torch.Tensor, torch.Tensor | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher pass per sample on the unmasked input -> targets (B, T, D) float32 and their padding (B, T).

    v2.teacher_local_encoder: the teacher's own front end runs on `inputs` (vision); otherwise the student's
    local features are contextualised by the teacher (speech: teacher positional conv + ALiBi; text: shared
    embeddings), as fairseq's `ema_local_encoder` / `ema_encoder_only`.
    """
    teacher.eval()
    if cfg.v2 is not None and cfg.v2.teacher_local_encoder:
        x, pad = teacher.features(inputs, padding_mask)
    else:
        x, pad = student_features
        x = x.detach()
    return layer_targets(teacher.context(x, pad, layer_output=cfg.targets.layer_output), cfg)  # (B, T, D), (B, T)


def data2vec2_loss(
    student: nn.Module,
    teacher: Encoder,
    cfg: Config,
    batch: Batch,
    *,
    student_precision: Callable[[], ContextManager] = nullcontext,
    teacher_precision: Callable[[], ContextManager] = nullcontext,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One data2vec 2.0 objective evaluation -> (loss, pred (N, D), target (N, D)) over the N masked steps.

    batch.mask: (B, M, T). Loss (fairseq d2v_loss / sample_size): sum over the N masked, non-padded steps of
    all copies of the per-step loss (sum over dims x scale), / N. CLS loss (v2.cls_loss > 0): the CLS state
    of each copy regresses the mean of its sample's patch targets; the reference adds
    d2v_loss(cls) x cls_loss x N before dividing by N, i.e. cls_loss x (per-copy loss summed over copies).
    """
    M = cfg.v2.clone_batch  # type: ignore[union-attr]
    mask = clone_masks(batch.mask, M)  # (B*M, T)
    with student_precision():
        out = student(batch.inputs, mask, batch.padding_mask)
    with teacher_precision():
        y, pad = teacher_targets_v2(teacher, cfg, batch.inputs, batch.padding_mask, out.features)  # (B, T, D)
    sel = mask if pad is None else mask & ~pad.repeat_interleave(M, 0)  # (B*M, T) loss steps
    pred = out.pred[sel]  # (N, D)
    target = y.repeat_interleave(M, 0)[sel]  # (N, D): a sample's targets, shared by its M copies
    l = cfg.loss
    loss = regression_loss(pred, target, l.kind, l.beta, l.dim_reduce, l.scale)
    if cfg.v2.cls_loss > 0:  # type: ignore[union-attr]
        cls_target = y.mean(1).repeat_interleave(M, 0)  # (B*M, D): mean patch target per copy
        cls = regression_loss(out.cls, cls_target, l.kind, l.beta, l.dim_reduce, l.scale)
        loss = loss + cfg.v2.cls_loss * cls_target.shape[0] * cls  # type: ignore[union-attr]
    return loss, pred, target
