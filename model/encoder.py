"""The data2vec encoder: a modality front end + the shared transformer trunk.

The forward is split into named steps so that student and teacher (and later data2vec 2.0's
visible-tokens-only student) compose them differently:

    x, pad = enc.features(inputs, padding_mask)      # local features, before masking   (B, T, D)
    x      = enc.apply_mask(x, mask)                  # masked steps -> mask embedding
    out    = enc.context(x, pad, layer_output="ffn")  # prefix, positions, blocks         EncoderOutput

data2vec 2.0's student runs `enc.context(x, pad, keep=keep)` instead of `apply_mask`: positions are added over
all steps, then only the kept steps (keep: (B, K) indices) reach the blocks -- masked ones are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .config import ModelConfig
from .frontends import build_frontend
from .layers import Block, init_trunk_, padding_bias


@dataclass
class EncoderOutput:
    last: torch.Tensor  # (B, P+T, D) final hidden states (after the final norm, if any)
    layers: list[torch.Tensor]  # per block (B, P+T, D): FFN outputs or block outputs, [] if not asked
    padding_mask: torch.Tensor | None  # (B, P+T) True = padded, or None
    prefix_len: int  # P: tokens prepended by the front end (CLS), not part of the masked sequence


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        t = cfg.trunk
        self.frontend = build_frontend(cfg)
        self.input_norm = nn.LayerNorm(t.dim, eps=t.ln_eps) if t.input_norm else None
        self.input_drop = nn.Dropout(t.dropout) if t.input_norm else nn.Identity()
        dpr = torch.linspace(0, t.drop_path, t.depth).tolist()
        self.blocks = nn.ModuleList([Block(t, dpr[i]) for i in range(t.depth)])
        self.final_norm = nn.LayerNorm(t.dim, eps=t.ln_eps) if t.final_norm else None
        self.layerdrop = t.layerdrop
        self.reset_parameters()

    @property
    def prefix_len(self) -> int:
        return self.frontend.prefix_len

    def reset_parameters(self) -> None:
        c = self.cfg
        init_trunk_(self, c.init_std, rescale_depth=c.trunk.norm_style == "pre", trunc=c.init_trunc)
        self.frontend.init_weights_(c.init_std, c.init_trunc, c.init_outer)

    # ------------------------------------------------------------------ steps
    def features(self, inputs: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """Raw inputs -> local features (B, T, D) and a (B, T) padding mask (True = padded) or None."""
        return self.frontend.features(inputs, padding_mask)

    def apply_mask(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Replace masked steps (mask (B, T), True = masked) with the learned mask embedding."""
        emb = self.frontend.mask_emb
        if mask is None or emb is None:
            return x
        return torch.where(mask[..., None], emb.to(x.dtype), x)  # (B, T, D)

    def context(
        self,
        x: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        layer_output: Literal["ffn", "block"] | None = None,
        keep: torch.Tensor | None = None,
    ) -> EncoderOutput:
        """Local features -> contextualised states; collect per-block outputs when layer_output is set.

        keep: (B, K) indices of the steps that go on to the blocks (data2vec 2.0); then the output is
        (B, P+K, D) and its padding mask covers the kept steps. None = all T steps.
        """
        x, pad, bias = self.frontend.contextualize(x, padding_mask, keep)  # (B, P+T or P+K, D)
        if pad is not None:
            pb = padding_bias(pad, x.dtype)  # (B, 1, 1, P+T)
            bias = pb if bias is None else bias + pb
        if self.input_norm is not None:
            x = self.input_drop(self.input_norm(x))
        layers: list[torch.Tensor] = []
        for blk in self.blocks:
            if self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop:
                continue
            x, ffn = blk(x, bias)
            if layer_output is not None:
                layers.append(ffn if layer_output == "ffn" else x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(last=x, layers=layers, padding_mask=pad, prefix_len=self.prefix_len)

    def forward(
        self,
        inputs: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        layer_output: Literal["ffn", "block"] | None = None,
    ) -> EncoderOutput:
        x, pad = self.features(inputs, padding_mask)
        return self.context(self.apply_mask(x, mask), pad, layer_output)

    # ------------------------------------------------------------------ teacher contract
    def is_averaged(self, name: str, scope: Literal["all", "layers"]) -> bool:
        """Which parameters the EMA teacher averages; the rest it copies from the student (SPEC 2).

        'all' (vision): everything. 'layers' (speech, text): the transformer blocks and trunk norms only;
        front end (conv extractor, projection, embeddings) and positional encoder are shared/copied.
        """
        if scope == "all":
            return True
        return name.startswith(("blocks.", "input_norm.", "final_norm."))
