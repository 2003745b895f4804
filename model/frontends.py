"""Modality front ends behind one interface.

A front end maps raw model inputs to local features [B, T, D] (before masking) and owns the parts that
come after masking but before the trunk: a prefix (CLS) and the positional encoding. The encoder calls:

    x, pad = frontend.features(inputs, padding_mask)     # (B, T, D), (B, T) or None
    x      = masked positions replaced by the mask embedding (if the front end has one)
    x, pad, bias = frontend.contextualize(x, pad)        # add prefix / positions; bias for attention
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioFrontendConfig, ImageFrontendConfig, ModelConfig, TextFrontendConfig
from .layers import RelativePositionBias


class ImageFrontend(nn.Module):
    """Conv2d patch embedding; CLS prefix; optional shared relative position bias (BEiT)."""

    prefix_len = 1

    def __init__(self, cfg: ImageFrontendConfig, dim: int, heads: int, rel_pos_bias: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.rel_pos = RelativePositionBias(cfg.grid, heads) if rel_pos_bias else None

    def features(self, pixels: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = self.patch_embed(pixels)  # (B, D, G, G)
        if x.shape[-1] != self.cfg.grid or x.shape[-2] != self.cfg.grid:
            raise ValueError(
                f"image of {tuple(pixels.shape[-2:])} pixels does not give the configured "
                f"{self.cfg.grid}x{self.cfg.grid} patch grid (model.frontend.image_size={self.cfg.image_size})"
            )
        return x.flatten(2).transpose(1, 2), None  # (B, N, D)

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        bias = self.rel_pos() if self.rel_pos is not None else None  # (1, H, 1+N, 1+N)
        return x, None, bias

    def init_weights_(self, std: float) -> None:
        w = self.patch_embed.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.cls_token, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(self.mask_emb, std=std, a=-2 * std, b=2 * std)


class _ConvLayer(nn.Module):
    """Conv1d -> LayerNorm over channels (eps 1e-5, affine) -> GELU: wav2vec 2.0 'layer_norm' mode."""

    def __init__(self, c_in: int, c_out: int, k: int, s: int, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, k, stride=s, bias=bias)
        self.norm = nn.LayerNorm(c_out, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (B, C, T')
        return F.gelu(self.norm(x.transpose(1, 2)).transpose(1, 2))


class _PosConvLayer(nn.Module):
    """Grouped Conv1d ("same" length) -> LayerNorm without affine -> GELU."""

    def __init__(self, dim: int, k: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, k, padding=k // 2, groups=groups)
        self.trim = 1 if k % 2 == 0 else 0
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, T)
        x = self.conv(x)
        if self.trim:
            x = x[..., : -self.trim]
        return F.gelu(F.layer_norm(x.transpose(1, 2), (self.dim,), eps=1e-5).transpose(1, 2))


def audio_frames(num_samples: int | torch.Tensor, conv_layers: list[tuple[int, int, int]]):
    """Number of feature frames the conv extractor produces from num_samples waveform samples."""
    n = num_samples
    for _, k, s in conv_layers:
        n = (n - k) // s + 1
    return n


class AudioFrontend(nn.Module):
    """wav2vec 2.0 conv feature extractor + LayerNorm + Linear projection; conv positional encoder."""

    prefix_len = 0

    def __init__(self, cfg: AudioFrontendConfig, dim: int, ln_eps: float) -> None:
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], 1
        for c, k, s in cfg.conv_layers:
            layers.append(_ConvLayer(c_in, c, k, s, cfg.conv_bias))
            c_in = c
        self.conv = nn.ModuleList(layers)
        self.proj_norm = nn.LayerNorm(c_in, eps=ln_eps)
        self.proj = nn.Linear(c_in, dim)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.pos_conv = nn.ModuleList(
            [_PosConvLayer(dim, cfg.pos_conv_kernel, cfg.pos_conv_groups) for _ in range(cfg.pos_conv_depth)]
        )

    def features(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = wav[:, None, :]  # (B, 1, S)
        for layer in self.conv:
            x = layer(x)  # (B, C, T)
        x = self.feature_dropout(self.proj(self.proj_norm(x.transpose(1, 2))))  # (B, T, D)
        pad = None
        if padding_mask is not None:
            lengths = audio_frames((~padding_mask).sum(-1), self.cfg.conv_layers)  # (B,)
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # (B, T)
            if not pad.any():
                pad = None
        return x, pad

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        p = x.transpose(1, 2)  # (B, D, T)
        for layer in self.pos_conv:
            p = layer(p)
        return x + p.transpose(1, 2), padding_mask, None

    def init_weights_(self, std: float) -> None:
        for layer in self.conv:
            nn.init.kaiming_normal_(layer.conv.weight)
        for layer in self.pos_conv:
            k, d = layer.conv.kernel_size[0], layer.dim
            nn.init.normal_(layer.conv.weight, mean=0.0, std=math.sqrt(4.0 / (k * d)))
            nn.init.zeros_(layer.conv.bias)
        nn.init.uniform_(self.mask_emb)


class TextFrontend(nn.Module):
    """Token embeddings + learned absolute positions (RoBERTa offset: pad=1, first position 2) + LayerNorm.

    Masking for text happens on the input ids (<mask> token), so there is no separate mask embedding.
    """

    prefix_len = 0

    def __init__(self, cfg: TextFrontendConfig, dim: int, ln_eps: float, dropout: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokens = nn.Embedding(cfg.vocab_size, dim, padding_idx=cfg.pad_id)
        self.positions = nn.Embedding(cfg.max_positions, dim, padding_idx=cfg.pad_id)
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.drop = nn.Dropout(dropout)
        self.mask_emb = None

    def position_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """RoBERTa positions: non-pad tokens count from pad_id + 1; pads get pad_id."""
        keep = ids.ne(self.cfg.pad_id).long()  # (B, T)
        return torch.cumsum(keep, dim=1) * keep + self.cfg.pad_id

    def features(self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if ids.shape[1] + self.cfg.pad_id + 1 > self.cfg.max_positions:
            raise ValueError(
                f"text of {ids.shape[1]} tokens exceeds model.frontend.max_positions={self.cfg.max_positions} "
                f"(minus the pad offset {self.cfg.pad_id + 1})"
            )
        x = self.tokens(ids) + self.positions(self.position_ids(ids))  # (B, T, D)
        pad = ids.eq(self.cfg.pad_id)
        return self.drop(self.norm(x)), (pad if pad.any() else None)

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None):
        return x, padding_mask, None

    def init_weights_(self, std: float) -> None:
        for emb in (self.tokens, self.positions):
            nn.init.normal_(emb.weight, std=std)
            with torch.no_grad():
                emb.weight[self.cfg.pad_id].zero_()


def build_frontend(cfg: ModelConfig) -> nn.Module:
    t, f = cfg.trunk, cfg.frontend
    if isinstance(f, ImageFrontendConfig):
        return ImageFrontend(f, t.dim, t.heads, t.rel_pos_bias)
    if isinstance(f, AudioFrontendConfig):
        return AudioFrontend(f, t.dim, t.ln_eps)
    return TextFrontend(f, t.dim, t.ln_eps, t.dropout)
