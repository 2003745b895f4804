"""Shard loader: Batch contract per modality, equal steps across ranks, bit-exact resume, bad data.

Shards are written here with webdataset's own TarWriter (independent of pipelines/shard.py).
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from model.config import apply_overrides
from model.frontends import audio_frames
from model.presets import audio_tiny, text_tiny, vision_tiny
from workers.loader import build_loader, count_samples, steps_per_epoch


# ------------------------------------------------------------------------------------------ shards
def _png(rng: np.random.Generator) -> bytes:
    h, w = int(rng.integers(36, 56)), int(rng.integers(36, 56))
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _flac(rng: np.random.Generator, n: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.1 * rng.standard_normal(n)).astype(np.float32), 16_000, format="FLAC")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_shards(root, modality: str, sizes: list[int], seed: int = 0) -> list[str]:
    """Shards `<modality>-00000i.tar` with sizes[i] samples each; returns their paths."""
    rng = np.random.default_rng(seed)
    paths, n = [], 0
    for i, size in enumerate(sizes):
        path = os.path.join(root, f"{modality}-{i:06d}.tar")
        with wds.TarWriter(path) as tw:
            for _ in range(size):
                s = {"__key__": f"s{n:06d}", "json": {"source": f"src/{n}", "label": n % 3}}
                if modality == "vision":
                    s["png"] = _png(rng)
                elif modality == "audio":  # 0.3 .. 1.5 s; every 4th 3000 samples, below the tiny minimum (4000)
                    s["flac"] = _flac(rng, 3_000 if n % 4 == 0 else int(rng.integers(5_000, 24_000)))
                else:  # 128-id blocks, every 5th one shorter (the last block of a document)
                    length = 128 if n % 5 else int(rng.integers(20, 100))
                    s["ids.npy"] = _npy(rng.integers(5, 4096, length).astype(np.int32))
                tw.write(s)
                n += 1
        paths.append(path)
    return paths


def tiny(modality: str, **overrides):
    cfg = {"vision": vision_tiny, "audio": audio_tiny, "text": text_tiny}[modality]()
    base = {"train.batch_size": 4, "data.num_workers": 2, "data.shuffle_buffer": 8}
    return apply_overrides(cfg, [f"{k}={v}" for k, v in {**base, **overrides}.items()])


def take(loader, n: int) -> list:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for m in ("vision", "audio", "text"):
        os.makedirs(root / m)
        out[m] = write_shards(str(root / m), m, [12, 12, 12, 4])  # uneven: 40 samples
    return out


def same(a, b) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in [(a.inputs, b.inputs), (a.mask, b.mask), (a.padding_mask, b.padding_mask),
                     (a.teacher_inputs, b.teacher_inputs)]
    )


# ---------------------------------------------------------------------------------- epoch length
def test_steps_per_epoch():
    assert steps_per_epoch(40, 4, 1, 2) == 10
    assert steps_per_epoch(40, 4, 2, 2) == 6  # 5 rounded up to a multiple of 2 lanes
    assert steps_per_epoch(40, 4, 2, 0) == 5
    assert steps_per_epoch(1, 4, 8, 3) == 3


def test_count_samples(shards):
    assert count_samples(shards["vision"]) == 40


# ------------------------------------------------------------------------------ contract, per modality
def test_vision_batch_contract_and_equal_steps(shards):
    cfg = tiny("vision")
    naive = [shards["vision"][:3], shards["vision"][3:]]  # a naive split: 36 vs 4 samples
    for rank in (0, 1):
        batches = take(build_loader(cfg, naive[rank], rank=rank, world_size=2, num_samples=40), 12)
        assert len(batches) == 12  # > 2 epochs of spe=6 steps on both ranks, no early stop
        for b in batches:
            assert b.inputs.shape == (4, 3, 32, 32) and b.inputs.dtype == torch.float32
            assert b.mask.shape == (4, cfg.model.frontend.grid ** 2) and b.mask.dtype == torch.bool
            assert b.padding_mask is None and b.teacher_inputs is None
            counts = b.mask.sum(1)
            assert ((counts > 0) & (counts <= cfg.masking.num_masked)).all()


def test_audio_batch_contract(shards):
    cfg = tiny("audio")
    loader = build_loader(cfg, shards["audio"], num_samples=40)
    batches = [next(loader) for _ in range(6)]
    stats = loader.stats
    loader.close()
    conv = cfg.model.frontend.conv_layers
    for b in batches:
        B, S = b.inputs.shape
        assert B == 4 and b.inputs.dtype == torch.float32
        assert cfg.data.min_samples <= S <= cfg.data.max_samples
        assert b.mask.shape == (4, audio_frames(S, conv)) and b.mask.dtype == torch.bool
        assert b.mask.any(1).all()
        assert b.padding_mask is None and b.teacher_inputs is None
        # normalised per utterance before the crop: roughly zero mean, unit variance
        assert b.inputs.mean().abs() < 0.2 and 0.7 < b.inputs.std() < 1.3
    assert stats["too_short"] > 0 and stats["samples"] == 6 * 4


@pytest.mark.parametrize("kind", ["span", "bert"])
def test_text_batch_contract(shards, kind):
    cfg = tiny("text", **({"masking.kind": "bert"} if kind == "bert" else {}))
    batches = take(build_loader(cfg, shards["text"], num_samples=40), 10)
    f = cfg.model.frontend
    saw_padding = saw_bos_masked = False
    bert_changes = 0
    for b in batches:
        assert b.inputs.dtype == b.teacher_inputs.dtype == torch.long
        assert b.inputs.shape == b.teacher_inputs.shape == b.mask.shape and b.inputs.shape[1] <= 128
        pad = b.padding_mask if b.padding_mask is not None else torch.zeros_like(b.mask)
        saw_padding |= b.padding_mask is not None
        t = b.teacher_inputs
        assert (t[:, 0] == f.bos_id).all()
        assert ((t == f.pad_id) == pad).all()
        assert (t[pad] == f.pad_id).all() and (b.inputs[pad] == f.pad_id).all()
        assert not (b.mask & pad).any()
        assert b.mask.any(1).all()
        # data2vec_text.py: the loss positions are exactly where the input is <mask>
        assert torch.equal(b.mask, b.inputs == f.mask_id)
        if kind == "span":
            assert torch.equal(b.inputs[~b.mask], t[~b.mask])  # nothing but <mask> replacements
        else:
            changed = (b.inputs != t) & ~b.mask  # BERT's random replacements: not loss positions
            assert (b.inputs[changed] >= 5).all()
            bert_changes += int(changed.sum())
        saw_bos_masked |= bool(b.mask[:, 0].any())
    assert saw_padding
    assert kind == "span" or bert_changes > 0
    # mask_tokens_dataset.py draws span starts over every position, <s> included (p ~ 11/128 per row)
    assert saw_bos_masked


# ------------------------------------------------------------------------------ determinism, resume
@pytest.mark.parametrize("modality", ["vision", "audio"])
def test_resume_is_bit_exact(shards, modality):
    # spe = 10 (2 lanes x 5 per lane); K = 16 steps cross the epoch boundary at 10; N = 7 is odd
    cfg, K = tiny(modality), 16
    full = take(build_loader(cfg, shards[modality], num_samples=40), K)
    for N in (7, 11):
        resumed = take(build_loader(cfg, shards[modality], num_samples=40, start_step=N), K - N)
        assert all(same(a, b) for a, b in zip(full[N:], resumed)), f"resume at {N} differs"


def test_resume_text_single_process(shards):
    cfg, K, N = tiny("text", **{"data.num_workers": 0}), 9, 5  # spe = 10, main-process lane
    full = take(build_loader(cfg, shards["text"], num_samples=40), K)
    resumed = take(build_loader(cfg, shards["text"], num_samples=40, start_step=N), K - N)
    assert all(same(a, b) for a, b in zip(full[N:], resumed))


def test_ranks_seeds_epochs_differ(shards):
    cfg = tiny("vision", **{"data.num_workers": 0})
    spe = steps_per_epoch(40, 4, 2, 0)
    r0 = take(build_loader(cfg, shards["vision"], rank=0, world_size=2, num_samples=40), spe + 1)
    r1 = take(build_loader(cfg, shards["vision"], rank=1, world_size=2, num_samples=40), 1)
    s1 = take(build_loader(apply_overrides(cfg, ["train.seed=1"]), shards["vision"], world_size=2, num_samples=40), 1)
    again = take(build_loader(cfg, shards["vision"], rank=0, world_size=2, num_samples=40), 1)
    assert same(r0[0], again[0])
    assert not torch.equal(r0[0].inputs, r1[0].inputs)
    assert not torch.equal(r0[0].inputs, s1[0].inputs)
    assert not torch.equal(r0[0].inputs, r0[spe].inputs)  # first batch of epoch 1 vs epoch 0
    assert not torch.equal(r0[0].mask, r0[spe].mask)


# ------------------------------------------------------------------------------------------- bad data
def test_corrupt_sample_and_truncated_shard(tmp_path, caplog):
    good = write_shards(str(tmp_path), "vision", [8])[0]
    bad = str(tmp_path / "vision-bad.tar")
    with wds.TarWriter(bad) as tw:
        rng = np.random.default_rng(1)
        for i in range(6):
            tw.write({"__key__": f"b{i}", "png": b"garbage, not a png" if i == 2 else _png(rng)})
    trunc = str(tmp_path / "vision-trunc.tar")
    os.makedirs(tmp_path / "src")
    data = open(write_shards(str(tmp_path / "src"), "vision", [6], seed=2)[0], "rb").read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2 + 100])  # cut inside a member's data
    cfg = tiny("vision", **{"data.num_workers": 0})
    loader = build_loader(cfg, [good, bad, trunc], num_samples=20)
    with caplog.at_level(logging.WARNING, logger="workers.loader"):
        for _ in range(40):
            b = next(loader)
            assert b.inputs.shape == (4, 3, 32, 32)
            if "b2" in caplog.text and loader.stats["shard_errors"]:
                break
    assert loader.stats["corrupt"] >= 1 and loader.stats["shard_errors"] >= 1, loader.stats
    text = caplog.text
    assert "b2" in text and "vision-bad.tar" in text  # names the key and the shard
    assert "vision-trunc.tar" in text or "unreadable shard" in text


def test_undecodable_sample_is_replaced_and_resume_stays_exact(tmp_path):
    # a PNG cut in half passes the header check but fails the full decode: its slot gets a re-augmented
    # copy of another sample of the batch, so batch size and resume positions are unchanged
    rng = np.random.default_rng(3)
    path = str(tmp_path / "vision-000000.tar")
    with wds.TarWriter(path) as tw:
        for i in range(16):
            png = _png(rng)
            tw.write({"__key__": f"k{i}", "png": png[: len(png) // 2] if i % 4 == 1 else png})
    cfg, K, N = tiny("vision"), 8, 3
    loader = build_loader(cfg, [path], num_samples=16)
    full = [next(loader) for _ in range(K)]
    stats = loader.stats
    loader.close()
    assert stats["filled"] >= 1 and stats["corrupt"] == stats["filled"], stats
    assert all(b.inputs.shape == (4, 3, 32, 32) for b in full)
    resumed = take(build_loader(cfg, [path], num_samples=16, start_step=N), K - N)
    assert all(same(a, b) for a, b in zip(full[N:], resumed))


def test_manifest_defines_epoch(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = write_shards(str(tmp_path), "text", [5, 3])
    rows = [os.path.basename(paths[0])] * 5 + [os.path.basename(paths[1])] * 3 + ["text-000009.tar"] * 7
    pq.write_table(pa.table({"key": [str(i) for i in range(15)], "shard": rows}), tmp_path / "manifest.parquet")
    assert count_samples(paths) == 8  # rows of the given shards only
    loader = build_loader(tiny("text"), paths)
    assert loader.steps_per_epoch == steps_per_epoch(8, 4, 1, 2) == 2


def test_no_usable_data_fails_instead_of_hanging(tmp_path):
    path = str(tmp_path / "vision-000000.tar")
    with wds.TarWriter(path) as tw:
        for i in range(3):
            tw.write({"__key__": f"k{i}", "png": b"not an image"})
    loader = build_loader(tiny("vision", **{"data.num_workers": 0}), [path], num_samples=3)
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(loader)


# ---------------------------------------------------------------- fidelity: masks, token budget (issue 9)
def test_audio_masks_are_equalised_across_the_batch(shards):
    """base_librispeech.yaml require_same_masks: compute_mask_indices trims every row to the batch minimum."""
    cfg = tiny("audio", **{"train.batch_size": 6})
    assert cfg.masking.require_same_masks  # inherited from audio_base, as the reference yaml sets it
    for b in take(build_loader(cfg, shards["audio"], num_samples=40), 6):
        assert len(set(b.mask.sum(1).tolist())) == 1
    off = apply_overrides(cfg, ["masking.require_same_masks=false"])
    counts = [b.mask.sum(1) for b in take(build_loader(off, shards["audio"], num_samples=40), 6)]
    assert any(len(set(c.tolist())) > 1 for c in counts)  # without it the rows differ: the knob is live


def test_token_budget_cuts_like_fairseq_batch_by_size():
    """fairseq batch_by_size: a batch is full when (len(batch) + 1) x max(sample_len) would exceed
    max_tokens; hand-worked on costs 100 300 50 320 320 10 10 700 5 with budget 640."""
    from workers.loader import _Cutter

    costs = [100, 300, 50, 320, 320, 10, 10, 700, 5]
    cutter = _Cutter(iter([("u", f"k{i}", b"", c) for i, c in enumerate(costs)]), batch_size=99, max_tokens=640)
    cuts = []
    while batch := cutter.take():
        cuts.append([r[3] for r in batch])
    # [100, 300] + 50 -> 3 x 300 = 900 > 640;  [50, 320] + 320 -> 960;  [320, 10] + 10 -> 960;
    # [10] + 700 -> 1400;  [700] alone (a sample over the budget still forms a batch of one) + 5 -> 1400;  [5]
    assert cuts == [[100, 300], [50, 320], [320, 10], [10], [700], [5]]
    assert cutter.pos == len(costs)


@pytest.mark.parametrize("modality,budget", [("audio", 64_000), ("text", 512)])
def test_token_budget_batches_fit_and_resume_exactly(shards, modality, budget):
    cfg = tiny(modality, **{"train.max_tokens": budget})
    # epoch length from full-length samples: audio 64000 // 32000 = 2, text 512 // 128 = 4 per batch
    K, n = 12, {"audio": 16, "text": 32}[modality]
    full = take(build_loader(cfg, shards[modality], num_samples=n), K)  # spe 8: crosses into epoch 1
    sizes = set()
    for b in full:
        B, T = b.inputs.shape  # audio: clips cropped to the shortest (<= every clip's cost); text: padded
        assert B * T <= budget
        sizes.add(B)
    # audio clips vary (0.3 .. 1.5 s): the budget, not a clip count, sets the batch size
    assert modality == "text" or len(sizes) > 1
    for N in (3, 7):
        resumed = take(build_loader(cfg, shards[modality], num_samples=n, start_step=N), K - N)
        assert all(same(a, b) for a, b in zip(full[N:], resumed)), f"resume at {N} differs"


def test_token_budget_is_validated_against_one_full_sample():
    from model.config import ConfigError

    with pytest.raises(ConfigError, match="train.max_tokens=1000 is below one full-length sample"):
        apply_overrides(audio_tiny(), ["train.max_tokens=1000"])
    with pytest.raises(ConfigError, match="train.max_tokens is for audio and text"):
        apply_overrides(vision_tiny(), ["train.max_tokens=100000"])


def test_text_batch_without_any_span_gets_one_masked_token():
    """mask_tokens_dataset.py has no minimum: short samples can draw no span. The loss needs a masked
    step, so a batch where no row drew one gets exactly one <mask> (the documented deviation)."""
    from workers.loader import _Text

    codec = _Text(text_tiny())
    f = codec.f
    items = [(torch.tensor([f.bos_id, 9, 10, f.eos_id]),) * 2 + (torch.zeros(4, dtype=torch.bool),),
             (torch.tensor([f.bos_id, 11, f.eos_id]),) * 2 + (torch.zeros(3, dtype=torch.bool),)]
    out = codec.collate(items, torch.Generator().manual_seed(0))
    assert int(out["mask"].sum()) == 1 and torch.equal(out["mask"], out["inputs"] == f.mask_id)
    assert not (out["mask"] & out["padding_mask"]).any()
    some = [(items[0][0], items[0][0].masked_fill(torch.tensor([0, 1, 0, 0], dtype=torch.bool), f.mask_id),
             torch.tensor([False, True, False, False])), items[1]]
    assert int(codec.collate(some, torch.Generator().manual_seed(0))["mask"].sum()) == 1  # untouched
