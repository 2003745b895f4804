"""`d2v finetune`: an encoder (registered or any checkpoint) + a task head, trained end to end as a Ray Train
job, registered as `data2vec-<modality>-<task>`.

A task is a module-level object implementing `Task` (below); the job (job.py) owns everything that is the
same for every task: the Ray Train loop (DDP, checkpoints, resume by run name), the optimizer with the
recipe's parameter groups and LR schedule, the MLflow run and curves, registration and the final JSON line.
Tasks: `classify` (classify.py: vision / text / audio classification) and `asr` (asr.py: CTC speech recognition).

Fine-tuned checkpoint directory (a normal d2v checkpoint, so `load_encoder` reads its encoder):

    model.safetensors      the fine-tuned encoder, keys `encoder.*`
    config.yaml            the encoder's resolved Config
    head.safetensors       the task head's state dict
    head_config.json       {"task": <name>, **task.head_config(head)}: JSON-able (vocabulary / label names)
    tokenizer.json         text models only
    state.json             {"step", "epoch", ...} training state (resume)

Each task module exposes `TASK`, an instance implementing `Task` (tasks.get_task).

Files: __init__ (this protocol), tasks (the registry of tasks), recipe (Recipe, LR schedules), job (Ray Train
job), classify, glue (GLUE TSV), register (registry), export (HF export of fine-tuned models); asr, transcribe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Protocol, runtime_checkable

import numpy as np
from torch import Tensor, nn

from model.config import Config
from model.encoder import Encoder

HEAD_FILE = "head.safetensors"
HEAD_CONFIG_FILE = "head_config.json"


class FinetuneError(ValueError):
    """A fine-tuning request, labelled split or recipe that cannot run; the message says what to do."""


@dataclass(frozen=True)
class Recipe:
    """A task's fine-tuning hyper-parameters for one modality (data, not branches). The job builds the
    optimizer and LR schedule from these; anything else the recipe needs (frozen feature extractor,
    encoder frozen for the first updates, time/channel masking, label smoothing) the task applies in `loss`.

    LR at update u of `total` (total = `updates`, or epochs * ceil(len(train) / batch_size)), times each group's scale:
      schedule "tri_stage" (fairseq tri_stage): linear from lr*init_lr_scale to lr over warmup*total updates,
          held for hold*total, then exponential decay to lr*final_lr_scale at the end;
      schedule "linear" (fairseq polynomial_decay power 1, RoBERTa GLUE): linear warm-up over warmup*total,
          then linear decay to 0 at total;
      schedule "cosine": linear warm-up, then cosine to 0 (BEiT fine-tuning).
    Parameter groups (evaluate.finetune.param_groups): block i of depth N at lr * layer_decay ** (N - i),
    the front end ** (N + 1), the head at lr * head_lr_mult; no weight decay on 1-D / positional parameters.
    """

    lr: float  # peak AdamW learning rate
    epochs: int  # passes over the train split
    batch_size: int  # examples per update (global, over all workers)
    schedule: Literal["tri_stage", "linear", "cosine"] = "cosine"
    warmup: float = 0.1  # fraction of all updates in the linear warm-up
    hold: float = 0.0  # tri_stage: fraction of all updates held at the peak
    init_lr_scale: float = 0.01  # tri_stage: start of the warm-up, times lr
    final_lr_scale: float = 0.05  # tri_stage: end of the decay, times lr
    layer_decay: float = 1.0  # layer-wise LR decay (1 = off)
    head_lr_mult: float = 1.0  # head learning rate = lr * head_lr_mult
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.98)
    clip_norm: float = 0.0  # gradient clipping by global norm (0 = off)
    seed: int = 0  # head init and shuffling
    updates: int = 0  # > 0: exactly this many updates (fairseq max_update), epochs derived; 0: `epochs` decides

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1 or self.updates < 0:
            raise FinetuneError(f"recipe: lr={self.lr} must be > 0, epochs={self.epochs} and "
                                f"batch_size={self.batch_size} >= 1, updates={self.updates} >= 0")
        if not 0 <= self.warmup + self.hold <= 1 or not 0 < self.layer_decay <= 1:
            raise FinetuneError(f"recipe: warmup={self.warmup} + hold={self.hold} must lie in [0, 1] and "
                                f"layer_decay={self.layer_decay} in (0, 1]")

    def length(self, per_epoch: int) -> tuple[int, int]:
        """-> (epochs, total updates) for `per_epoch` updates per epoch. With `updates`, the last epoch stops
        part-way, so equal budgets are equal in updates whatever the size of the split."""
        if self.updates > 0:
            return -(-self.updates // per_epoch), self.updates
        return self.epochs, self.epochs * per_epoch


@runtime_checkable
class Task(Protocol):
    """One fine-tuning task. Examples are whatever `load` returns (decoded tensors + targets, CPU), so that
    the job never looks inside them; `batches` turns them into dicts of CPU tensors, which the job moves to
    the device before calling `loss` (every Tensor value of the dict is moved; others are left as they are)."""

    name: str  # "asr" | "classify"
    metric: str  # "wer" | "accuracy": the promotion metric, a key of `evaluate`'s dict
    lower_is_better: bool

    def recipe(self, modality: str) -> Recipe:
        """The default fine-tuning recipe for this modality; FinetuneError if the task does not support it."""

    def load(self, data: Path, cfg: Config, tokenizer: Path | None) -> tuple[list, list]:
        """(train, test) example lists from a labelled dir; errors name the file/line at fault."""

    def demo_data(self, modality: str, root: Path) -> Path:
        """Build (offline, deterministic, idempotent) the demo labelled split for this task under `root`
        (the repo's data/ directory); return its path (what `--data` would be)."""

    def build_head(self, cfg: Config, train: list) -> nn.Module:
        """A fresh head for this encoder config and train set (classes / vocabulary read from `train`)."""

    def restore_head(self, cfg: Config, head_config: dict[str, Any]) -> nn.Module:
        """An empty head of the shape `head_config(head)` describes (weights are loaded by the caller)."""

    def head_config(self, head: nn.Module) -> dict[str, Any]:
        """JSON-able description of the head (vocabulary / label names), saved beside its weights."""

    def batches(self, examples: list, batch_size: int, *, train: bool,
                rng: np.random.Generator) -> Iterator[dict[str, Any]]:
        """Batches of examples as dicts of CPU tensors; shuffled with `rng` when train."""

    def loss(self, encoder: Encoder, head: nn.Module, batch: dict[str, Any], step: int) -> Tensor:
        """Scalar training loss (mean over the batch) at update `step`. Includes the task-specific recipe
        bits (ASR: frozen feature extractor, encoder frozen for the first N updates, time/channel masking;
        classify: label smoothing, augmentation)."""

    def evaluate(self, encoder: Encoder, head: nn.Module, examples: list) -> dict[str, float]:
        """Test metrics (asr: {"wer", "cer"}; classify: {"accuracy"}), eval mode, on the encoder's device."""


__all__ = ["HEAD_CONFIG_FILE", "HEAD_FILE", "FinetuneError", "Recipe", "Task"]
