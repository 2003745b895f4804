"""Transformer trunk layers: attention, feed-forward, pre-/post-LN blocks, shared relative position bias.

One `Block` serves every modality; the differences (pre vs post LN, layer scale, biases) are config data.
Attention runs through `F.scaled_dot_product_attention` with one fused qkv projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrunkConfig


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval or when p == 0)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    qkv_bias: 'qkv' = one bias on the fused projection; 'qv' = BEiT (query and value biases, no key bias:
    a key bias adds a per-query constant to the logits and cancels in softmax); 'none'.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: str, attn_dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias == "qkv")
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        if self.q_bias is not None:
            bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
            qkv = F.linear(x, self.qkv.weight, bias)  # (B, T, 3C)
        else:
            qkv = self.qkv(x)  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_dropout if self.training else 0.0
        )  # (B, H, T, hd)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, activation_dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(activation_dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """A transformer block, pre-LN (BEiT/ViT) or post-LN (wav2vec 2.0/RoBERTa).

    forward returns (x, ffn): the block output and the FFN output before dropout, layer scale and the
    last residual -- the "FFN output" target of data2vec (SPEC 2, target layer).
    """

    def __init__(self, cfg: TrunkConfig, drop_path: float) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_style == "pre"
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = FeedForward(cfg.dim, cfg.ffn_dim, cfg.activation_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        if cfg.layer_scale_init is not None:
            self.ls1 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
            self.ls2 = nn.Parameter(torch.full((cfg.dim,), cfg.layer_scale_init))
        else:
            self.ls1 = self.ls2 = None

    def _scale(self, x: torch.Tensor, ls: torch.Tensor | None) -> torch.Tensor:
        return x if ls is None else x * ls

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre_norm:
            x = x + self.drop_path(self._scale(self.drop(self.attn(self.norm1(x), attn_bias)), self.ls1))
            ffn = self.mlp(self.norm2(x))  # (B, T, C)
            x = x + self.drop_path(self._scale(self.drop(ffn), self.ls2))
        else:
            x = self.norm1(x + self.drop_path(self._scale(self.drop(self.attn(x, attn_bias)), self.ls1)))
            ffn = self.mlp(x)  # (B, T, C)
            x = self.norm2(x + self.drop_path(self._scale(self.drop(ffn), self.ls2)))
        return x, ffn


class RelativePositionBias(nn.Module):
    """BEiT's relative position bias for a square patch grid plus one CLS token, shared by all blocks.

    The table has (2G-1)^2 + 3 rows (the 3 extra: cls->token, token->cls, cls->cls) and one column per head.
    """

    def __init__(self, grid: int, heads: int) -> None:
        super().__init__()
        self.grid = grid
        n = (2 * grid - 1) ** 2 + 3
        self.table = nn.Parameter(torch.zeros(n, heads))  # (num_distances, H)
        self.register_buffer("index", self._index(grid), persistent=False)  # (N+1, N+1)

    @staticmethod
    def _index(g: int) -> torch.Tensor:
        n = (2 * g - 1) ** 2 + 3
        coords = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (g - 1)  # (N, N, 2)
        idx = torch.zeros(g * g + 1, g * g + 1, dtype=torch.long)
        idx[1:, 1:] = rel[..., 0] * (2 * g - 1) + rel[..., 1]
        idx[0, :] = n - 3
        idx[:, 0] = n - 2
        idx[0, 0] = n - 1
        return idx

    def forward(self) -> torch.Tensor:
        N = self.index.shape[0]
        return self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).unsqueeze(0)  # (1, H, N, N)


def padding_bias(padding_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T] bool (True = padded) -> additive attention bias [B, 1, 1, T] (0 or -inf-like)."""
    bias = torch.zeros(padding_mask.shape, dtype=dtype, device=padding_mask.device)
    bias.masked_fill_(padding_mask, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def init_trunk_(module: nn.Module, std: float, rescale_depth: bool) -> None:
    """Truncated-normal init of linear layers, unit LayerNorms; BEiT's depth rescaling for pre-LN trunks."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if rescale_depth:
        blocks = [m for m in module.modules() if isinstance(m, Block)]
        for i, b in enumerate(blocks):
            b.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            b.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))
