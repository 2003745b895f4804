"""`d2v transcribe MODEL AUDIO... [--beam N]`: a CTC fine-tuned model's transcripts (greedy, or beam search),
one line per file; and the Hugging Face export of such a model (`Data2VecAudioForCTC` + Wav2Vec2Processor).

MODEL is a fine-tuned checkpoint directory (workers/finetune/__init__ layout: encoder `model.safetensors`,
`head.safetensors`, `head_config.json` with task "asr"), `runs:/…` or `models:/data2vec-audio-asr@candidate`
(resolved through the registry, workers/registry/resolve.py). Each file is transcribed on its own (no
padding), so a transcript does not depend on which other files were given.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.checkpoint import load_encoder, load_tensors
from model.config import Config
from model.ctc import hf_processor_files
from model.encoder import Encoder

from . import HEAD_CONFIG_FILE, HEAD_FILE, FinetuneError
from .asr import TASK, AsrHead, Utterance, collate, load_waves, transcribe


def load_asr(ckpt: str | Path) -> tuple[Config, Encoder, AsrHead]:
    """A fine-tuned ASR checkpoint directory -> (cfg, encoder, head), in eval mode."""
    ckpt = Path(ckpt)
    hc_path = ckpt / HEAD_CONFIG_FILE
    if not hc_path.is_file():
        raise FinetuneError(f"{ckpt}: no {HEAD_CONFIG_FILE}; this is not a fine-tuned model (fine-tune one with "
                            "`d2v finetune MODEL --task asr`)")
    hc = json.loads(hc_path.read_text(encoding="utf-8"))
    if hc.get("task") != TASK.name:
        raise FinetuneError(f"{hc_path}: a {hc.get('task')!r} model, not a speech recogniser (task 'asr')")
    cfg, enc = load_encoder(ckpt)
    head = TASK.restore_head(cfg, hc)
    try:
        head.load_state_dict(load_tensors(ckpt / HEAD_FILE))
    except RuntimeError as err:
        raise FinetuneError(f"{ckpt / HEAD_FILE}: does not fit {HEAD_CONFIG_FILE}: {err}") from None
    return cfg, enc, head.eval()


def transcribe_files(ckpt: str | Path, files: list[Path], beam: int = 0) -> list[str]:
    """Each file's transcript: greedy, or CTC beam search of width `beam` (workers/finetune/decode.py)."""
    cfg, enc, head = load_asr(ckpt)
    utts = load_waves([Utterance(Path(f).stem, Path(f), "", "") for f in files], cfg)
    out = []
    for u in utts:
        batch = collate([u])
        batch["keys"] = None  # no feature cache outside fine-tuning
        out.append(transcribe(enc, head, batch, beam)[0])
    return out


def export_asr_hf(ckpt: str | Path, out_dir: str | Path) -> Path:
    """A fine-tuned ASR checkpoint -> a HF Data2VecAudioForCTC + Wav2Vec2Processor directory."""
    from model.hf_heads import export_hf_ctc

    cfg, enc, head = load_asr(ckpt)
    files = hf_processor_files(head.vocab, cfg.data.normalize)
    state = {k: v for k, v in head.state_dict().items()}
    return export_hf_ctc(enc, cfg, state, out_dir, files, final_dropout=head.dropout.p)


def main_transcribe(model: str, audio: list[str], beam: int = 0) -> list[tuple[str, str]]:
    """The CLI: resolve MODEL, transcribe each file -> [(file, transcript)]."""
    from ..registry import resolve_model

    missing = [a for a in audio if not Path(a).is_file()]
    if missing:
        raise FinetuneError(f"{missing[0]}: no such audio file")
    if beam < 0:
        raise FinetuneError(f"--beam {beam}: a beam size is >= 1 (or 0 for greedy decoding)")
    with torch.inference_mode():
        texts = transcribe_files(resolve_model(model), [Path(a) for a in audio], beam)
    return list(zip(audio, texts))
