"""The data2vec 2.0 conv decoder and its input (fairseq examples/data2vec modalities: Decoder1d / Decoder2d).

The student encodes only the kept steps; `decoder_input` puts its outputs back at their positions in the
full sequence and fills the masked positions with N(0, std^2) noise, and `ConvDecoder` predicts every
position from that; the loss then reads the predictions at the masked positions.

    x = decoder_input(decoder.input_drop(visible), keep, T, noise_std)  # (B, T, D), original order
    y = decoder(x)                                                       # (B, T, D)

The decoder is training state only: it is never averaged into the teacher and not needed downstream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig


def decoder_input(visible: torch.Tensor, keep: torch.Tensor, length: int, noise_std: float) -> torch.Tensor:
    """Encoder outputs of the kept steps back in original order, masked steps filled with noise.

    visible: (B, K, D) encoder outputs (prefix removed), in the order of keep; keep: (B, K) step indices.
    Returns (B, length, D): row b has visible[b, j] at keep[b, j] and N(0, noise_std^2) elsewhere (the
    reference's `decoder_input`: noise tokens appended, then un-shuffled with ids_restore).
    """
    B, K, D = visible.shape
    noise = visible.new_empty(B, length, D).normal_(0.0, noise_std)  # (B, T, D)
    return torch.scatter(noise, 1, keep[..., None].expand(B, K, D), visible)  # (B, T, D)


class _ConvLayer(nn.Module):
    """Grouped conv ("same" length) -> LayerNorm over channels, no affine -> GELU; 1-D or 2-D."""

    def __init__(self, dims: int, c_in: int, c_out: int, kernel: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(c_in, c_out, kernel, padding=kernel // 2, groups=groups)
        self.width = c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) or (B, C, H, W)
        x = self.conv(x).movedim(1, -1)  # channels last for the norm
        return F.gelu(F.layer_norm(x, (self.width,), eps=1e-5)).movedim(-1, 1)


class ConvDecoder(nn.Module):
    """`layers` x conv layer, residual where input and output widths match (if cfg.residual), then a
    projection back to the model width D: Linear(width, D), or with proj_layers=2 (text)
    Linear(width, ratio x width) -> GELU -> Linear(ratio x width, D).

    dims=1 convolves over the sequence; dims=2 reshapes the N = grid^2 patches to the grid first (vision).
    Weights keep PyTorch's default init, as the reference's (its `reset_parameters` re-inits the projection
    with nn.Linear's default; the convs are untouched by init_bert_params).
    """

    def __init__(self, cfg: DecoderConfig, dim: int, grid: int | None = None) -> None:
        super().__init__()
        if cfg.dims == 2 and grid is None:
            raise ValueError("a 2-D decoder needs the patch grid side (model.frontend.grid)")
        self.cfg, self.grid = cfg, grid
        self.input_drop = nn.Dropout(cfg.input_dropout)
        widths = [dim] + [cfg.width] * cfg.layers
        self.layers = nn.ModuleList(
            [_ConvLayer(cfg.dims, widths[i], widths[i + 1], cfg.kernel, cfg.groups) for i in range(cfg.layers)]
        )
        self.residual = [cfg.residual and widths[i] == widths[i + 1] for i in range(cfg.layers)]
        proj: list[nn.Module] = []
        width = cfg.width
        for i in range(cfg.proj_layers - 1):
            hidden = int(width * cfg.proj_ratio) if i == 0 else width
            proj += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        proj.append(nn.Linear(width, dim))
        self.proj = nn.Sequential(*proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) full sequence (masked steps filled) -> predictions (B, T, D)."""
        B, T, D = x.shape
        h = x.transpose(1, 2)  # (B, D, T)
        if self.cfg.dims == 2:
            if T != self.grid * self.grid:
                raise ValueError(f"2-D decoder got {T} steps, expected {self.grid}x{self.grid} patches")
            h = h.reshape(B, D, self.grid, self.grid)  # (B, D, G, G), row-major patches
        for layer, res in zip(self.layers, self.residual):
            h = layer(h) + h if res else layer(h)
        h = h.reshape(B, self.cfg.width, T).transpose(1, 2)  # (B, T, width)
        return self.proj(h)  # (B, T, D)
