"""The fine-tuning loop: one implementation for every task, driven by Ray Train (job.py) or called in-process
(`d2v evaluate --task finetune`).

Ray appears only through `Hooks` (workers/train.py's: rank, device, prepare_model = DDP, report + checkpoint,
latest checkpoint, rank-0 metric logging); with the defaults it is plain PyTorch in one process.

Per update: every group's lr = recipe.lr * group lr_scale * schedule(update), one forward/backward through the
(DDP-wrapped) `Tuned` module, optional clipping, AdamW step. Shuffling is seeded per epoch and dropout per
update (workers.train._micro_seed), so a run resumed from an epoch checkpoint draws what the uninterrupted
run would have drawn. Each rank trains on its own slice of every epoch's examples (`shard`); the test metric
is computed on rank 0 after the last epoch and reported with the final checkpoint.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors
from torch import nn

from model.checkpoint import MODEL_FILE, load_config, save_checkpoint
from model.config import Config
from model.encoder import Encoder

from ..evaluate.finetune import lr_scale_at, param_groups
from ..resume import check_resume
from ..train import Hooks, _micro_seed
from . import HEAD_CONFIG_FILE, HEAD_FILE, FinetuneError, Recipe, Task

OPTIMIZER_FILE = "optimizer.pt"


class Tuned(nn.Module):
    """encoder + head as one module, so DDP sees one forward: forward(batch, step) = task.loss(...)."""

    def __init__(self, task: Task, encoder: Encoder, head: nn.Module) -> None:
        super().__init__()
        self.task, self.encoder, self.head = task, encoder, head

    def forward(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        return self.task.loss(self.encoder, self.head, batch, step)


def lr_scale(step: int, total: int, r: Recipe) -> float:
    """The schedule's multiplier of recipe.lr at update `step` of `total` (see Recipe)."""
    warm = round(r.warmup * total)
    if step < warm:
        start = r.init_lr_scale if r.schedule == "tri_stage" else 0.0
        return start + (1 - start) * step / max(1, warm)
    if r.schedule == "tri_stage":  # fairseq TriStageLRScheduler: hold, then exponential decay
        hold = round(r.hold * total)
        if step < warm + hold:
            return 1.0
        decay = max(1, total - warm - hold)
        return math.exp(math.log(r.final_lr_scale) * min(1.0, (step - warm - hold) / decay))
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if r.schedule == "linear":  # fairseq polynomial_decay (power 1, end 0): RoBERTa's GLUE schedule
        return 1.0 - progress
    return lr_scale_at(step, total, warm)  # cosine (BEiT fine-tuning)


def shard(examples: list, rank: int, world: int) -> list:
    """This rank's examples: every world-th, the tail cut so that every rank runs the same number of updates."""
    n = len(examples) // world * world
    if n == 0:
        raise FinetuneError(f"{len(examples)} training examples cannot be split over {world} workers")
    return examples[rank:n:world]


def updates_per_epoch(n_rank: int, batch_size: int, world: int) -> tuple[int, int]:
    """-> (per-rank batch size, updates per epoch): the recipe's batch size is global."""
    per_rank = max(1, batch_size // world)
    return per_rank, -(-n_rank // per_rank)


def fit(task: Task, cfg: Config, encoder: Encoder, head: nn.Module, train: list, test: list, recipe: Recipe,
        hooks: Hooks | None = None, tokenizer: Path | bytes | None = None,
        on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """Fine-tune `encoder` + `head` (in place) on `train`; -> {"epoch", "step", "history", **test metrics
    (rank 0)}. Resumes from hooks.latest_checkpoint() when there is one; otherwise the task's optional
    `warm_start(encoder, head, train)` runs first (classify: the LP stage of LP-FT)."""
    hooks = hooks or Hooks(progress=lambda s: None)
    dev = hooks.device
    encoder, head = encoder.to(dev), head.to(dev)
    opt = torch.optim.AdamW(param_groups(encoder, head, recipe), lr=recipe.lr, betas=recipe.betas)
    mine = shard(train, hooks.rank, hooks.world_size)
    per_rank, per_epoch = updates_per_epoch(len(mine), recipe.batch_size, hooks.world_size)
    epochs, total = recipe.length(per_epoch)
    start_epoch, history = 0, []
    ckpt_ctx = hooks.latest_checkpoint()
    if ckpt_ctx is not None:
        with ckpt_ctx as d:
            start_epoch, history = load_state(Path(d), cfg, encoder, head, opt, dev)
        hooks.progress(f"resumed from checkpoint at epoch {start_epoch}")
    elif hasattr(task, "warm_start"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            task.warm_start(encoder, head, mine)
    model = hooks.prepare_model(Tuned(task, encoder, head))
    step, every = start_epoch * per_epoch, max(1, epochs // 5)
    for epoch in range(start_epoch, epochs):
        encoder.train()
        head.train()
        t0, losses = time.perf_counter(), []
        rng = np.random.default_rng([recipe.seed, epoch])
        for batch in task.batches(mine, per_rank, train=True, rng=rng):
            if step >= total:  # recipe.updates ends the last epoch part-way
                break
            s = lr_scale(step, total, recipe)
            for g in opt.param_groups:
                g["lr"] = recipe.lr * g["lr_scale"] * s
            torch.manual_seed(_micro_seed(recipe.seed, step, 0, hooks.rank))
            opt.zero_grad(set_to_none=True)
            loss = model(to_device(batch, dev), step)
            loss.backward()
            if recipe.clip_norm > 0:
                nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(head.parameters()), recipe.clip_norm)
            opt.step()
            losses.append(float(loss.detach()))
            if not math.isfinite(losses[-1]):
                raise FinetuneError(f"fine-tuning loss is {losses[-1]} at update {step}; lower the learning rate")
            step += 1
        done = epoch + 1
        mean = float(np.mean(losses)) if losses else float("nan")
        history.append({"epoch": done, "step": step, "loss": mean})
        if hooks.rank == 0:
            hooks.progress(f"epoch {done}/{epochs} loss {mean:.4f} lr {recipe.lr * s:.2e} "
                           f"({time.perf_counter() - t0:.1f}s)")
            if hooks.log_metrics is not None:
                hooks.log_metrics({"train_loss": mean, "lr": recipe.lr * s, "epoch": done}, step)
        if on_epoch is not None:
            on_epoch(done, {"loss": mean, "head": head})
        if done == epochs:
            break
        if done % every == 0:
            checkpoint(task, cfg, hooks, encoder, head, opt, done, step, history, {}, tokenizer)
    metrics = task.evaluate(encoder, head, test) if hooks.rank == 0 else {}
    if hooks.rank == 0 and hooks.log_metrics is not None:
        hooks.log_metrics({f"test_{k}": v for k, v in metrics.items()}, step)
    out = {"epoch": epochs, "step": step, **{f"test_{k}": v for k, v in metrics.items()}}
    checkpoint(task, cfg, hooks, encoder, head, opt, epochs, step, history, out, tokenizer)
    return {**out, "history": history, **metrics}


def to_device(batch: dict[str, Any], dev: torch.device) -> dict[str, Any]:
    return {k: v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ checkpoints
def write_finetuned(d: Path, task: Task, cfg: Config, encoder: Encoder, head: nn.Module, state: dict,
                    tokenizer: Path | bytes | None, optimizer: bytes | None = None) -> Path:
    """A fine-tuned checkpoint directory (layout: workers/finetune/__init__), written atomically."""
    extra: dict[str, bytes | Path] = {
        HEAD_FILE: save_tensors({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}),
        HEAD_CONFIG_FILE: json.dumps({"task": task.name, **task.head_config(head)}, indent=2).encode(),
    }
    if optimizer is not None:
        extra[OPTIMIZER_FILE] = optimizer
    if tokenizer is not None:
        extra["tokenizer.json"] = tokenizer if isinstance(tokenizer, bytes) else Path(tokenizer)
    return save_checkpoint(d, cfg, nn.ModuleDict({"encoder": encoder}), state=state, extra_files=extra)


def checkpoint(task: Task, cfg: Config, hooks: Hooks, encoder, head, opt, epoch: int, step: int, history: list,
               metrics: dict, tokenizer: Path | bytes | None) -> None:
    """Rank 0 writes the checkpoint; every rank reports (a barrier under Ray Train)."""
    name = f"epoch_{epoch:05d}"
    report = {"epoch": epoch, "step": step, **metrics}
    if hooks.rank != 0:
        hooks.report(report, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="d2v-ft-ckpt-") as tmp:
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)  # tensors and plain containers: loads with weights_only=True
        state = {"epoch": epoch, "step": step, "history": history, **metrics}
        d = write_finetuned(Path(tmp) / name, task, cfg, encoder, head, state, tokenizer, buf.getvalue())
        hooks.report(report, str(d), name)


def load_state(d: Path, cfg: Config, encoder: Encoder, head: nn.Module, opt, dev) -> tuple[int, list]:
    """Restore encoder, head and optimizer from a fine-tuning checkpoint -> (epochs done, history)."""
    check_resume(f"checkpoint {d}", load_config(d), cfg)
    state = load_file(d / MODEL_FILE, device=str(dev))
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items()})
    head.load_state_dict(load_file(d / HEAD_FILE, device=str(dev)))
    opt.load_state_dict(torch.load(d / OPTIMIZER_FILE, map_location=dev, weights_only=True))
    st = json.loads((d / "state.json").read_text())
    return int(st["epoch"]), list(st.get("history", []))
