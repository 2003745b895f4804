"""Task heads over the encoder's final hidden states (pure PyTorch; the fine-tuning job trains them).

Every head takes (B, D) features from a pooling rule and returns (B, C) logits:
- `pool_mean_prenorm`: the mean over the non-padded positions after the front end's prefix (vision's CLS
  excluded) of the last block's output, *before* the encoder's final LayerNorm, the input of `MeanPoolHead`
  (BEiT / data2vec_vision fine-tuning with `use_mean_pooling`: the pretrained final `norm` becomes Identity
  and `fc_norm` normalises the pooled features: LayerNorm -> Linear; HF Data2VecVisionPooler). Encoders
  without a final norm (text, audio, vision v2) pool their last hidden states as they are;
- `pool_first`: the first position (text: the `<s>` token), the input of `SentenceHead`, RoBERTa's
  classification head (fairseq `RobertaClassificationHead`, transformers `Data2VecTextClassificationHead`):
  dropout -> dense (D, D) -> tanh -> dropout -> out_proj (D, C).
"""

from __future__ import annotations

import torch
from torch import nn

from .encoder import EncoderOutput


def pool_mean(out: EncoderOutput) -> torch.Tensor:
    """(B, P+T, D) final hidden states -> (B, D): the mean over non-padded positions after the prefix."""
    x = out.last[:, out.prefix_len :]  # (B, T, D)
    if out.padding_mask is None:
        return x.mean(1)
    keep = (~out.padding_mask[:, out.prefix_len :]).to(x.dtype)[..., None]  # (B, T, 1)
    return (x * keep).sum(1) / keep.sum(1).clamp_min(1.0)


def pool_mean_prenorm(out: EncoderOutput) -> torch.Tensor:
    """(B, D): pool_mean of the last block's output before the final norm (needs layer_output="block")."""
    if not out.layers:  # no per-block outputs asked for (or every block dropped by layerdrop)
        return pool_mean(out)
    return pool_mean(EncoderOutput(out.layers[-1], [], out.padding_mask, out.prefix_len))


def pool_first(out: EncoderOutput) -> torch.Tensor:
    """(B, T, D) -> (B, D): the first position (text: `<s>`; vision: CLS)."""
    return out.last[:, 0]


class MeanPoolHead(nn.Module):
    """(B, D) mean-pooled features -> LayerNorm -> Linear -> (B, C) logits (BEiT fc_norm + head)."""

    pooling = "mean_prenorm"

    def __init__(self, dim: int, classes: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class SentenceHead(nn.Module):
    """(B, D) `<s>` features -> dropout -> dense -> tanh -> dropout -> out_proj -> (B, C) logits (RoBERTa)."""

    pooling = "first"

    def __init__(self, dim: int, classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(dim, classes)
        for lin in (self.dense, self.out_proj):  # BERT/RoBERTa init: N(0, 0.02), zero bias
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(torch.tanh(self.dense(self.dropout(x)))))


POOLING = {"mean": pool_mean, "mean_prenorm": pool_mean_prenorm, "first": pool_first}


def head_logits(head: nn.Module, out: EncoderOutput) -> torch.Tensor:
    """Pool the encoder output as the head expects, then the head: (B, C) logits. `out` must come from
    `encoder(x, pad, layer_output="block")` for the pre-norm pooling."""
    return head(POOLING[head.pooling](out))
