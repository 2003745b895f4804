"""data2vec targets, the regression loss and the collapse statistics: pure functions, no state.

Targets: average of the teacher's top-K block outputs, each normalised first, then an optional final
norm (SPEC section 1). Loss: regression at the masked positions only; the caller gathers those rows
(`x[mask]`) and passes [N, D] tensors. Everything is computed in float32 (statistics in float64).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Norm = Literal["instance", "layer", "none"]
EPS = 1e-5  # fairseq uses the F.instance_norm / F.layer_norm defaults


# ------------------------------------------------------------------------------------------- targets
def instance_norm_time(x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each channel of each sample over time: (x - mean_t) / sqrt(var_t + 1e-5), biased var.

    x: [B, T, D]; padding_mask: [B, T] bool, True = padded. Without padding this is exactly fairseq's
    `F.instance_norm(x.transpose(1, 2)).transpose(1, 2)`; with padding the mean and variance use only
    the valid positions (the reference code includes padded steps in the statistics; we do not).
    Returns [B, T, D]; padded positions are left unnormalised (the caller zeroes them).
    """
    if padding_mask is None:
        return F.instance_norm(x.transpose(1, 2), eps=EPS).transpose(1, 2)  # [B, T, D]
    valid = (~padding_mask).unsqueeze(-1).to(x.dtype)  # [B, T, 1]
    n = valid.sum(1, keepdim=True).clamp(min=1)  # [B, 1, 1]
    mean = (x * valid).sum(1, keepdim=True) / n  # [B, 1, D]
    var = ((x - mean).square() * valid).sum(1, keepdim=True) / n  # [B, 1, D]
    return (x - mean) * torch.rsqrt(var + EPS)  # [B, T, D]


def _normalise(x: torch.Tensor, kind: Norm, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """x: [B, T, D] -> [B, T, D] normalised by `kind` ("layer" = parameter-free LayerNorm over D)."""
    if kind == "instance":
        return instance_norm_time(x, padding_mask)
    if kind == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=EPS)
    if kind == "none":
        return x
    raise ValueError(f"unknown norm {kind!r}; expected 'instance', 'layer' or 'none'")


def build_targets(
    layer_outputs: Sequence[torch.Tensor],
    top_k: int,
    layer_norm: Norm,
    final_norm: Norm,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """data2vec regression targets from the teacher's per-block outputs.

    layer_outputs: one [B, T, D] tensor per block, first block first; the LAST top_k are used.
    Each is cast to float32 and normalised by `layer_norm`, the normalised outputs are averaged, and
    the average is normalised by `final_norm`. padding_mask: [B, T] bool, True = padded; instance-norm
    statistics skip padded steps, and padded positions of the result are zero.

    Returns: [B, T, D] float32 targets (no gradient is needed; call under torch.no_grad()).
    """
    if not 1 <= top_k <= len(layer_outputs):
        raise ValueError(f"top_k={top_k} must be in [1, {len(layer_outputs)}] (number of layer outputs)")
    layers = [_normalise(y.float(), layer_norm, padding_mask) for y in layer_outputs[-top_k:]]
    y = torch.stack(layers).mean(0)  # [B, T, D]
    y = _normalise(y, final_norm, padding_mask)  # [B, T, D]
    if padding_mask is not None:
        y = y.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    return y


# ---------------------------------------------------------------------------------------------- loss
def regression_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: Literal["l2", "smooth_l1"],
    beta: float,
    dim_reduce: Literal["sum", "mean"],
    scale: Literal["inv_sqrt_dim", "one"],
) -> torch.Tensor:
    """Regression loss over the masked positions, as the data2vec reference code computes it.

    pred, target: [N, D], the N masked positions (gathered by the caller, e.g. `x[mask]`).
    Elementwise loss: "l2" = (pred - target)^2 (beta ignored); "smooth_l1" = 0.5 x^2 / beta where
    |x| < beta, else |x| - 0.5 beta (F.smooth_l1_loss). Per position: reduce over D by sum or mean,
    times 1/sqrt(D) or 1. Result: sum over positions / N (0 when N == 0, still attached to the graph).

    Returns: scalar float32.
    """
    pred, target = pred.float(), target.float()
    n, d = pred.shape
    if kind == "l2":
        elem = (pred - target).square()  # [N, D]
    elif kind == "smooth_l1":
        if beta <= 0:
            raise ValueError(f"smooth_l1 needs beta > 0, got {beta}")
        elem = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)  # [N, D]
    else:
        raise ValueError(f"unknown loss kind {kind!r}")
    per_pos = elem.sum(-1) if dim_reduce == "sum" else elem.mean(-1)  # [N]
    factor = 1.0 / math.sqrt(d) if scale == "inv_sqrt_dim" else 1.0
    return per_pos.sum() * factor / max(n, 1)


# ------------------------------------------------------------------------------- collapse statistics
def variance_stats(x: torch.Tensor) -> torch.Tensor:
    """Sufficient statistics for `mean_std`, summable across ranks (all-reduce SUM, then `mean_std`).

    x: [..., D] (flattened to [N, D]). Returns [2*D + 1] float64: (N, sum_n x[n, d], sum_n x[n, d]^2).
    """
    x = x.detach().reshape(-1, x.shape[-1]).double()  # [N, D]
    count = x.new_tensor([x.shape[0]])  # [1]
    return torch.cat([count, x.sum(0), x.square().sum(0)])  # [2D + 1]


def mean_std(stats: torch.Tensor) -> float:
    """Mean over feature dims of sqrt(unbiased per-dim variance + 1e-6), from `variance_stats`.

    This is the reference code's `compute_var` (fairseq data2vec_audio / data2vec_text), the quantity
    its collapse thresholds (target 0.1, prediction 0.01) are compared with. SPEC's wording says
    "variance", but the code takes the mean per-dimension standard deviation; we follow the code.
    Returns nan with fewer than two rows.
    """
    d = (stats.numel() - 1) // 2
    n, s, ss = stats[0], stats[1 : 1 + d], stats[1 + d :]
    if n < 2:
        return float("nan")
    var = (ss - s.square() / n) / (n - 1)  # [D]; = zss/(n-1) - zs^2/(n(n-1)) as in the reference
    return torch.sqrt(var.clamp(min=0) + 1e-6).mean().item()


def mean_std_of(x: torch.Tensor) -> float:
    """`mean_std` of a single process's [..., D] tensor."""
    return mean_std(variance_stats(x))
