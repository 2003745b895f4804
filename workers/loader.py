"""Shard loader: WebDataset shards -> augmented, masked `Batch`es, deterministic and resumable.

    loader = build_loader(cfg, shards, rank=r, world_size=n, start_step=step)
    for step, batch in zip(range(step, cfg.train.max_steps), loader): ...   # infinite stream

Determinism (why every rank takes the same number of steps and a resumed run sees the same data):
- W = max(1, num_workers) *lanes*; spe = steps_per_epoch(...) is a multiple of W. Global step s on rank r
  belongs to epoch e = s // spe, lane l = s % W, and is batch k = (s % spe) // W of that lane's epoch.
- Lane l of rank r in epoch e is one webdataset stream: shards drawn with replacement by an RNG seeded
  from (seed, e, r, l) -> tar samples -> cheap check on the raw bytes (which also gives each sample's
  cost: audio samples after the crop cap, text tokens) -> shuffle buffer (seeded likewise). Batch k takes
  the stream's next B checked samples, or with train.max_tokens the longest run whose count x largest
  cost fits the budget (fairseq batch_by_size rule); after spe / W batches a fresh stream starts the
  next epoch. Resampling makes every stream infinite, so uneven shards cannot end a rank early.
- Each sample's augmentation and mask draws come from an RNG seeded from (seed, e, r, l, p) where p is
  its position in the lane's epoch stream (k*B + i with clip counts), and the batch-level draws (audio
  crop to the shortest, span masks) from (seed, e, r, l, k): resuming replays the batch cuts of the
  first k batches on the costs alone, skipping those samples *undecoded*, and replays no RNG.
- DataLoader worker w serves lane (start_step + w) % W: torch fetches batch i from worker i % W, so batch
  i of the loader is global step start_step + i. Every batch carries its step and the iterator checks it.
So the batch of step s on rank r is a pure function of (cfg, shards, spe, r, s), num_workers=0 included
(cfg fixes seed, batch size and W; spe follows from num_samples, batch size, world size and W).

Bad data: a sample whose bytes fail the cheap check (not an image / audio header, bad npy, no payload)
is dropped before the shuffle; one that fails the full decode later is replaced in its batch by a
re-augmented copy of another sample of the same batch (so batch positions, and resume, stay exact;
only a batch with no decodable sample at all shifts the rest of its epoch, with a warning).
Unreadable or truncated shards are skipped by the webdataset handler. All of it is logged with the shard
and key and counted in `ShardLoader.stats`. No ray / mlflow here: the trainer passes rank and world size.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import random
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from model.config import Config
from model.data2vec import Batch
from model.frontends import audio_frames
from model.masking import bert_mask, block_mask, span_mask_batch, text_span_mask
from model.masking_v2 import make_masks
from workers.preprocess import SAMPLE_RATE, load_audio, normalize_wave, open_image, train_image

log = logging.getLogger(__name__)

# seed domains: the first entry after the global seed, so no two kinds of draw share a stream
_SHARDS, _SHUFFLE, _SAMPLE, _FILL, _BATCH = range(5)
_MAX_WARNINGS = 20  # per lane; then one "suppressed" line (the counters keep counting)
STAT_KEYS = ("batches", "samples", "skipped", "corrupt", "too_short", "filled", "shard_errors")


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, num_workers: int) -> int:
    """Steps per epoch on every rank: one pass over num_samples across all ranks, rounded up to a
    multiple of the lane count max(1, num_workers) so that every lane yields the same number of batches."""
    lanes = max(1, num_workers)
    steps = math.ceil(max(1, num_samples) / (batch_size * world_size))
    return lanes * math.ceil(steps / lanes)


def samples_per_batch(cfg: Config) -> int:
    """Samples per batch for the epoch length: train.batch_size, or with a token budget the count that
    full-length samples (data.max_samples audio / data.block_size text) fill; shorter samples make
    fuller batches, so such an "epoch" passes over the data at least once."""
    t = cfg.train
    if t.max_tokens is None:
        return t.batch_size
    longest = cfg.data.max_samples if cfg.model.modality == "audio" else cfg.data.block_size
    return max(1, t.max_tokens // longest)


def count_samples(shards: list[str]) -> int:
    """Samples in `shards`: from manifest.parquet next to the first shard when it lists them, else by
    reading the tar headers (local shards only)."""
    names = {os.path.basename(s) for s in shards}
    manifest = os.path.join(os.path.dirname(shards[0]), "manifest.parquet")
    if "://" in manifest or os.path.exists(manifest):
        try:
            import pyarrow.parquet as pq

            col = pq.read_table(manifest, columns=["shard"]).column("shard").to_pylist()
            n = sum(os.path.basename(str(s)) in names for s in col)
            if n:
                return n
        except Exception as exn:  # unreadable, or another layout: count the tars
            log.warning("cannot count samples from %s (%r); reading the tars", manifest, exn)
    import tarfile

    total = 0
    for path in shards:
        try:
            with tarfile.open(path) as tar:
                total += len({m.name.split("/")[-1].split(".", 1)[0] for m in tar if m.isreg()})
        except Exception as exn:  # unreadable shard: the loader will skip it too
            log.warning("cannot count samples in shard %s: %r", path, exn)
    return total


# ------------------------------------------------------------------------------------------ seeding
def _seq(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([p % 2**63 for p in parts])


def _int_seed(*parts: int) -> int:
    return int(_seq(*parts).generate_state(1, np.uint64)[0])


def _rngs(*parts: int) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy Generator (augmentation) and a torch Generator (masks), both seeded from `parts`."""
    seq = _seq(*parts)
    words = seq.generate_state(5, np.uint64)  # PCG64 takes words 0-3 of the same sequence; torch gets word 4
    return np.random.Generator(np.random.PCG64(seq)), torch.Generator().manual_seed(int(words[4] >> 1))


# ------------------------------------------------------------------------------ modality codecs
# check(sample) -> cost (int, ok: 1 per image, audio samples after the crop cap, text tokens) | reason
#   (str): cheap, on raw bytes only (runs also for samples skipped on resume).
# decode(payload, rng, g) -> item: full decode + augmentation + per-sample mask; raises on bad data.
# collate(items, g) -> dict of tensors in the `Batch` layout.
# data2vec 2.0 (cfg.v2): M = v2.clone_batch masks per sample, `mask` is (B, M, T), drawn from the same seeded
#   generators as v1's masks (per sample for vision, per batch for audio and text), so just as resumable.


class _Vision:
    keys = ("png", "jpg", "jpeg", "webp")

    def __init__(self, cfg: Config) -> None:
        self.size, self.grid = cfg.model.frontend.image_size, cfg.model.frontend.grid  # type: ignore[union-attr]
        self.data, self.m = cfg.data, cfg.masking
        self.clones = cfg.v2.clone_batch if cfg.v2 is not None else 0

    def check(self, payload: bytes) -> str | int:
        from PIL import Image

        try:
            Image.open(io.BytesIO(payload))  # lazy: reads the header only
        except Exception as exn:
            return f"not an image ({exn!r})"
        return 1

    def decode(self, payload: bytes, rng: np.random.Generator, g: torch.Generator):
        d, m = self.data, self.m
        x = train_image(open_image(payload), self.size, rng, scale=d.crop_scale, hflip=d.hflip, jitter=d.color_jitter)
        if self.clones:
            return x, make_masks(m, self.clones, self.grid**2, generator=g)  # (3, H, W), (M, N)
        mask = block_mask(self.grid, self.grid, m.num_masked, m.min_block, m.max_block, m.min_aspect, generator=g)
        return x, mask  # (3, H, W), (N,)

    def collate(self, items: list, g: torch.Generator) -> dict[str, Any]:
        return {"inputs": torch.stack([x for x, _ in items]),  # (B, 3, H, W)
                "mask": torch.stack([m for _, m in items]),  # (B, N)
                "padding_mask": None, "teacher_inputs": None}


class _Audio:
    keys = ("flac", "wav")

    def __init__(self, cfg: Config) -> None:
        self.conv = cfg.model.frontend.conv_layers  # type: ignore[union-attr]
        self.data, self.m = cfg.data, cfg.masking
        self.clones = cfg.v2.clone_batch if cfg.v2 is not None else 0

    def check(self, payload: bytes) -> str | int:
        import soundfile as sf

        try:
            info = sf.info(io.BytesIO(payload))  # header only
        except Exception as exn:
            return f"not audio ({exn!r})"
        frames = info.frames * SAMPLE_RATE // max(1, info.samplerate)
        if frames < self.data.min_samples:
            return "too_short"
        return min(frames, self.data.max_samples)  # fairseq RawAudioDataset.size without padding

    def decode(self, payload: bytes, rng: np.random.Generator, g: torch.Generator):
        wav = load_audio(payload)  # (S_i,) float32, 16 kHz mono
        if len(wav) < self.data.min_samples:
            raise ValueError(f"{len(wav)} samples decoded, header promised >= {self.data.min_samples}")
        if self.data.normalize:  # per utterance, before cropping (fairseq postprocess -> collater)
            wav = normalize_wave(wav)
        return wav, rng

    def collate(self, items: list, g: torch.Generator) -> dict[str, Any]:
        # fairseq without padding: crop every clip to the shortest (at most max_samples), random offsets
        size = min(min(len(w) for w, _ in items), self.data.max_samples)
        crops = []
        for wav, rng in items:
            start = int(rng.integers(0, len(wav) - size + 1))
            crops.append(torch.from_numpy(wav[start : start + size]))
        frames = int(audio_frames(size, self.conv))
        m = self.m
        if self.clones:  # (B, M, frames)
            mask = torch.stack([make_masks(m, self.clones, frames, generator=g) for _ in items])
        else:
            mask = span_mask_batch([frames] * len(items), frames, m.mask_prob, m.span_length, m.min_spans,
                                   same_count=m.require_same_masks, generator=g)
        return {"inputs": torch.stack(crops),  # (B, S)
                "mask": mask,  # (B, frames)
                "padding_mask": None, "teacher_inputs": None}


class _Text:
    keys = ("ids.npy", "npy")

    def __init__(self, cfg: Config) -> None:
        f = cfg.model.frontend
        self.f, self.m, self.block = f, cfg.masking, cfg.data.block_size
        self.num_special = max(f.bos_id, f.pad_id, f.eos_id, f.unk_id, f.mask_id) + 1  # type: ignore[union-attr]
        self.clones = cfg.v2.clone_batch if cfg.v2 is not None else 0

    def _ids(self, payload: bytes) -> np.ndarray:
        ids = np.load(io.BytesIO(payload), allow_pickle=False)
        if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
            raise ValueError(f"expected a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
        if ids.min() < 0 or ids.max() >= self.f.vocab_size:  # type: ignore[union-attr]
            raise ValueError(f"token ids outside [0, {self.f.vocab_size})")  # type: ignore[union-attr]
        return ids

    def check(self, payload: bytes) -> str | int:
        try:
            n = len(self._ids(payload))
        except Exception as exn:
            return f"bad ids ({exn!r})"
        return min(n + 1, self.block)  # <s> + block

    def decode(self, payload: bytes, rng: np.random.Generator, g: torch.Generator):
        f, m = self.f, self.m
        ids = self._ids(payload)  # a block: whole document or a piece of one, ending in </s> if it ends one
        window = self.block - 1  # fairseq: tokens_per_sample - 1, then <s> prepended
        start = int(rng.integers(0, len(ids) - window + 1)) if len(ids) > window else 0
        ids = torch.from_numpy(ids[start : start + window].astype(np.int64))
        ids = torch.cat([torch.tensor([f.bos_id]), ids])  # (T_i,) <s> ...
        if self.clones:  # v2: no <mask> token; the M masks are drawn per batch, over the padded length
            return ids, ids, None
        if m.kind == "bert":
            masked, target = bert_mask(ids, f.mask_id, f.vocab_size, self.num_special, m.mask_prob,
                                       m.replace_mask, m.replace_random, generator=g)
        else:
            masked, target = text_span_mask(ids, f.mask_id, m.mask_prob, m.span_length, m.min_spans, generator=g)
        return ids, masked, target

    def collate(self, items: list, g: torch.Generator) -> dict[str, Any]:
        if self.clones:
            return self._collate_v2(items, g)
        lengths = [len(ids) for ids, _, _ in items]
        T, B = max(lengths), len(items)
        teacher = torch.full((B, T), self.f.pad_id, dtype=torch.long)  # (B, T)
        inputs = teacher.clone()
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (ids, masked, target) in enumerate(items):
            n = len(ids)
            teacher[b, :n], inputs[b, :n], mask[b, :n] = ids, masked, target
        if not mask.any():  # short samples can draw no span; the loss needs one masked token
            b = int(torch.randint(B, (1,), generator=g))
            t = int(torch.randint(lengths[b], (1,), generator=g))
            mask[b, t], inputs[b, t] = True, self.f.mask_id
        pad = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
        return {"inputs": inputs, "mask": mask, "padding_mask": pad if pad.any() else None, "teacher_inputs": teacher}

    def _collate_v2(self, items: list, g: torch.Generator) -> dict[str, Any]:
        """v2: the unmasked ids for student and teacher, (B, M, T) random masks over the padded length
        (the reference masks padded steps too; the loss leaves them out)."""
        lengths = [len(ids) for ids, _, _ in items]
        T, B = max(lengths), len(items)
        inputs = torch.full((B, T), self.f.pad_id, dtype=torch.long)  # (B, T)
        for b, (ids, _, _) in enumerate(items):
            inputs[b, : len(ids)] = ids
        mask = make_masks(self.m, B * self.clones, T, generator=g).view(B, self.clones, T)  # (B, M, T)
        pad = torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]  # (B, T)
        return {"inputs": inputs, "mask": mask, "padding_mask": pad if pad.any() else None, "teacher_inputs": None}


_CODECS = {"vision": _Vision, "audio": _Audio, "text": _Text}


# ------------------------------------------------------------------------------------------- lanes
def _open_url(url: str):
    if url.split("://", 1)[0] in ("s3", "gs", "gcs", "hdfs", "abfs"):
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(url)
        return fs.open_input_stream(path)
    return wds.gopen(url)  # local paths, file:, pipe:, http(s):


class _Lane:
    """One lane of one rank: its per-epoch webdataset streams, batches and counters."""

    def __init__(self, cfg: Config, shards: list[str], rank: int, lane: int, lanes: int, spe: int) -> None:
        self.cfg, self.shards, self.rank, self.lane, self.lanes, self.spe = cfg, shards, rank, lane, lanes, spe
        self.codec = _CODECS[cfg.model.modality](cfg)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self._warned = 0
        self._dry = 0  # shards opened since the last usable sample

    def _warn(self, msg: str, *args: object) -> None:
        self._warned += 1
        if self._warned <= _MAX_WARNINGS:
            log.warning("loader rank %d lane %d: " + msg, self.rank, self.lane, *args)
        if self._warned == _MAX_WARNINGS:
            log.warning("loader rank %d lane %d: further data warnings suppressed; see .stats", self.rank, self.lane)

    # -------------------------------------------------------------- raw stream
    def _shard_error(self, exn: Exception) -> bool:
        """webdataset handler: log, count, continue with the next shard."""
        self.stats["shard_errors"] += 1
        self._warn("skipping unreadable shard data: %r", exn)
        return True

    def _urls(self, rng: random.Random) -> Iterator[dict]:
        """Shards drawn with replacement, forever, each opened (the previous one closed)."""
        limit = 20 * len(self.shards) + 20
        stream = None
        try:
            while True:
                url = self.shards[rng.randrange(len(self.shards))]
                self._dry += 1
                if self._dry > limit:
                    raise RuntimeError(f"no usable sample in {limit} shard draws from {self.shards[:3]}...")
                if stream is not None:
                    stream.close()
                    stream = None
                try:
                    stream = _open_url(url)
                except Exception as exn:
                    self._shard_error(exn)
                    continue
                yield {"url": url, "stream": stream}
        finally:
            if stream is not None:
                stream.close()

    def _checked(self, samples: Iterator[dict]) -> Iterator[tuple[str, str, bytes, int]]:
        """(url, key, payload, cost) of the samples that pass the codec's cheap check; the rest counted."""
        for s in samples:
            key, url = s.get("__key__"), s.get("__url__")
            payload = next((s[k] for k in self.codec.keys if k in s), None)
            reason = "no payload (" + "/".join(self.codec.keys) + ")" if payload is None else self.codec.check(payload)
            if isinstance(reason, int):
                self._dry = 0
                yield url, key, payload, reason
            elif reason == "too_short":
                self.stats["too_short"] += 1
            else:
                self.stats["corrupt"] += 1
                self._warn("skipping sample %s in %s: %s", key, url, reason)

    def stream(self, epoch: int) -> Iterator[tuple[str, str, bytes, int]]:
        """The lane's checked, shuffled sample stream for one epoch (infinite)."""
        seed = self.cfg.train.seed
        urls = self._urls(random.Random(_int_seed(seed, _SHARDS, epoch, self.rank, self.lane)))
        files = tar_file_expander(urls, handler=self._shard_error)
        samples = self._checked(group_by_keys(files, handler=self._shard_error))
        buf = self.cfg.data.shuffle_buffer
        if buf > 1:
            rng = random.Random(_int_seed(seed, _SHUFFLE, epoch, self.rank, self.lane))
            samples = wds.shuffle(buf, min(buf, 100), rng=rng)(samples)
        return samples

    # -------------------------------------------------------------- batches
    def _decode(self, raw: tuple[str, str, bytes, int], *seed: int):
        url, key, payload, _ = raw
        try:
            return self.codec.decode(payload, *_rngs(self.cfg.train.seed, *seed))
        except Exception as exn:
            self.stats["corrupt"] += 1
            self._warn("cannot decode sample %s in %s: %r", key, url, exn)
            return None

    def batch(self, cuts: "_Cutter", epoch: int, k: int) -> dict[str, Any]:
        """Batch k of this lane's epoch: the next cut of checked samples (stream positions p0, p0+1, ...),
        decoded and collated."""
        ids = (epoch, self.rank, self.lane)
        for _ in range(10):
            p0, raws = cuts.pos, cuts.take()
            items = [self._decode(r, _SAMPLE, *ids, p0 + i) for i, r in enumerate(raws)]
            good = [i for i, it in enumerate(items) if it is not None]
            if good:
                break
            self._warn("batch %d of epoch %d had no decodable sample; taking the next %d", k, epoch, len(raws))
        else:
            raise RuntimeError(f"rank {self.rank} lane {self.lane}: 10 batches in a row without a decodable sample")
        for i, it in enumerate(items):
            if it is None:  # replace by the next good sample of the batch, with this slot's own draws
                j = min(good, key=lambda j: (j - i) % len(items))
                items[i] = self._decode(raws[j], _FILL, *ids, p0 + i) or items[j]
                self.stats["filled"] += 1
        self.stats["samples"] += len(good)
        self.stats["batches"] += 1
        _, g = _rngs(self.cfg.train.seed, _BATCH, *ids, k)
        return self.codec.collate(items, g)

    def batches(self, first_step: int) -> Iterator[dict[str, Any]]:
        """Batches of global steps first_step, first_step + W, ... (first_step % W == lane), forever."""
        assert first_step % self.lanes == self.lane
        per_epoch, t = self.spe // self.lanes, self.cfg.train
        step = first_step
        while True:
            epoch, k0 = step // self.spe, (step % self.spe) // self.lanes
            cuts = _Cutter(self.stream(epoch), t.batch_size, t.max_tokens)
            for _ in range(k0):  # resume: replay the cuts on costs alone, samples skipped undecoded
                self.stats["skipped"] += len(cuts.take())
            for k in range(k0, per_epoch):
                out = self.batch(cuts, epoch, k)
                out.update(step=step, lane=self.lane, stats=dict(self.stats))
                yield out
                step += self.lanes
            del cuts  # closes the epoch's open shard


class _Cutter:
    """Cuts a lane's checked stream into batches: `batch_size` samples, or with a token budget the longest
    run of samples whose count x largest cost stays within it (at least one sample; fairseq batch_by_size
    without the length sort). `pos` counts the samples taken so far (the per-sample seed position)."""

    def __init__(self, stream: Iterator[tuple[str, str, bytes, int]], batch_size: int, max_tokens: int | None):
        self.stream, self.batch_size, self.max_tokens = stream, batch_size, max_tokens
        self.pos, self._held = 0, None  # _held: a sample that did not fit the previous batch

    def take(self) -> list[tuple[str, str, bytes, int]]:
        if self.max_tokens is None:
            out = list(itertools.islice(self.stream, self.batch_size))
        else:
            out, longest = [], 0
            while (raw := self._held if self._held is not None else next(self.stream, None)) is not None:
                self._held = None
                if out and (len(out) + 1) * max(longest, raw[3]) > self.max_tokens:
                    self._held = raw
                    break
                out.append(raw)
                longest = max(longest, raw[3])
        self.pos += len(out)
        return out


class LaneDataset(IterableDataset):
    """The IterableDataset behind the DataLoader: each worker (or the main process) runs one lane."""

    def __init__(self, cfg: Config, shards: list[str], rank: int, start_step: int, spe: int) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank, self.start_step, self.spe = cfg, list(shards), rank, start_step, spe

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, lanes = (0, 1) if info is None else (info.id, info.num_workers)
        lane = (self.start_step + w) % lanes
        yield from _Lane(self.cfg, self.shards, self.rank, lane, lanes, self.spe).batches(self.start_step + w)


class ShardLoader:
    """Iterator of `Batch`es for global steps start_step, start_step + 1, ... (infinite).

    `.step` is the step of the next batch, `.steps_per_epoch` the epoch length on every rank, `.stats`
    the data counters summed over lanes, as of the batches received so far: batches, samples (decoded
    into batches), skipped (passed over on resume), corrupt (failed the check or the decode), too_short
    (audio under min_samples), filled (batch slots given a copy of another sample), shard_errors.
    """

    def __init__(self, dataset: LaneDataset, num_workers: int, pin_memory: bool) -> None:
        self.step, self.steps_per_epoch = dataset.start_step, dataset.spe
        kw: dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=2)
        self._loader = DataLoader(dataset, batch_size=None, **kw)
        self._it: Iterator | None = None
        self._lane_stats: dict[int, dict[str, int]] = {}

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> Batch:
        if self._it is None:
            self._it = iter(self._loader)
        d = next(self._it)
        step, lane, stats = d.pop("step"), d.pop("lane"), d.pop("stats")
        if step != self.step:  # would mean torch stopped fetching round-robin from the workers
            raise RuntimeError(f"loader delivered step {step} where step {self.step} was expected")
        self._lane_stats[lane] = stats
        self.step += 1
        return Batch(**d)

    @property
    def stats(self) -> dict[str, int]:
        return {k: sum(s[k] for s in self._lane_stats.values()) for k in STAT_KEYS}

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage collected)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build_loader(
    cfg: Config,
    shards: list[str],
    *,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    num_samples: int | None = None,
) -> ShardLoader:
    """Infinite iterator of `Batch`es for global steps start_step, start_step + 1, ... on `rank`.

    shards: tar paths or URIs; pass the same full list on every rank (each rank and lane draws from all
    of them with its own seed). num_samples: samples in the whole dataset (defines the epoch length);
    None = from manifest.parquet next to the shards, else counted from the tars.
    """
    if not shards:
        raise ValueError("build_loader: no shards given")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    n = count_samples(shards) if num_samples is None else num_samples
    spe = steps_per_epoch(n, samples_per_batch(cfg), world_size, cfg.data.num_workers)
    ds = LaneDataset(cfg, shards, rank, start_step, spe)
    return ShardLoader(ds, cfg.data.num_workers, pin_memory=torch.cuda.is_available())
