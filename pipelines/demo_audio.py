"""Audio demo corpus: English speech synthesised offline by espeak-ng, in the LibriSpeech layout.

A "speaker" is an espeak-ng voice (accent x voice variant, e.g. `en-gb-scotland+f3`) with its own pitch,
speaking rate and word gap; each utterance jitters rate and pitch a little, adds a random lead/trail
pause, a random level and faint background noise (SNR 25-45 dB). espeak-ng's 22.05 kHz output is
resampled (polyphase) to 16 kHz mono and saved as 16-bit FLAC. espeak-ng is deterministic, so the
same seed gives the same bytes.

Layout:
    pretrain/<spk>/<ch>/<spk>-<ch>-<utt:04d>.flac      phrases of 2-6 words from VOCAB (~1-4 s)
    pretrain/<spk>/<ch>/<spk>-<ch>.trans.txt           "<spk>-<ch>-<utt> TRANSCRIPT" (upper case), sorted
    labelled/{train,test}/<keyword>/<spk>-<n>.flac     single KEYWORDS (Speech Commands style);
                                                       test speakers are disjoint from train speakers
Speaker ids are 1..N; chapter ids are 100 * spk + c.
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipelines.demo import log, split_counts

SAMPLE_RATE = 16_000
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# Speech Commands' 35 words plus a few fillers; pretrain phrases draw from all of these.
VOCAB = KEYWORDS + (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
    "please", "now", "then", "and", "the", "red", "green", "blue", "water", "light",
    "door", "open", "close", "turn", "move", "back", "again", "fast", "slow", "here",
)
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "benjamin", "caleb", "david", "ed", "edward",
    "john", "linda", "max", "Michael", "Mike", "paul", "quincy", "rob", "robert", "steph", "travis", "victor",
)


@dataclass(frozen=True)
class Plan:
    """How much to synthesise for one size."""

    speakers: int  # total speakers (all read pretrain phrases; the labelled split partitions them)
    test_speakers: int  # speakers whose keywords form labelled/test
    chapters: int  # chapters per speaker in pretrain
    utterances: int  # utterances per chapter
    repeats: int  # takes of each keyword per speaker


PLANS = {
    "small": Plan(speakers=4, test_speakers=1, chapters=1, utterances=10, repeats=1),  # 40 + 40 files
    "full": Plan(speakers=50, test_speakers=10, chapters=2, utterances=15, repeats=2),  # 1500 + 1000 files
}


@dataclass(frozen=True)
class Speaker:
    id: int
    voice: str  # espeak-ng "accent+variant"
    pitch: int  # espeak-ng -p, 0..99
    rate: int  # espeak-ng -s, words per minute
    gap: int  # espeak-ng -g, extra pause between words in 10 ms units


@dataclass(frozen=True)
class Job:
    """One utterance: espeak-ng arguments plus the post-processing draws (all decided up front)."""

    path: Path
    text: str
    voice: str
    pitch: int
    rate: int
    gap: int
    lead_s: float  # silence before the speech
    trail_s: float  # silence after
    gain: float  # peak level, 0..1
    snr_db: float  # speech RMS over noise RMS
    noise_seed: tuple[int, ...]


def build(root: Path, *, seed: int, size: str) -> dict:
    espeak = find_espeak()
    plan = PLANS[size]
    rng = np.random.default_rng([seed, 0])
    speakers = make_speakers(plan.speakers, rng)
    test_ids = {s.id for s in speakers[-plan.test_speakers:]}

    pre_jobs, transcripts = _pretrain_jobs(root / "pretrain", speakers, plan, seed, rng)
    lab_jobs = _labelled_jobs(root / "labelled", speakers, test_ids, plan, seed, rng)
    for path, lines in transcripts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")

    durations = synthesise(espeak, pre_jobs + lab_jobs)
    pre_s, lab_s = durations[: len(pre_jobs)], durations[len(pre_jobs):]
    return {
        "source": f"espeak-ng ({_espeak_version(espeak)}), {len(ACCENTS)} accents x {len(VARIANTS)} variants",
        "sample_rate": SAMPLE_RATE,
        "classes": list(KEYWORDS),
        "speakers": [{**asdict(s), "labelled_split": "test" if s.id in test_ids else "train"} for s in speakers],
        "counts": {
            "pretrain": {"utterances": len(pre_jobs), "chapters": len(transcripts), "seconds": round(sum(pre_s), 1)},
            "labelled": split_counts(root / "labelled", "flac"),
            "labelled_seconds": round(sum(lab_s), 1),
        },
    }


def find_espeak() -> str:
    """Path to espeak-ng, after checking every voice in ACCENTS x VARIANTS is installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("demo-data audio: espeak-ng is not installed; run `apt-get install espeak-ng` "
                           "(or `make setup`, which installs it)")
    listed = subprocess.run([exe, "--voices"], capture_output=True, text=True, check=True).stdout
    variants = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    languages = {row.split()[1] for row in listed.splitlines()[1:] if len(row.split()) > 1}
    variant_files = {row.split()[-1].removeprefix("!v/") for row in variants.splitlines()[1:] if row.split()}
    missing = [a for a in ACCENTS if a not in languages] + [v for v in VARIANTS if v not in variant_files]
    if missing:
        raise RuntimeError(f"demo-data audio: espeak-ng at {exe} lacks voices {missing}; install the full "
                           "espeak-ng data (`apt-get install espeak-ng`) or edit ACCENTS/VARIANTS in "
                           "pipelines/demo_audio.py")
    return exe


def make_speakers(n: int, rng: np.random.Generator) -> list[Speaker]:
    """n distinct (accent, variant) voices, each with its own pitch, rate and word gap."""
    voices = [f"{a}+{v}" for a in ACCENTS for v in VARIANTS]
    picked = rng.choice(len(voices), n, replace=False)
    return [
        Speaker(id=k + 1, voice=voices[i], pitch=int(rng.integers(20, 81)), rate=int(rng.integers(130, 201)),
                gap=int(rng.integers(0, 4)))
        for k, i in enumerate(picked)
    ]


def _pretrain_jobs(root: Path, speakers: list[Speaker], plan: Plan, seed: int, rng: np.random.Generator):
    jobs, transcripts = [], {}
    for spk in speakers:
        for c in range(plan.chapters):
            ch = 100 * spk.id + c
            folder, lines = root / str(spk.id) / str(ch), []
            for u in range(plan.utterances):
                words = rng.choice(VOCAB, int(rng.integers(2, 7))).tolist()
                utt_id = f"{spk.id}-{ch}-{u:04d}"
                jobs.append(_job(folder / f"{utt_id}.flac", " ".join(words), spk, rng, (seed, 1, len(jobs))))
                lines.append(f"{utt_id} {' '.join(words).upper()}")
            transcripts[folder / f"{spk.id}-{ch}.trans.txt"] = lines
    return jobs, transcripts


def _labelled_jobs(root: Path, speakers: list[Speaker], test_ids: set[int], plan: Plan, seed: int,
                   rng: np.random.Generator) -> list[Job]:
    jobs = []
    for spk in speakers:
        split = "test" if spk.id in test_ids else "train"
        for word in KEYWORDS:
            for n in range(plan.repeats):
                jobs.append(_job(root / split / word / f"{spk.id}-{n}.flac", word, spk, rng, (seed, 2, len(jobs))))
    return jobs


def _job(path: Path, text: str, spk: Speaker, rng: np.random.Generator, noise_seed: tuple[int, ...]) -> Job:
    return Job(
        path=path, text=text, voice=spk.voice,
        pitch=int(np.clip(spk.pitch + rng.integers(-5, 6), 0, 99)),
        rate=int(round(spk.rate * rng.uniform(0.9, 1.1))), gap=spk.gap,
        lead_s=float(rng.uniform(0.05, 0.3)), trail_s=float(rng.uniform(0.05, 0.2)),
        gain=float(rng.uniform(0.3, 0.9)), snr_db=float(rng.uniform(25, 45)), noise_seed=noise_seed,
    )


def synthesise(espeak: str, jobs: list[Job]) -> list[float]:
    """Run all jobs on a thread pool (espeak-ng is a subprocess; numpy/scipy release the GIL)."""
    workers = max(1, min(os.cpu_count() or 1, 8))
    t0, durations = time.perf_counter(), []
    pool = ThreadPoolExecutor(workers)
    try:
        for i, seconds in enumerate(pool.map(lambda job: _render(espeak, job), jobs), 1):  # map keeps job order
            durations.append(seconds)
            if i % 250 == 0 or i == len(jobs):
                log(f"demo-data audio: {i}/{len(jobs)} utterances ({time.perf_counter() - t0:.0f}s, {workers} workers)")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, don't synthesise the rest first
    return durations


def _render(espeak: str, job: Job) -> float:
    """Synthesise, post-process and write one FLAC; return its length in seconds."""
    import soundfile as sf
    from scipy.signal import resample_poly

    cmd = [espeak, "-v", job.voice, "-p", str(job.pitch), "-s", str(job.rate), "-g", str(job.gap), "--stdout", job.text]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"demo-data audio: `{' '.join(cmd)}` failed ({proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    speech, rate = _parse_wav(proc.stdout, cmd)
    g = math.gcd(SAMPLE_RATE, rate)
    speech = resample_poly(speech, SAMPLE_RATE // g, rate // g)  # (T,) float64 at 16 kHz

    speech *= job.gain / max(np.abs(speech).max(), 1e-9)
    rms = float(np.sqrt(np.mean(speech**2)))
    wave = np.concatenate([np.zeros(int(job.lead_s * SAMPLE_RATE)), speech, np.zeros(int(job.trail_s * SAMPLE_RATE))])
    wave += np.random.default_rng(job.noise_seed).normal(0, rms * 10 ** (-job.snr_db / 20), wave.shape)

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    # The whole tree is staged and renamed by build_demo, so a direct write is never seen half-done.
    job.path.parent.mkdir(parents=True, exist_ok=True)
    job.path.write_bytes(buf.getvalue())
    return len(wave) / SAMPLE_RATE


def _parse_wav(data: bytes, cmd: list[str]) -> tuple[np.ndarray, int]:
    """16-bit mono PCM from espeak-ng --stdout (its RIFF sizes are placeholders: read to the end)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"demo-data audio: `{' '.join(cmd)}` did not write a WAV file")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag == b"fmt ":
            fmt, channels, rate, bits = (int.from_bytes(data[pos + o:pos + o + n], "little")
                                         for o, n in ((8, 2), (10, 2), (12, 4), (22, 2)))
            if (fmt, channels, bits) != (1, 1, 16):
                raise RuntimeError(f"demo-data audio: espeak-ng wrote format={fmt} channels={channels} bits={bits}, "
                                   "expected 16-bit mono PCM")
        elif tag == b"data" and rate is not None:
            pcm = np.frombuffer(data[pos + 8:len(data) - (len(data) - pos - 8) % 2], dtype="<i2")
            if len(pcm) == 0:
                raise RuntimeError(f"demo-data audio: `{' '.join(cmd)}` produced no audio")
            return pcm.astype(np.float64) / 32768, rate
        pos += 8 + size + size % 2
    raise RuntimeError(f"demo-data audio: `{' '.join(cmd)}` wrote a WAV without fmt/data chunks")


def _espeak_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
    return out[3] if len(out) > 3 else "unknown"
