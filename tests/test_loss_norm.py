"""Loss normalisation across ranks and micro-batches, on 2 real DDP processes (torch.distributed gloo, CPU).

Reference: fairseq divides the gradient of the summed loss by the sample size summed over all ranks and
micro-batches (trainer: `multiply_grads(world_size / sample_size)` after DDP's average), i.e. the gradient
of (sum of per-step losses over the global batch) / (global masked-step count) -- the same as one process
computing the mean loss over the concatenated global batch. data2vec_vision takes each rank's mean and lets
DDP average. Two ranks x two micro-batches with four different mask counts tell the two apart.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from model.config import apply_overrides
from model.data2vec import Batch, Data2Vec, data2vec_loss
from model.presets import get_preset
from model.teacher import EMATeacher
from tests.test_model import make_batch
from workers.train import Hooks, accumulate_gradients

COUNTS = [[3, 9], [14, 5]]  # masked patches per image: rank r, micro-batch i (of 16 patches)


def config(normalize: str):
    return apply_overrides(get_preset("vision", "tiny"), [
        "model.trunk.drop_path=0", "model.trunk.attn_dropout=0", "model.trunk.dropout=0", "train.grad_accum=2",
        f"loss.normalize={normalize}"])


def micro_batches(cfg) -> list[list[Batch]]:
    """[rank][micro] batches of 2 images; image masks with COUNTS[r][i] masked patches."""
    out = []
    for r, row in enumerate(COUNTS):
        out.append([])
        for i, n in enumerate(row):
            b = make_batch(cfg, batch_size=2, seed=10 * r + i)
            g = torch.Generator().manual_seed(r * 7 + i)
            mask = torch.zeros(2, 16, dtype=torch.bool)
            for j in range(2):
                mask[j, torch.randperm(16, generator=g)[:n]] = True
            out[-1].append(Batch(b.inputs, mask))
    return out


def models(cfg):
    torch.manual_seed(0)
    student = Data2Vec(cfg.model)
    return student, EMATeacher(student.encoder, lambda n: True)


def _rank(rank: int, init_file: str, out: str) -> None:
    """One DDP rank: one update's gradient under each normalisation, saved to out.<mode>.<rank>."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for normalize in ("global_count", "rank_mean"):
            cfg = config(normalize)
            student, teacher = models(cfg)
            ddp = DistributedDataParallel(student)
            loss, _, _ = accumulate_gradients(ddp, teacher.model, cfg, micro_batches(cfg)[rank],
                                              Hooks(rank=rank, world_size=2), step=0)
            grads = {n: p.grad for n, p in student.named_parameters()}
            torch.save({"loss": loss, "grads": grads}, f"{out}.{normalize}.{rank}")
    finally:
        dist.destroy_process_group()


def ddp_results(tmp_path) -> dict[str, list[dict]]:
    out = str(tmp_path / "grads")
    mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    return {m: [torch.load(f"{out}.{m}.{r}", weights_only=True) for r in range(2)]
            for m in ("global_count", "rank_mean")}


def reference_grads(cfg, batches: list[Batch]) -> tuple[float, dict]:
    """One process, no DDP: mean loss over the masked steps of `batches` concatenated, and its gradient."""
    student, teacher = models(cfg)
    cat = Batch(torch.cat([b.inputs for b in batches]), torch.cat([b.mask for b in batches]))
    loss, _, _ = data2vec_loss(student, teacher.model, cfg, cat)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in student.named_parameters()}


def test_global_count_gradient_equals_one_process_on_the_global_batch(tmp_path):
    cfg = config("global_count")
    results = ddp_results(tmp_path)
    ranks = results["global_count"]
    want_loss, want = reference_grads(cfg, [b for row in micro_batches(cfg) for b in row])
    for r in ranks:
        assert abs(r["loss"] - want_loss) < 1e-5 * abs(want_loss)
        for n, g in want.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)

    # the per-rank mean (data2vec_vision) differs on these uneven counts: the average of per-micro-batch means
    ranks_mean = results["rank_mean"]
    cfg_mean = config("rank_mean")
    per_micro = [reference_grads(cfg_mean, [b]) for row in micro_batches(cfg_mean) for b in row]
    for n, g in want.items():
        mean_g = sum(p[1][n] for p in per_micro) / len(per_micro)
        torch.testing.assert_close(ranks_mean[0]["grads"][n], mean_g, rtol=1e-4, atol=1e-7, msg=n)
    diff = max(float((ranks_mean[0]["grads"][n] - g).abs().max()) for n, g in want.items())
    assert diff > 1e-3 * max(float(g.abs().max()) for g in want.values())
