"""Shared by tests/test_registry.py, test_serving.py and test_promotion.py: tiny random-init checkpoints logged
into a real MLflow run and registered (no pretraining), test inputs per modality, and `d2v embed` numbers."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import save_checkpoint
from model.config import apply_overrides
from model.data2vec import Data2Vec
from model.encoder import Encoder
from model.presets import get_preset

MODALITIES = ("vision", "audio", "text")
# where `d2v embed`'s states [T, D] start after the front end's prefix: vision puts CLS first (HF's
# last_hidden_state layout); the pooling rule excludes it
PREFIX = {"vision": 1, "audio": 0, "text": 0}
TEXTS = ["the cat sat on the mat.", "data2vec predicts contextualised teacher targets from a masked view",
         "a third, longer sentence: speech, images and text are learned in the same way by one method."]
CORPUS = [f"{t} {i} more words about cats, mats and teachers." for i in range(40) for t in TEXTS]


def make_checkpoint(root: Path, modality: str, seed: int = 0, step: int = 7) -> Path:
    """A tiny-preset checkpoint as training writes it: student, teacher, state, config (+ tokenizer, + a stand-in
    optimizer file), random init with `seed`."""
    from pipelines.tokenizer import train_bpe

    cfg = get_preset(modality, "tiny")
    extra: dict = {"optimizer.pt": b"not for consumers"}
    if modality == "text":
        tok = train_bpe(CORPUS, vocab_size=300)
        cfg = apply_overrides(cfg, [f"model.frontend.vocab_size={tok.get_vocab_size()}"])
        extra["tokenizer.json"] = tok.to_str().encode()
    torch.manual_seed(seed)
    student, teacher = Data2Vec(cfg.model), Encoder(cfg.model)
    return save_checkpoint(root, cfg, student, teacher, state={"step": step}, extra_files=extra)


def log_training_run(client, ckpt: Path, modality: str, run_name: str, fingerprint: str = "fp-test") -> str:
    """A finished MLflow run that holds the checkpoint as `checkpoint/`, tagged the way `d2v pretrain` tags runs."""
    from workers import tracking

    exp = tracking.experiment_id(f"test-registry-{modality}")
    tags = {"d2v.run_name": run_name, "data_fingerprint": fingerprint, "git_commit": "0123456789abcdef"}
    run = client.create_run(exp, run_name=run_name, tags=tags)
    client.log_artifacts(run.info.run_id, str(ckpt), "checkpoint")
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def write_inputs(root: Path, modality: str) -> list[Path]:
    """Files `d2v embed` reads: images of different sizes and formats, 16 kHz float WAVs (two of one length, so
    they share a forward pass), text files."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    if modality == "vision":
        from PIL import Image

        for name, (h, w) in (("a.png", (40, 50)), ("b.jpg", (64, 48)), ("c.png", (32, 32))):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
            paths.append(root / name)
    elif modality == "audio":
        import soundfile as sf

        for name, n in (("a.wav", 4000), ("b.wav", 6400), ("c.wav", 4000)):
            t = np.arange(n) / 16_000
            wave = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t) + 0.05 * rng.standard_normal(n)
            sf.write(root / name, wave.astype(np.float32), 16_000, subtype="FLOAT")  # lossless float samples
            paths.append(root / name)
    else:
        for i, text in enumerate(TEXTS):
            (root / f"t{i}.txt").write_bytes(text.encode("utf-8"))
            paths.append(root / f"t{i}.txt")
    return paths


def consumer_inputs(modality: str, paths: list[Path], json_only: bool = False) -> list:
    """The same inputs as a consumer holds them: a path, bytes (or {"b64"} in JSON), a waveform, a string."""
    if modality == "text":
        return [p.read_text(encoding="utf-8") for p in paths]
    b64 = [{"b64": base64.b64encode(p.read_bytes()).decode("ascii")} for p in paths]
    if modality == "vision":
        return b64 if json_only else [str(paths[0]), paths[1].read_bytes(), b64[2]]
    import soundfile as sf

    waves = [sf.read(str(p), dtype="float32")[0].tolist() for p in (paths[0], paths[2])]
    return [waves[0], b64[1] if json_only else str(paths[1]), waves[1]]


def embed_reference(model: str, paths: list[Path], out: Path) -> list[np.ndarray]:
    """`d2v embed MODEL FILES --out OUT.npz` (the CLI, in-process) -> its states [T, D] per input, in order."""
    from workers.cli import main

    assert main(["embed", model, *map(str, paths), "--out", str(out)]) == 0
    with np.load(out) as z:
        return [z[p.stem] for p in paths]


def pooled(states: list[np.ndarray], modality: str) -> np.ndarray:
    """The linear probe's pooling, written from its definition: mean over positions after the prefix."""
    return np.stack([s[PREFIX[modality] :].mean(0) for s in states])


def png_bytes(n: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (n, n), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def dump(obj, path: Path) -> Path:
    path.write_text(json.dumps(obj))
    return path
