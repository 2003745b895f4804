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


def normal_init_(t: torch.Tensor, std: float, trunc: float | None) -> None:
    """normal(0, std), cut at +-trunc x std when trunc is set (BEiT: 1.0), else untruncated (fairseq)."""
    if trunc is None:
        nn.init.normal_(t, mean=0.0, std=std)
    else:
        nn.init.trunc_normal_(t, mean=0.0, std=std, a=-trunc * std, b=trunc * std)


def init_trunk_(module: nn.Module, std: float, rescale_depth: bool, trunc: float | None = None) -> None:
    """normal(0, std) init of linear layers (truncated at +-trunc std if set), unit LayerNorms; BEiT's
    depth rescaling for pre-LN trunks."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            normal_init_(m.weight, std, trunc)
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


# ---------------------------------------------------------------------- data2vec 2.0: kept tokens, ALiBi
def gather_steps(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept steps of x, in the order of `keep`: x (B, T, ...), keep (B, K) long -> (B, K, ...)."""
    idx = keep.view(*keep.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def gather_bias(bias: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Rows and columns of the kept steps of an attention bias: (1 or B, H, T, T), keep (B, K) -> (B, H, K, K)."""
    B, K = keep.shape
    bias = bias.expand(B, -1, -1, -1)
    H, T = bias.shape[1], bias.shape[-1]
    rows = torch.gather(bias, 2, keep[:, None, :, None].expand(B, H, K, T))  # (B, H, K, T)
    return torch.gather(rows, 3, keep[:, None, None, :].expand(B, H, K, K))  # (B, H, K, K)


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): geometric from 2^(-8/n); non-powers of 2 interleave the next power."""

    def pow2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        return torch.tensor(pow2(heads))
    closest = 2 ** math.floor(math.log2(heads))
    return torch.tensor(pow2(closest) + pow2(2 * closest)[0::2][: heads - closest])


class ALiBi(nn.Module):
    """Symmetric ALiBi bias -|i - j| x slope_h, times a learned per-head scale clamped at 0 (data2vec 2.0
    speech: fairseq `use_alibi_encoder`, `learned_alibi_scale_per_head`), one bias shared by all blocks."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)  # (H,)
        self.scale = nn.Parameter(torch.ones(heads))  # (H,), init 1.0 as the reference's alibi_scale

    def forward(self, length: int) -> torch.Tensor:
        pos = torch.arange(length, device=self.slopes.device)
        dist = -(pos[None, :] - pos[:, None]).abs().float()  # (T, T)
        slope = self.slopes * self.scale.clamp_min(0)  # (H,)
        return slope[None, :, None, None] * dist  # (1, H, T, T)
