"""Pooled encoder features.

Pooling (one rule for every modality): the mean of the final-layer hidden states (`EncoderOutput.last`)
over the non-padded positions after the front end's prefix. Vision: the mean over the patch tokens (CLS
excluded); audio: the mean over the non-padded frames; text: the mean over the tokens, <s> and </s>
included, pad tokens excluded. Padded positions never count, and a batch gives the same features as one
input at a time (audio is batched by equal length: see data.PAD_IS_EXACT).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.config import Config
from model.encoder import Encoder
from model.heads import pool_mean

from .common import Progress
from .data import Items, batches

POOLING = {
    "vision": "mean of final-layer hidden states over patch tokens (CLS excluded)",
    "audio": "mean of final-layer hidden states over non-padded frames",
    "text": "mean of final-layer hidden states over tokens incl. <s> </s> (pad excluded)",
}


pool = pool_mean  # model/heads.py: the fine-tuning heads pool the same way


@torch.no_grad()
def features(enc: Encoder, cfg: Config, items: Items, tokenizer: Path | None, batch_size: int,
             device: torch.device, what: str = "features", cache: dict | None = None) -> np.ndarray:
    """Pooled final-layer features of every item, in order: (N, D) float32."""
    enc.eval()
    out = np.zeros((len(items), cfg.model.trunk.dim), dtype=np.float32)
    progress = Progress(what, len(items))
    for groups in batches(items, cfg, tokenizer, batch_size, device, cache=cache):
        for g in groups:
            out[g.index] = pool(enc(g.x, g.pad)).float().cpu().numpy()  # (B, D)
        progress.update(sum(len(g.index) for g in groups))
    progress.close()
    return out
