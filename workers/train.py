"""The data2vec training loop, as it runs inside each Ray Train worker.

Ray appears only at the marked points (RAY:): dataset shard / rank, prepare model, report + checkpoint,
get checkpoint. Everything else is plain PyTorch, so the same loop runs in a plain process
(`Hooks()` defaults) for benchmarks and tests.

Resume is exact (bit-identical on CPU to the uninterrupted run): a checkpoint holds student, teacher,
optimiser and the data position in micro-batches, and each micro-batch seeds torch's RNG (dropout, drop
path, layerdrop) from (seed, step, micro-batch, rank) instead of carrying RNG state across steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from pyarrow.fs import LocalFileSystem
from safetensors.torch import load_file

from model.checkpoint import load_config, save_checkpoint
from model.config import Config
from model.data2vec import Batch, Data2Vec, data2vec_loss
from model.data2vec2 import Data2Vec2, data2vec2_loss
from model.targets import mean_std, variance_stats
from model.teacher import EMATeacher, ema_decay

from .optim import build_optimizer, lr_at, set_lr
from .resume import check_resume, checkpoint_problem


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
    # the checkpoint directory name for an update step (a resume past torn checkpoints avoids their names)
    checkpoint_name: Callable[[int], str] = lambda step: f"step_{step:08d}"


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

    batches_from(position) returns an iterator of model.data2vec.Batch for this rank, starting at micro-batch
    `position` (micro-batches consumed so far: update step x grad_accum); text runs pass the shard set's
    tokenizer.json, which every checkpoint carries.
    """
    t = cfg.train
    torch.manual_seed(t.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    # v2: encoder + conv decoder; the teacher averages the encoder only, the decoder is trained, never averaged
    student = (Data2Vec2(cfg.model, cfg.v2) if cfg.version == "v2" else Data2Vec(cfg.model)).to(hooks.device)
    teacher = EMATeacher(student.encoder, lambda n: student.encoder.is_averaged(n, cfg.teacher.scope))
    opt = build_optimizer(student, cfg.optim)

    # RAY: get checkpoint -- resume where the last run (or the failed worker group) stopped
    start_step, position, history = 0, 0, []
    ckpt_ctx = hooks.latest_checkpoint()
    if ckpt_ctx is not None:
        with ckpt_ctx as d:
            start_step, position, history = _load_state(Path(d), cfg, student, teacher, opt, hooks.device)
        hooks.progress(f"resumed from checkpoint at step {start_step}")

    # RAY: prepare model (DDP)
    model = hooks.prepare_model(student)
    batches = iter(batches_from(position))
    precision = _precision(cfg, hooks.device)
    timer = Timer(hooks.device)
    last = {}
    t_start, samples_done, step = time.perf_counter(), 0, start_step
    for step in range(start_step, t.max_steps):
        # apply schedules
        lr = lr_at(step, cfg.optim, t.max_steps)
        set_lr(opt, lr)
        # compute losses (gradient accumulation over micro-batches; DDP syncs on the last one)
        with timer.phase("data"):
            micro = [next(batches) for _ in range(t.grad_accum)]
        position += t.grad_accum
        mean_loss, tvar, pvar = accumulate_gradients(model, teacher.model, cfg, micro, hooks, step, precision, timer)
        samples_done += sum(len(b) for b in micro)
        # optimiser step (clip), stop on non-finite loss
        with timer.phase("optim"):
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
                _checkpoint(cfg, hooks, student, teacher, opt, done, position, history, last, tokenizer)
    return {"step": t.max_steps, "stopped": None, "history": history, "timings": timer.totals, **last}


def accumulate_gradients(
    model: torch.nn.Module, teacher: torch.nn.Module, cfg: Config, micro: list[Batch], hooks: Hooks, step: int,
    precision: tuple[Callable, Callable] = (nullcontext, nullcontext), timer: Timer | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Forward + backward over one update's micro-batches; leaves d(update loss)/d(params) in `.grad`.

    loss.normalize = 'global_count' (fairseq): the update loss is the sum of the per-step losses over all
    ranks and micro-batches divided by their total masked-step count N, all-reduced before any backward.
    Micro-batch i on this rank is weighted n_i * W / N, so DDP's gradient average (1/W) gives exactly
    d(global sum / N). 'rank_mean' (data2vec_vision): each micro-batch's mean, / grad_accum, averaged by DDP.
    Returns (the update's mean loss over all ranks, target and prediction variance stats of this rank).
    """
    timer = timer or Timer(hooks.device)
    counts = [int(b.mask.sum()) for b in micro]  # masked steps (loss positions) per micro-batch
    world, k = hooks.world_size, len(micro)
    total = float(sum(counts))
    if cfg.loss.normalize == "global_count":
        total = float(_all_reduce(torch.tensor([total], dtype=torch.float64, device=hooks.device), world)[0])
        weights = [n * world / max(total, 1.0) for n in counts]
    else:
        weights = [1.0 / k] * k
    student_ctx, teacher_ctx = precision
    objective = data2vec2_loss if cfg.version == "v2" else data2vec_loss
    loss_num, tvar, pvar = 0.0, None, None
    for i, (batch, w) in enumerate(zip(micro, weights)):
        torch.manual_seed(_micro_seed(cfg.train.seed, step, i, hooks.rank))  # dropout etc.: resumable exactly
        with timer.phase("data"):
            batch = batch.to(hooks.device, non_blocking=True)
        sync = i == k - 1 or not hasattr(model, "no_sync")
        with (nullcontext() if sync else model.no_sync()):
            with timer.phase("forward"):
                loss, pred, target = objective(model, teacher, cfg, batch, student_precision=student_ctx,
                                               teacher_precision=teacher_ctx)
            with timer.phase("backward"):
                (loss * w).backward()
        # numerator of the reported mean: sum of per-step losses (global) or of micro-batch means / k (rank)
        loss_num += float(loss.detach()) * (counts[i] if cfg.loss.normalize == "global_count" else 1.0 / k)
        tvar = _acc(tvar, variance_stats(target.detach().float()))
        pvar = _acc(pvar, variance_stats(pred.detach().float()))
    num = float(_all_reduce(torch.tensor([loss_num], dtype=torch.float64, device=hooks.device), world)[0])
    mean_loss = num / max(total, 1.0) if cfg.loss.normalize == "global_count" else num / world
    return mean_loss, tvar, pvar


def _precision(cfg: Config, device: torch.device) -> tuple[Callable, Callable]:
    """(student, teacher) precision contexts: bf16 autocast for the student when asked; the teacher shares
    it (teacher.precision='student') or runs outside it in fp32 ('fp32', as data2vec_vision does)."""
    t = cfg.train
    if not (t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")):
        return nullcontext, nullcontext
    student = partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)
    return student, (student if cfg.teacher.precision == "student" else nullcontext)


def _micro_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch RNG seed of one micro-batch: a function of where it is, so a resumed run draws the same
    dropout / drop-path / layerdrop as the uninterrupted one, and ranks draw differently."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _acc(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _stop(hooks: Hooks, step: int, reason: str, history: list) -> dict:
    """Every rank reaches this together (the checks use all-reduced values); report without a checkpoint."""
    hooks.progress(f"stopping: {reason}; the last good checkpoint is kept")
    hooks.report({"step": step, "stopped": reason}, None, None)
    return {"step": step, "stopped": reason, "history": history}


def _checkpoint(cfg, hooks: Hooks, student, teacher, opt, step: int, position: int, history: list,
                metrics: dict, tokenizer: Path | None) -> None:
    name = hooks.checkpoint_name(step)
    report = {"step": step, "stopped": None, **metrics}
    if hooks.rank != 0:
        hooks.report(report, None, name)
        return
    with tempfile.TemporaryDirectory(prefix="d2v-ckpt-") as tmp:
        d = Path(tmp) / name
        # data_position: micro-batches consumed, where the loader resumes (not the update step)
        state = {"step": step, "seed": cfg.train.seed, "data_position": position, "history": history}
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)  # tensors and plain containers only: loads with weights_only=True
        extra: dict[str, bytes | Path] = {"optimizer.pt": buf.getvalue()}
        if tokenizer is not None:
            extra["tokenizer.json"] = Path(tokenizer)
        save_checkpoint(d, cfg, student, teacher=teacher.model, state=state, extra_files=extra)
        # never hand Ray a checkpoint that is not whole: it is uploaded, then registered as resumable
        why = checkpoint_problem(LocalFileSystem(), str(d))
        if why is not None:
            raise OSError(f"checkpoint {name} written to {d} is not whole ({why}); not reporting it")
        hooks.report(report, str(d), name)


def _load_state(d: Path, cfg: Config, student, teacher: EMATeacher, opt, device) -> tuple[int, int, list]:
    """Load a checkpoint -> (update step, data position in micro-batches, history).

    The checkpoint's config must fit this run (the driver checks the same before any cluster time; this
    catches a storage directory reused under another config)."""
    check_resume(f"checkpoint {d}", load_config(d), cfg)
    student.load_state_dict(load_file(d / "model.safetensors", device=str(device)))
    teacher.model.load_state_dict(load_file(d / "teacher.safetensors", device=str(device)))
    opt.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))
    state = json.loads((d / "state.json").read_text())
    step = int(state["step"])
    return step, int(state.get("data_position", step * cfg.train.grad_accum)), list(state.get("history", []))
