"""`--task classify`: sequence / image classification, one label per input.

Data (`--data`): a GLUE task directory (train.tsv + dev.tsv, glue.py; text models) or a labelled split
`LABELLED/{train,test}/<class>/<file>` as `d2v evaluate` reads it (workers/evaluate/data.py). Without
`--data`: vision and audio use the demo corpus's labelled split, text the GLUE-format demo task `DOCS`
built from it (glue.write_demo_glue).

Recipes (workers/evaluate/finetune.py FINETUNE_PRESETS, per modality; data, not branches):
- vision (BEiT / data2vec_vision): MeanPoolHead on LayerNorm'd mean-pooled patch states, layer-wise LR decay,
  label smoothing, random shifts, LP-FT (the head is first fitted on frozen features: `warm_start`);
- text (RoBERTa / fairseq GLUE): SentenceHead on `<s>` (dense + tanh + out_proj), linear warm-up over 6% of
  the updates then linear decay, no LP stage;
- audio (wav2vec 2.0 sequence classification): MeanPoolHead on mean-pooled frames, LP-FT.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.config import Config
from model.encoder import Encoder, EncoderOutput
from model.heads import MeanPoolHead, SentenceHead, head_logits

from ..evaluate.data import Split, default_data, load_split, read_input
from ..evaluate.finetune import FINETUNE_PRESETS, FinetuneConfig, fit_head, random_shift
from . import FinetuneError, Recipe
from .glue import Encoder as GlueEncoder
from .glue import is_glue, read_glue, write_demo_glue

EVAL_BATCH = 64


@dataclass(frozen=True)
class Example:
    x: torch.Tensor  # (3, H, W) pixels, (S,) wave or (T,) token ids
    y: int  # class index
    fill: float  # padding value of sequences (text: the pad id; audio: 0)


class Labelled(list):
    """Examples plus the class names (index = label)."""

    def __init__(self, examples: list[Example], classes: list[str]) -> None:
        super().__init__(examples)
        self.classes = list(classes)


def read_examples(split: Split, cfg: Config, tokenizer: Path | None) -> tuple[Labelled, Labelled]:
    """A labelled split's files, decoded once as `d2v embed` decodes them."""
    fill = float(cfg.model.frontend.pad_id) if cfg.model.modality == "text" else 0.0
    return tuple(Labelled([Example(read_input(p, cfg, tokenizer), y, fill) for p, y in items], split.classes)
                 for items in (split.train, split.test))  # type: ignore[return-value]


def read_glue_examples(root: Path, cfg: Config, tokenizer: Path | None) -> tuple[Labelled, Labelled]:
    if cfg.model.modality != "text":
        raise FinetuneError(f"--data {root}: a GLUE task (train.tsv) needs a text model, not {cfg.model.modality}")
    if tokenizer is None:
        raise FinetuneError(f"--data {root}: the model has no tokenizer.json to tokenise GLUE sentences with")
    glue = read_glue(root)
    f = cfg.model.frontend
    enc = GlueEncoder(tokenizer, f.max_positions - f.pad_id - 1)
    label = {c: i for i, c in enumerate(glue.classes)}
    return tuple(Labelled([Example(torch.tensor(enc(r.texts), dtype=torch.long), label[r.label], float(f.pad_id))
                           for r in rows], glue.classes)
                 for rows in (glue.train, glue.dev))  # type: ignore[return-value]


def collate(examples: list[Example]) -> dict[str, Any]:
    """-> {"x": (B, 3, H, W) or right-padded (B, S), "pad": (B, S) True = padded, or None, "y": (B,)}."""
    xs = [e.x for e in examples]
    y = torch.tensor([e.y for e in examples])
    if xs[0].ndim == 3 or len({len(x) for x in xs}) == 1:
        return {"x": torch.stack(xs), "pad": None, "y": y}
    n = max(len(x) for x in xs)
    x = xs[0].new_full((len(xs), n), examples[0].fill)  # (B, S)
    pad = torch.ones(len(xs), n, dtype=torch.bool)
    for i, t in enumerate(xs):
        x[i, : len(t)] = t
        pad[i, : len(t)] = False
    return {"x": x, "pad": pad, "y": y}


def exact_batches(examples: list[Example], batch_size: int) -> Iterator[dict[str, Any]]:
    """Evaluation batches whose results equal one input at a time: inputs of one shape together (audio's
    positional convs read padded frames; images and equal-length sequences need no padding at all)."""
    by_shape: dict[tuple, list[Example]] = {}
    for e in examples:
        by_shape.setdefault(tuple(e.x.shape), []).append(e)
    for group in by_shape.values():
        for i in range(0, len(group), batch_size):
            yield collate(group[i : i + batch_size])


def forward(encoder: Encoder, x: torch.Tensor, pad: torch.Tensor | None) -> EncoderOutput:
    """The encoder with its per-block outputs: the mean-pool head reads the last one, before the final norm."""
    return encoder(x, pad, layer_output="block")


def _device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device


class ClassifyTask:
    """The classify task (workers.finetune.Task); `presets`: per-modality FinetuneConfig recipes."""

    name = "classify"
    metric = "accuracy"
    lower_is_better = False

    def __init__(self, presets: dict[str, FinetuneConfig] | None = None) -> None:
        self.presets = dict(FINETUNE_PRESETS if presets is None else presets)

    def ft(self, modality: str) -> FinetuneConfig:
        if modality not in self.presets:
            raise FinetuneError(f"classify: no fine-tuning recipe for {modality} models")
        return self.presets[modality]

    def with_recipe(self, modality: str, recipe: Recipe) -> ClassifyTask:
        """The same task with `recipe`'s fields written back into the modality's FinetuneConfig (`--set`)."""
        ft = self.ft(modality)
        warm = {"warmup_fraction": recipe.warmup}
        fields = {k: getattr(recipe, k) for k in ("lr", "epochs", "batch_size", "layer_decay", "head_lr_mult",
                                                   "weight_decay", "betas", "seed")}
        return ClassifyTask({**self.presets, modality: replace(ft, schedule=recipe.schedule, **fields, **warm)})

    # ------------------------------------------------------------------------------ the protocol
    def recipe(self, modality: str) -> Recipe:
        ft = self.ft(modality)
        warmup = ft.warmup_fraction if ft.warmup_fraction is not None else min(1.0, ft.warmup_epochs / ft.epochs)
        return Recipe(lr=ft.lr, epochs=ft.epochs, batch_size=ft.batch_size, schedule=ft.schedule, warmup=warmup,
                      layer_decay=ft.layer_decay, head_lr_mult=ft.head_lr_mult, weight_decay=ft.weight_decay,
                      betas=tuple(ft.betas), seed=ft.seed)

    def load(self, data: Path, cfg: Config, tokenizer: Path | None) -> tuple[list, list]:
        if is_glue(data):
            return read_glue_examples(Path(data), cfg, tokenizer)
        return read_examples(load_split(Path(data), cfg.model.modality), cfg, tokenizer)

    def demo_data(self, modality: str, root: Path) -> Path:
        labelled = default_data(modality)
        if modality != "text":
            return labelled
        return write_demo_glue(labelled, Path(root) / "demo-text" / "glue")["DOCS"]

    def build_head(self, cfg: Config, train: list) -> nn.Module:
        classes = list(getattr(train, "classes", None) or sorted({str(e.y) for e in train}))
        return self.restore_head(cfg, {"classes": classes, "head": self.ft(cfg.model.modality).head})

    def restore_head(self, cfg: Config, head_config: dict[str, Any]) -> nn.Module:
        dim, n = cfg.model.trunk.dim, len(head_config["classes"])
        kind = head_config.get("head", "mean")
        head = SentenceHead(dim, n, self.ft(cfg.model.modality).head_dropout) if kind == "sentence" else \
            MeanPoolHead(dim, n, eps=cfg.model.trunk.ln_eps)
        head.classes, head.kind = list(head_config["classes"]), kind
        return head

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        return {"head": head.kind, "pooling": head.pooling, "classes": head.classes}

    def batches(self, examples: list, batch_size: int, *, train: bool,
                rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        order = rng.permutation(len(examples)) if train else np.arange(len(examples))
        for i in range(0, len(order), batch_size):
            yield collate([examples[int(j)] for j in order[i : i + batch_size]])

    def loss(self, encoder: Encoder, head: nn.Module, batch: dict[str, Any], step: int) -> torch.Tensor:
        ft = self.ft(encoder.cfg.modality)
        logits = head_logits(head, forward(encoder, random_shift(batch["x"], ft.shift_px), batch["pad"]))  # (B, C)
        return F.cross_entropy(logits, batch["y"], label_smoothing=ft.label_smoothing)

    @torch.no_grad()
    def evaluate(self, encoder: Encoder, head: nn.Module, examples: list) -> dict[str, float]:
        encoder.eval()
        head.eval()
        dev, correct = _device(encoder), 0
        for b in exact_batches(examples, EVAL_BATCH):
            pad = None if b["pad"] is None else b["pad"].to(dev)
            correct += int((head_logits(head, forward(encoder, b["x"].to(dev), pad)).argmax(-1).cpu() == b["y"]).sum())
        return {"accuracy": correct / max(len(examples), 1)}

    # ------------------------------------------------------------------------------ LP-FT
    @torch.no_grad()
    def features(self, encoder: Encoder, head: nn.Module, examples: list) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) pooled features of the frozen encoder and (N,) labels."""
        from model.heads import POOLING

        encoder.eval()
        dev, xs, ys = _device(encoder), [], []
        for b in exact_batches(examples, EVAL_BATCH):
            pad = None if b["pad"] is None else b["pad"].to(dev)
            xs.append(POOLING[head.pooling](forward(encoder, b["x"].to(dev), pad)))
            ys.append(b["y"].to(dev))
        return torch.cat(xs), torch.cat(ys)

    def warm_start(self, encoder: Encoder, head: nn.Module, train: list) -> None:
        """LP stage of LP-FT: the mean-pool head's linear layer fitted on frozen features (fit_head)."""
        ft = self.ft(encoder.cfg.modality)
        if ft.probe_steps <= 0 or not isinstance(head, MeanPoolHead):
            return
        x, y = self.features(encoder, head, train)
        fit_head(head, x, y, ft)


TASK = ClassifyTask()
