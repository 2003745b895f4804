"""Modality front ends behind one interface.

A front end maps raw model inputs to local features [B, T, D] (before masking) and owns the parts that
come after masking but before the trunk: a prefix (CLS) and the positional encoding. The encoder calls:

    x, pad = frontend.features(inputs, padding_mask)     # (B, T, D), (B, T) or None
    x      = masked positions replaced by the mask embedding (if the front end has one)
    x, pad, bias = frontend.contextualize(x, pad)        # add prefix / positions; bias for attention

data2vec 2.0 passes `keep` (B, K) to `contextualize`: positions are added over all T steps first, then only
the kept steps (and the matching rows/columns of the attention bias) go on to the prefix and the trunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AudioFrontendConfig, ImageFrontendConfig, ModelConfig, TextFrontendConfig
from .layers import ALiBi, RelativePositionBias, gather_bias, gather_steps, normal_init_


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
        pos = sincos_2d(cfg.grid, dim)[None] if cfg.pos_embed == "sincos" else None  # (1, N, D), fixed
        self.register_buffer("pos_embed", pos, persistent=False)

    def features(self, pixels: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = self.patch_embed(pixels)  # (B, D, G, G)
        if x.shape[-1] != self.cfg.grid or x.shape[-2] != self.cfg.grid:
            raise ValueError(
                f"image of {tuple(pixels.shape[-2:])} pixels does not give the configured "
                f"{self.cfg.grid}x{self.cfg.grid} patch grid (model.frontend.image_size={self.cfg.image_size})"
            )
        return x.flatten(2).transpose(1, 2), None  # (B, N, D)

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None, keep: torch.Tensor | None = None):
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(x.dtype)  # (B, N, D), before any patch is dropped
        if keep is not None:
            if self.rel_pos is not None:
                raise ValueError("the relative position bias needs every patch; it cannot run on kept patches only")
            x = gather_steps(x, keep)  # (B, K, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        bias = self.rel_pos() if self.rel_pos is not None else None  # (1, H, 1+N, 1+N)
        return x, None, bias

    def init_weights_(self, std: float, trunc: float | None = None, outer: str = "normal") -> None:
        w = self.patch_embed.weight
        normal_init_(w.view(w.shape[0], -1), std, trunc)
        nn.init.zeros_(self.patch_embed.bias)
        normal_init_(self.cls_token, std, trunc)
        normal_init_(self.mask_emb, std, trunc)


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


class GradMultiply(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by `scale` (fairseq's GradMultiply).

    Lets the conv extractor learn slower than the rest without changing what it computes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)  # a view, so autograd records this node (x itself would be returned as is)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def audio_frames(num_samples: int | torch.Tensor, conv_layers: list[tuple[int, int, int]]):
    """Number of feature frames the conv extractor produces from num_samples waveform samples."""
    n = num_samples
    for _, k, s in conv_layers:
        n = (n - k) // s + 1
    return n


class AudioFrontend(nn.Module):
    """wav2vec 2.0 conv feature extractor + LayerNorm + Linear projection; conv positional encoder."""

    prefix_len = 0

    def __init__(self, cfg: AudioFrontendConfig, dim: int, ln_eps: float, heads: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], 1
        for c, k, s in cfg.conv_layers:
            layers.append(_ConvLayer(c_in, c, k, s, cfg.conv_bias))
            c_in = c
        self.conv = nn.ModuleList(layers)
        if cfg.feature_grad_mult == 0:  # frozen (fairseq runs it under no_grad): out of the optimiser and DDP
            self.conv.requires_grad_(False)
        self.proj_norm = nn.LayerNorm(c_in, eps=ln_eps)
        self.proj = nn.Linear(c_in, dim)
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.mask_emb = nn.Parameter(torch.zeros(dim))
        self.pos_conv = nn.ModuleList(
            [_PosConvLayer(dim, cfg.pos_conv_kernel, cfg.pos_conv_groups) for _ in range(cfg.pos_conv_depth)]
        )
        self.alibi = ALiBi(heads) if cfg.alibi else None

    def features(self, wav: torch.Tensor, padding_mask: torch.Tensor | None = None):
        x = self._extract(wav[:, None, :])  # (B, C, T)
        x = self.feature_dropout(self.proj(self.proj_norm(x.transpose(1, 2))))  # (B, T, D)
        pad = None
        if padding_mask is not None:
            lengths = audio_frames((~padding_mask).sum(-1), self.cfg.conv_layers)  # (B,)
            pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None]  # (B, T)
            if not pad.any():
                pad = None
        return x, pad

    def _extract(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S) waveform -> (B, C, T) conv features; the gradient into the convs x feature_grad_mult."""
        mult = self.cfg.feature_grad_mult
        with torch.set_grad_enabled(torch.is_grad_enabled() and mult > 0):
            for layer in self.conv:
                x = layer(x)  # (B, C, T)
        if mult not in (0.0, 1.0) and x.requires_grad:
            x = GradMultiply.apply(x, mult)
        return x

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None, keep: torch.Tensor | None = None):
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        p = x.transpose(1, 2)  # (B, D, T)
        for layer in self.pos_conv:
            p = layer(p)
        x = x + p.transpose(1, 2)  # positions from the whole sequence, before any step is dropped
        bias = self.alibi(x.shape[1]) if self.alibi is not None else None  # (1, H, T, T)
        if keep is not None:
            x = gather_steps(x, keep)  # (B, K, D)
            padding_mask = _kept_padding(padding_mask, keep)
            bias = gather_bias(bias, keep) if bias is not None else None  # (B, H, K, K)
        return x, padding_mask, bias

    def init_weights_(self, std: float, trunc: float | None = None, outer: str = "normal") -> None:
        for layer in self.conv:  # wav2vec 2.0 ConvFeatureExtractionModel
            nn.init.kaiming_normal_(layer.conv.weight)
        for layer in self.pos_conv:
            # fairseq's pos_conv_depth > 1 stack (data2vec v1) leaves nn.Conv1d's own init; the
            # normal(0, sqrt(4 / (k D))) + weight norm of make_conv_pos is the depth-1 (wav2vec 2.0) variant
            layer.conv.reset_parameters()
        if outer == "torch":  # fairseq's post_extract_proj sits outside the init_bert_params'd encoder
            self.proj.reset_parameters()
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

    def contextualize(self, x: torch.Tensor, padding_mask: torch.Tensor | None, keep: torch.Tensor | None = None):
        if keep is not None:  # positions were added in `features`
            x, padding_mask = gather_steps(x, keep), _kept_padding(padding_mask, keep)
        return x, padding_mask, None

    def init_weights_(self, std: float, trunc: float | None = None, outer: str = "normal") -> None:
        for emb in (self.tokens, self.positions):  # init_bert_params: untruncated normal, zero pad row
            nn.init.normal_(emb.weight, std=std)
            with torch.no_grad():
                emb.weight[self.cfg.pad_id].zero_()


def build_frontend(cfg: ModelConfig) -> nn.Module:
    t, f = cfg.trunk, cfg.frontend
    if isinstance(f, ImageFrontendConfig):
        return ImageFrontend(f, t.dim, t.heads, t.rel_pos_bias)
    if isinstance(f, AudioFrontendConfig):
        return AudioFrontend(f, t.dim, t.ln_eps, t.heads)
    return TextFrontend(f, t.dim, t.ln_eps, t.dropout)


def _kept_padding(padding_mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    if padding_mask is None:
        return None
    pad = gather_steps(padding_mask, keep)  # (B, K)
    return pad if pad.any() else None


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions of a grid x grid patch grid (row-major) -> (grid^2, dim).

    MAE's `get_2d_sincos_pos_embed` layout, which data2vec 2.0 uses: [sin(col w), cos(col w), sin(row w),
    cos(row w)] with w_i = 1 / 10000^(i / (dim / 4)), i < dim / 4.
    """
    if dim % 4:
        raise ValueError(f"model.trunk.dim={dim} must be divisible by 4 for 2-D sin-cos positions")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (cols.flatten(), rows.flatten()):
        angle = coord[:, None] * omega[None]  # (N, D/4)
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()  # (N, D)
