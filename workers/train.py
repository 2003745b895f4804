"""The data2vec training loop, as it runs inside each Ray Train worker.

Ray appears only at the marked points (RAY:): dataset shard / rank, prepare model, report + checkpoint,
get checkpoint. Everything else is plain PyTorch, so the same loop runs in a plain process
(`Hooks()` defaults) for benchmarks and tests.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from model.checkpoint import save_checkpoint
from model.config import Config
from model.data2vec import Data2Vec, data2vec_loss
from model.targets import mean_std, variance_stats
from model.teacher import EMATeacher, ema_decay

from .optim import build_optimizer, lr_at, set_lr


class TrainingStopped(RuntimeError):
    """Training cannot continue (NaN/Inf loss, representation collapse); the last good checkpoint is kept."""


@dataclass
class Hooks:
    """How the loop talks to its environment (Ray Train in production, nothing in a plain process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m
    # report(metrics, checkpoint_dir or None, checkpoint_dir_name or None): all ranks call it (a barrier)
    report: Callable[[dict, str | None, str | None], None] = lambda m, d, n: None
    latest_checkpoint: Callable[[], Any] = lambda: None  # -> context manager yielding a dir, or None
    log_metrics: Callable[[dict, int], None] | None = None  # rank 0 only
    progress: Callable[[str], None] = print


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return m.module if hasattr(m, "module") else m


def _all_reduce(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


class Timer:
    """Accumulates wall time per phase (data / forward / backward / optim / ema / checkpoint)."""

    def __init__(self, device: torch.device) -> None:
        self.totals: dict[str, float] = {}
        self.cuda = device.type == "cuda"

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def train(cfg: Config, batches_from: Callable[[int], Any], hooks: Hooks, tokenizer: Path | None = None) -> dict:
    """Run cfg.train.max_steps updates (resuming from the latest checkpoint) -> final metrics.

    batches_from(start_step) returns an iterator of model.data2vec.Batch for this rank; text runs pass
    the shard set's tokenizer.json, which every checkpoint carries.
    """
    t = cfg.train
    torch.manual_seed(t.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    student = Data2Vec(cfg.model).to(hooks.device)
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    opt = build_optimizer(student, cfg.optim)

    # RAY: get checkpoint -- resume where the last run (or the failed worker group) stopped
    start_step, history = 0, []
    ckpt_ctx = hooks.latest_checkpoint()
    if ckpt_ctx is not None:
        with ckpt_ctx as d:
            start_step, history = _load_state(Path(d), student, teacher, opt, hooks.device)
        hooks.progress(f"resumed from checkpoint at step {start_step}")

    # RAY: prepare model (DDP)
    model = hooks.prepare_model(student)
    batches = iter(batches_from(start_step))
    use_bf16 = t.precision == "bf16" or (t.precision == "auto" and hooks.device.type == "cuda")
    autocast = (
        torch.autocast(device_type=hooks.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    )
    timer = Timer(hooks.device)
    last = {}
    t_start, samples_done, step = time.perf_counter(), 0, start_step
    for step in range(start_step, t.max_steps):
        # apply schedules
        lr = lr_at(step, cfg.optim, t.max_steps)
        set_lr(opt, lr)
        # compute losses (gradient accumulation over micro-batches; DDP syncs on the last one)
        loss_sum, tvar, pvar, n_masked = 0.0, None, None, 0
        for micro in range(t.grad_accum):
            with timer.phase("data"):
                batch = next(batches).to(hooks.device, non_blocking=True)
            sync = micro == t.grad_accum - 1 or not hasattr(model, "no_sync")
            with (nullcontext() if sync else model.no_sync()):
                with timer.phase("forward"), autocast:
                    loss, pred, target = data2vec_loss(model, teacher.model, cfg, batch)
                with timer.phase("backward"):
                    (loss / t.grad_accum).backward()
            loss_sum += float(loss.detach())
            n_masked += pred.shape[0]
            tvar = _acc(tvar, variance_stats(target.detach().float()))
            pvar = _acc(pvar, variance_stats(pred.detach().float()))
            samples_done += len(batch)
        # optimiser step (clip), stop on non-finite loss
        with timer.phase("optim"):
            stats = torch.tensor([loss_sum / t.grad_accum, float(n_masked)], dtype=torch.float64)
            stats = _all_reduce(stats.to(hooks.device), hooks.world_size).cpu()
            mean_loss = float(stats[0]) / hooks.world_size
            if not math.isfinite(mean_loss):
                return _stop(hooks, step, f"loss is {mean_loss} at step {step}", history)
            max_norm = cfg.optim.clip_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm))
            opt.step()
            opt.zero_grad(set_to_none=True)
        # EMA update
        with timer.phase("ema"):
            tau = ema_decay(step + 1, cfg.teacher.tau0, cfg.teacher.tau_end, cfg.teacher.tau_steps)
            teacher.update(student.encoder, tau)
        # collapse guard (SPEC 1): statistics all-reduced over ranks
        tstd = mean_std(_all_reduce(tvar.to(hooks.device), hooks.world_size).cpu())
        pstd = mean_std(_all_reduce(pvar.to(hooks.device), hooks.world_size).cpu())
        done = step + 1
        if done >= t.collapse_after and (tstd < t.collapse_min_target_var or pstd < t.collapse_min_pred_var):
            return _stop(hooks, step, f"representation collapse at step {done}: target std {tstd:.4f} "
                         f"(min {t.collapse_min_target_var}), prediction std {pstd:.4f} "
                         f"(min {t.collapse_min_pred_var})", history)
        # log
        if done % t.log_every == 0 or done == t.max_steps:
            elapsed = time.perf_counter() - t_start
            rate = samples_done * hooks.world_size / max(elapsed, 1e-9)
            last = {"loss": mean_loss, "lr": lr, "ema_decay": tau, "target_std": tstd, "pred_std": pstd,
                    "grad_norm": grad_norm, "samples_per_s": rate}
            last.update({f"time_{k}_s": v for k, v in timer.totals.items()})
            history.append({"step": done, **{k: last[k] for k in ("loss", "target_std", "pred_std")}})
            if hooks.rank == 0:
                eta = (t.max_steps - done) * elapsed / max(done - start_step, 1)
                hooks.progress(f"step {done}/{t.max_steps} loss {mean_loss:.4f} lr {lr:.2e} "
                               f"samples/s {rate:.1f} ETA {eta:.0f}s")
                if hooks.log_metrics is not None:
                    hooks.log_metrics(last, done)
        # RAY: report + checkpoint (a barrier on every rank)
        if done % t.checkpoint_every == 0 or done == t.max_steps:
            with timer.phase("checkpoint"):
                _checkpoint(cfg, hooks, student, teacher, opt, done, history, last, tokenizer)
    return {"step": t.max_steps, "stopped": None, "history": history, "timings": timer.totals, **last}


def _acc(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _stop(hooks: Hooks, step: int, reason: str, history: list) -> dict:
    """Every rank reaches this together (the checks use all-reduced values); report without a checkpoint."""
    hooks.progress(f"stopping: {reason}; the last good checkpoint is kept")
    hooks.report({"step": step, "stopped": reason}, None, None)
    return {"step": step, "stopped": reason, "history": history}


def _checkpoint(cfg, hooks: Hooks, student, teacher, opt, step: int, history: list, metrics: dict,
                tokenizer: Path | None) -> None:
    name = f"step_{step:08d}"
    report = {"step": step, "stopped": None, **metrics}
    if hooks.rank != 0:
        hooks.report(report, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="d2v-ckpt-") as tmp:
        d = Path(tmp) / name
        state = {"step": step, "seed": cfg.train.seed, "data_position": step * cfg.train.grad_accum,
                 "history": history}
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)  # tensors and plain containers only: loads with weights_only=True
        extra: dict[str, bytes | Path] = {"optimizer.pt": buf.getvalue()}
        if tokenizer is not None:
            extra["tokenizer.json"] = Path(tokenizer)
        save_checkpoint(d, cfg, student, teacher=teacher.model, state=state, extra_files=extra)
        hooks.report(report, str(d), name)


def _load_state(d: Path, student, teacher: EMATeacher, opt, device) -> tuple[int, list]:
    student.load_state_dict(load_file(d / "model.safetensors", device=str(device)))
    teacher.model.load_state_dict(load_file(d / "teacher.safetensors", device=str(device)))
    opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    state = json.loads((d / "state.json").read_text())
    return int(state["step"]), list(state.get("history", []))
