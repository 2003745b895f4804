"""Demo speech-recognition data: transcribed demo speech in the LibriSpeech layout, with low-resource label
budgets in the shape of the paper's Libri-light splits and a test set of unseen speakers.

The speech is synthesised exactly as the audio demo corpus (pipelines/demo_audio.py: espeak-ng voices, per
speaker pitch / rate / word gap, per utterance jitter, pauses, level and faint noise), with phrases of 2-6
words from the same vocabulary. The speakers are voices that the pretraining corpus of the same seed does
not use, so a pretrained encoder has heard neither the train nor the test speakers; test speakers are also
disjoint from train speakers (as LibriSpeech's test-clean is from its train sets).

Layout (`d2v demo-data audio-asr OUT`, or `d2v finetune ... --task asr` without --data):

    OUT/train-10min/<spk>/<ch>/<spk>-<ch>-<utt:04d>.flac   + <spk>-<ch>.trans.txt ("<id> UPPER CASE TEXT")
    OUT/train-1h/...                                       a superset of train-10min (Libri-light's 10 min
                                                           fold is part of its 1 h set); files hard-linked
    OUT/test/...                                           unseen speakers, ~10 min
    OUT/DONE.json                                          summary: speakers, seconds and utterances per split

A budget split holds the first utterances, taken round-robin over the train speakers, whose total length
reaches the budget. size="small" (tests): `train-1min` and a ~30 s test set.
Deterministic (same seed -> same bytes, espeak-ng is deterministic), offline, idempotent (`skip_existing`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines import demo_audio
from pipelines.demo import log, read_done, write_text_atomic

FORMAT_VERSION = 1
SPEAKER_ID0 = 1001  # ASR speaker ids start here, apart from the pretraining corpus's 1..N


@dataclass(frozen=True)
class AsrPlan:
    train_speakers: int
    test_speakers: int
    budgets: tuple[tuple[str, float], ...]  # (split name, seconds of speech), ascending
    test_utterances: int  # per test speaker
    mean_utterance_s: float = 2.0  # for sizing the synthesis pool (the real mean is measured)


PLANS = {
    "small": AsrPlan(train_speakers=3, test_speakers=2, budgets=(("train-1min", 60.0),), test_utterances=6),
    "full": AsrPlan(train_speakers=24, test_speakers=8, budgets=(("train-10min", 600.0), ("train-1h", 3600.0)),
                    test_utterances=36),
}


@dataclass(frozen=True)
class Utt:
    speaker: int
    chapter: int
    key: str  # <spk>-<ch>-<utt:04d>
    text: str  # upper case
    job: demo_audio.Job


def build_asr(out: str | Path, *, seed: int = 0, size: str = "full", skip_existing: bool = True) -> dict:
    """Build (or, with skip_existing and a matching DONE.json, keep) the ASR demo splits under `out`."""
    if size not in PLANS:
        raise ValueError(f"demo-data audio-asr: size={size!r} is not one of {sorted(PLANS)}")
    out = Path(out)
    key = {"format": FORMAT_VERSION, "task": "asr", "seed": seed, "size": size}
    done = read_done(out)
    if skip_existing and done is not None and all(done.get(k) == v for k, v in key.items()):
        log(f"demo-data audio-asr: {out / 'DONE.json'} matches (seed={seed}, size={size}); skipping")
        return done
    plan = PLANS[size]
    names = [name for name, _ in plan.budgets] + ["test"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "DONE.json").unlink(missing_ok=True)  # from here on a crash must not look finished
    t0 = time.perf_counter()
    stage = Path(tempfile.mkdtemp(prefix=".building-", dir=out))
    try:
        details = _build(stage, plan, seed)
        for name in names:  # each split is replaced as a whole, never half-written
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    summary = {**key, **details}
    write_text_atomic(out / "DONE.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log(f"demo-data audio-asr: done in {time.perf_counter() - t0:.1f}s -> {out}")
    return summary


def _build(stage: Path, plan: AsrPlan, seed: int) -> dict:
    espeak = demo_audio.find_espeak()
    rng = np.random.default_rng([seed, 7])  # a stream of its own: the pretraining corpus uses [seed, 0]
    speakers = _speakers(plan.train_speakers + plan.test_speakers, seed, rng)
    train_spk, test_spk = speakers[: plan.train_speakers], speakers[plan.train_speakers:]
    budget = plan.budgets[-1][1]
    per_speaker = int(np.ceil(1.3 * budget / plan.mean_utterance_s / len(train_spk)))  # pool with headroom
    pool = _utterances(stage / "pool", train_spk, per_speaker, seed, 1, rng)
    test = _utterances(stage / "test", test_spk, plan.test_utterances, seed, 2, rng)
    seconds = dict(zip([u.key for u in pool + test], demo_audio.synthesise(espeak, [u.job for u in pool + test])))

    order = _round_robin(pool)
    splits: dict[str, list[Utt]] = {}
    for name, limit in plan.budgets:
        chosen, total = [], 0.0
        for u in order:
            if total >= limit:
                break
            chosen.append(u)
            total += seconds[u.key]
        if total < limit:
            raise RuntimeError(f"demo-data audio-asr: the pool holds {total:.0f}s, less than {name}'s {limit:.0f}s; "
                               "raise the pool headroom in pipelines/demo_asr.py")
        splits[name] = chosen
        _place(stage / "pool", stage / name, chosen)
    _write_transcripts(stage / "test", test)
    shutil.rmtree(stage / "pool")
    splits["test"] = test
    return {
        "source": "espeak-ng speech as pipelines/demo_audio.py, voices unused by its pretraining corpus",
        "sample_rate": demo_audio.SAMPLE_RATE,
        "speakers": {"train": [asdict(s) for s in train_spk], "test": [asdict(s) for s in test_spk]},
        "splits": {n: {"utterances": len(us), "seconds": round(sum(seconds[u.key] for u in us), 1),
                       "speakers": len({u.speaker for u in us})} for n, us in splits.items()},
    }


def _speakers(n: int, seed: int, rng: np.random.Generator) -> list[demo_audio.Speaker]:
    """n speakers whose voices the pretraining corpus of this seed does not use (its full size)."""
    full = demo_audio.PLANS["full"].speakers
    taken = {s.voice for s in demo_audio.make_speakers(full, np.random.default_rng([seed, 0]))}
    picked: list[demo_audio.Speaker] = []
    while len(picked) < n:  # draw a few extra and drop voices taken or already picked
        for s in demo_audio.make_speakers(n + len(taken), rng):
            if s.voice not in taken and all(s.voice != p.voice for p in picked) and len(picked) < n:
                picked.append(demo_audio.Speaker(SPEAKER_ID0 + len(picked), s.voice, s.pitch, s.rate, s.gap))
    return picked


def _utterances(root: Path, speakers: list, n: int, seed: int, stream: int, rng: np.random.Generator) -> list[Utt]:
    out: list[Utt] = []
    for spk in speakers:
        ch = 100 * spk.id
        for u in range(n):
            words = rng.choice(demo_audio.VOCAB, int(rng.integers(2, 7))).tolist()
            key = f"{spk.id}-{ch}-{u:04d}"
            job = demo_audio._job(root / str(spk.id) / str(ch) / f"{key}.flac", " ".join(words), spk, rng,
                                  (seed, 10 + stream, len(out)))
            out.append(Utt(spk.id, ch, key, " ".join(words).upper(), job))
    return out


def _round_robin(utts: list[Utt]) -> list[Utt]:
    """Interleave speakers: s1u0, s2u0, ..., s1u1, ... so every budget covers every train speaker."""
    by_spk: dict[int, list[Utt]] = {}
    for u in utts:
        by_spk.setdefault(u.speaker, []).append(u)
    lists = list(by_spk.values())
    return [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]


def _place(pool: Path, dst: Path, utts: list[Utt]) -> None:
    """Hard-link (copy where links are refused) the chosen files into a split and write its transcripts."""
    for u in utts:
        rel = u.job.path.relative_to(pool)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(u.job.path, dst / rel)
        except OSError:
            shutil.copyfile(u.job.path, dst / rel)
    _write_transcripts(dst, utts)


def _write_transcripts(root: Path, utts: list[Utt]) -> None:
    chapters: dict[tuple[int, int], list[Utt]] = {}
    for u in utts:
        chapters.setdefault((u.speaker, u.chapter), []).append(u)
    for (spk, ch), us in chapters.items():
        lines = "".join(f"{u.key} {u.text}\n" for u in sorted(us, key=lambda u: u.key))
        path = root / str(spk) / str(ch) / f"{spk}-{ch}.trans.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(lines, encoding="utf-8")
