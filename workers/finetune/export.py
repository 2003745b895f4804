"""Fine-tuned checkpoints back into memory, and out to Hugging Face.

`load_finetuned(MODEL)` -> (task, cfg, encoder, head) from a fine-tuned checkpoint directory, `runs:/…` or
`models:/data2vec-<modality>-<task>@alias` (eval mode). `export_finetuned(ckpt, out)` writes the HF model of
its task: classify -> `Data2VecTextForSequenceClassification` (text, RoBERTa head) or
`Data2VecVisionForImageClassification` (vision v1 encoders, mean pooling); asr -> `Data2VecAudioForCTC`
(the asr task's `export_hf`, workers/finetune/asr.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from model.checkpoint import TOKENIZER_FILE, load_encoder, load_tensors
from model.config import Config
from model.encoder import Encoder

from . import HEAD_CONFIG_FILE, HEAD_FILE, FinetuneError, Task
from .tasks import get_task


def is_finetuned(ckpt: Path) -> bool:
    return (Path(ckpt) / HEAD_CONFIG_FILE).is_file() and (Path(ckpt) / HEAD_FILE).is_file()


def load_head(ckpt: Path, cfg: Config) -> tuple[Task, nn.Module, dict]:
    """-> (task, head with its saved weights in eval mode, head_config) of a fine-tuned checkpoint dir."""
    ckpt = Path(ckpt)
    if not is_finetuned(ckpt):
        raise FinetuneError(f"{ckpt}: not a fine-tuned checkpoint (no {HEAD_FILE} + {HEAD_CONFIG_FILE}); "
                            "fine-tune it first with `d2v finetune`")
    head_config = json.loads((ckpt / HEAD_CONFIG_FILE).read_text(encoding="utf-8"))
    task = get_task(head_config.get("task", ""))
    head = task.restore_head(cfg, head_config)
    state = load_tensors(ckpt / HEAD_FILE)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise FinetuneError(f"{ckpt / HEAD_FILE}: does not fit {HEAD_CONFIG_FILE}: {err}") from None
    return task, head.eval(), head_config


def load_finetuned(model: str | Path) -> tuple[Task, Config, Encoder, nn.Module]:
    from ..registry import resolve_model

    ckpt = resolve_model(str(model))
    cfg, enc = load_encoder(ckpt, which="student")
    task, head, _ = load_head(ckpt, cfg)
    return task, cfg, enc, head


def export_finetuned(ckpt: str | Path, out_dir: str | Path) -> Path:
    """A fine-tuned checkpoint directory -> the HF directory of its task's model class."""
    from model.hf_heads import export_hf_classifier

    ckpt = Path(ckpt)
    cfg, enc = load_encoder(ckpt, which="student")
    task, head, head_config = load_head(ckpt, cfg)
    if head_config["task"] == "classify":
        tok = ckpt / TOKENIZER_FILE
        return export_hf_classifier(enc, cfg, head.state_dict(), head_config["head"], head_config["classes"],
                                    out_dir, tokenizer_json=tok if tok.is_file() else None)
    if hasattr(task, "export_hf"):
        return task.export_hf(ckpt, out_dir)
    raise FinetuneError(f"{ckpt}: no Hugging Face export for a {head_config['task']!r} model")
