"""A fine-tuned d2v model (`d2v finetune`: encoder + task head) as an MLflow `python_function` model, logged
*from code* like the encoders (pyfunc_model.py): loading runs this file, weights come from safetensors and the
head's description from JSON, nothing is unpickled.

    m = mlflow.pyfunc.load_model("models:/data2vec-vision-classify@candidate")
    m.predict(["a.png", open("b.jpg", "rb").read()])
    # -> [{"label": "cat", "probabilities": {"cat": 0.91, "dog": 0.09}}, ...]     one dict per input
    m = mlflow.pyfunc.load_model("models:/data2vec-audio-asr@candidate")
    m.predict(["a.flac", [0.0, 0.01, ...]])                                      # -> ["HELLO WORLD", ...]

Inputs: the encoders' (workers/pyfunc_common.py): vision image path / bytes / {"b64"}; audio path / bytes /
{"b64"} / 16 kHz float waveform; text strings. A bad item fails the whole call, naming every bad index.

Outputs, by the task (the logged model_config {"task": ...}, which picks the class; head_config.json agrees):
    classify  per input {"label": the most probable class, "probabilities": {class: softmax probability}}, the
              classes in the head's order; the same numbers as d2v's own encoder + head (workers/finetune/classify)
    asr       per input the greedy CTC transcript (best path: argmax per frame, repeats collapsed, blanks
              dropped), what `d2v transcribe` prints without --beam
The signature comes from predict's type hints: inputs a list of anything (each item is checked by the decoders),
outputs Array(Object(label: string, probabilities: Map(double))) or Array(string).

Every input runs unpadded (inputs of one shape share a forward pass), so a result does not depend on the other
inputs of the call. Artifacts: weights (model.safetensors, keys `encoder.*`), config (config.yaml), head
(head.safetensors), head_config (head_config.json), tokenizer (tokenizer.json, text). Code: model/ and
workers/{pyfunc_common,preprocess}.py (registry/log.py CODE) -- the heads are model/heads.py's and model/ctc.py's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pydantic
import torch
from mlflow.pyfunc import PythonModel
from torch import nn

from model.checkpoint import load_encoder, load_tensors
from model.config import Config
from model.ctc import CharVocab, CtcHead, greedy_decode
from model.heads import MeanPoolHead, SentenceHead, head_logits
from workers.pyfunc_common import checkpoint_dir, decode_all, same_shape_chunks

# predict() takes list[Any] on purpose (paths, bytes, {"b64"}, waveforms, strings), checked by the decoders
warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
BATCH_SIZE = 32  # inputs of one shape per forward pass


def build_head(cfg: Config, head_config: dict[str, Any]) -> nn.Module:
    """An empty head of the shape head_config.json describes (workers/finetune/{classify,asr}.py head_config):
    classify {"head": "mean" | "sentence", "classes": [...]}, asr {"vocab": {"symbols": [...]}, "dropout": p}.
    Dropout is inert here (eval mode)."""
    dim, task = cfg.model.trunk.dim, head_config.get("task")
    if task == "asr":
        head: nn.Module = CtcHead(dim, len(CharVocab.from_json(head_config["vocab"])))
    elif task == "classify":
        n = len(head_config["classes"])
        head = SentenceHead(dim, n) if head_config.get("head") == "sentence" else \
            MeanPoolHead(dim, n, eps=cfg.model.trunk.ln_eps)
    else:
        raise ValueError(f"head_config.json: task {task!r}; expected 'classify' or 'asr'")
    return head


class Prediction(pydantic.BaseModel):
    """One input's classification (the output schema; predict returns it as a plain dict, JSON as it is)."""

    label: str  # the most probable class
    probabilities: dict[str, float]  # class -> softmax probability, every class of the head


class D2VFinetuned(PythonModel):
    """Encoder + task head of a fine-tuned d2v checkpoint (the task's subclass below says what predict returns)."""

    task = ""
    verb = ""

    def load_context(self, context) -> None:
        arts = context.artifacts
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        ckpt = checkpoint_dir(Path(arts["weights"]), Path(arts["config"]))
        self.cfg, self.encoder = load_encoder(ckpt, which="student", map_location=self.device)  # eval mode
        self.head_config = json.loads(Path(arts["head_config"]).read_text(encoding="utf-8"))
        if self.head_config.get("task") != self.task:
            raise ValueError(f"head_config.json is a {self.head_config.get('task')!r} head; the model was logged "
                             f"as a {self.task!r} model")
        head = build_head(self.cfg, self.head_config)
        head.load_state_dict(load_tensors(arts["head"]))
        self.head = head.to(self.device).eval()
        self.tokenizer = Path(arts["tokenizer"]) if arts.get("tokenizer") else None

    def inputs(self, model_input: Any) -> list[torch.Tensor]:
        return decode_all(model_input, self.cfg, self.tokenizer, self.verb)


class D2VClassifier(D2VFinetuned):
    task, verb = "classify", "classified"

    def predict(self, context, model_input: list[Any], params: dict[str, Any] | None = None) -> list[Prediction]:
        return self.classify(self.inputs(model_input))

    @torch.no_grad()
    def classify(self, xs: list[torch.Tensor]) -> list[dict[str, Any]]:
        classes = [str(c) for c in self.head_config["classes"]]
        out: list[dict[str, Any] | None] = [None] * len(xs)
        for chunk in same_shape_chunks(xs, BATCH_SIZE):
            x = torch.stack([xs[i] for i in chunk]).to(self.device)  # (B, 3, H, W), (B, S) or (B, T)
            # the mean-pool head reads the last block's output before the final norm: per-block outputs
            logits = head_logits(self.head, self.encoder(x, layer_output="block"))  # (B, C)
            probs = torch.softmax(logits.float(), -1).cpu().tolist()
            for j, i in enumerate(chunk):
                best = max(range(len(classes)), key=probs[j].__getitem__)
                out[i] = {"label": classes[best], "probabilities": dict(zip(classes, probs[j]))}
        return out  # type: ignore[return-value]


class D2VRecogniser(D2VFinetuned):
    task, verb = "asr", "transcribed"

    def predict(self, context, model_input: list[Any], params: dict[str, Any] | None = None) -> list[str]:
        return self.transcribe(self.inputs(model_input))

    @torch.no_grad()
    def transcribe(self, xs: list[torch.Tensor]) -> list[str]:
        vocab = CharVocab.from_json(self.head_config["vocab"])
        out: list[str | None] = [None] * len(xs)
        for chunk in same_shape_chunks(xs, BATCH_SIZE):
            x = torch.stack([xs[i] for i in chunk]).to(self.device)  # (B, S) waves of one length
            logits = self.head(self.encoder(x).last)  # (B, T, V), audio has no prefix
            for j, ids in zip(chunk, greedy_decode(logits)):
                out[j] = vocab.decode(ids)
        return out  # type: ignore[return-value]


MODELS = {m.task: m for m in (D2VClassifier, D2VRecogniser)}
mlflow.models.set_model(MODELS[mlflow.models.ModelConfig().get("task")]())
