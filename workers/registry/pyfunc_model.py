"""A registered d2v encoder as an MLflow `python_function` model, logged *from code*.

MLflow records this file's source (it ends in `mlflow.models.set_model(...)`), so loading runs it instead of
unpickling an object. Weights are read from safetensors, the config from YAML: nothing is unpickled.

    m = mlflow.pyfunc.load_model("models:/data2vec-vision@candidate")
    m.predict(["a.png", open("b.jpg", "rb").read()])          # (N, D) float32
    m.predict(["a.png"], params={"output": "states"})          # [(T, D) float32, ...]

Inputs and preprocessing: workers/pyfunc_common.py (shared with the fine-tuned models): per modality a file
path, the encoded bytes or {"b64": ...} (JSON / REST), a 16 kHz waveform (audio), a string (text).

Outputs (`params={"output": ...}`):
    pooled (default)  (N, D): the mean of the final-layer hidden states over the positions after the prefix
                      (vision: patch tokens, CLS excluded; audio: frames; text: tokens incl. <s> </s>) -- the
                      linear probe's pooling (workers/evaluate.py).
    states            per input the final-layer states (T, D), exactly what `d2v embed` writes (vision: CLS first).

Bad inputs: every item is decoded before anything runs; if any fails, one error names each bad item's index and
what is wrong (nothing is computed, so no result is silently missing).

Imports: only model/ (pure PyTorch), workers/pyfunc_common.py and preprocess.py (with
pipelines/{decode,tokenizer}.py for text) and third-party libraries. Those files travel with the model as
`code_paths` (see log.py), so a consumer that has never installed d2v loads it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from model.checkpoint import load_encoder
# BadInput and the decoders are also imported from here (workers/embed_batch.py)
from workers.pyfunc_common import (  # noqa: F401
    DECODERS, BadInput, as_items, checkpoint_dir, decode_all, decode_audio, decode_image, decode_text, file_source,
    same_shape_chunks,
)

# predict() takes list[Any] on purpose (paths, bytes, {"b64"}, waveforms, strings); each item is checked by the
# decoders (pyfunc_common.py), so MLflow's "Any type hint ... doesn't validate the data" warning is noise here.
warnings.filterwarnings("ignore", message=".*Any type hint is inferred as AnyType")
OUTPUTS = ("pooled", "states")
BATCH_SIZE = 32  # inputs of one shape per forward pass


# ------------------------------------------------------------------------------------------------- model
class D2VEncoder(PythonModel):
    """The student encoder of a d2v checkpoint; predict() -> pooled embeddings or per-step states."""

    def load_context(self, context) -> None:
        arts = context.artifacts
        ckpt = checkpoint_dir(Path(arts["weights"]), Path(arts["config"]))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.encoder = load_encoder(ckpt, which="student", map_location=self.device)  # eval mode
        self.tokenizer = Path(arts["tokenizer"]) if arts.get("tokenizer") else None

    def predict(self, context, model_input: list[Any], params: dict[str, Any] | None = None):
        output = (params or {}).get("output", "pooled")
        if output not in OUTPUTS:
            raise MlflowException.invalid_parameter_value(f"params output={output!r}: expected one of {list(OUTPUTS)}")
        states = self.states(decode_all(model_input, self.cfg, self.tokenizer, "embedded"))
        if output == "states":
            return states
        p = self.encoder.prefix_len
        return np.stack([s[p:].mean(0) for s in states])  # (N, D)

    @torch.no_grad()
    def states(self, xs: list[torch.Tensor]) -> list[np.ndarray]:
        """Final-layer states (T, D) per input. Inputs of one shape share a forward pass: no padding, so each
        result equals that input run alone."""
        out: list[np.ndarray | None] = [None] * len(xs)
        for chunk in same_shape_chunks(xs, BATCH_SIZE):
            x = torch.stack([xs[i] for i in chunk]).to(self.device)  # (B, 3, H, W) or (B, S)
            last = self.encoder(x).last.float().cpu().numpy()  # (B, T, D)
            for j, i in enumerate(chunk):
                out[i] = last[j]
        return out  # type: ignore[return-value]


mlflow.models.set_model(D2VEncoder())
