"""Log a checkpoint as an MLflow Model: pyfunc from code (pyfunc_model.py), its code, weights and requirements.

What the logged model holds (nothing pickled):
    MLmodel, python_env.yaml, requirements.txt          pinned to the versions this process runs
    code/pyfunc_model.py                                 the model class (models from code)
    code/model/, code/pipelines/{decode,tokenizer}.py,   what it imports from d2v (code_paths): pure PyTorch
    code/workers/{pyfunc_common,preprocess}.py           model + `d2v embed`'s preprocessing
    artifacts/model.safetensors, artifacts/config.yaml   the student weights and the resolved config, side by side
    artifacts/tokenizer.json                             text models only
    input_example.json, serving_input_example.json       one example per modality, with params {"output": ...}
No teacher and no optimizer state: those stay in the run's `checkpoint/` artifact, which resume keeps using.
Fine-tuned models (workers/finetune/register.py) are logged the same way from `finetuned_model.py`, with
head.safetensors + head_config.json as extra artifacts, model_config {"task": ...} and no example params.
"""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from model.checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, load_config
from model.config import Config

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
FINETUNED_FILE = Path(__file__).with_name("finetuned_model.py")  # fine-tuned models (finetune/register.py)
# distributions the pyfunc imports (directly or through model/ and preprocess); librosa reads mp3
REQUIREMENTS = ("mlflow", "torch", "numpy", "pillow", "pyyaml", "pydantic", "safetensors", "tokenizers",
                "soundfile", "soxr", "librosa")
# what pyfunc_model.py imports from this repository, as (package, files); None = every .py file of the package
CODE = (("model", None), ("workers", ("__init__.py", "pyfunc_common.py", "preprocess.py")),
        ("pipelines", ("__init__.py", "decode.py", "tokenizer.py")))
EXAMPLE_TEXT = "data2vec learns the same way from speech, images and text."


def pinned_requirements() -> list[str]:
    """`name==version` as installed here. Local version labels (torch's `+cpu`) are dropped: PyPI has no such
    wheels; the consumer's index picks the CPU or CUDA build."""
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")
        except PackageNotFoundError:
            continue  # e.g. librosa is optional
    return out


def stage_code(dst: Path) -> list[str]:
    """Copy the d2v modules pyfunc_model.py imports into dst/<package>/; -> the code_paths to log."""
    import importlib

    paths = []
    for package, files in CODE:
        src = Path(importlib.import_module(package).__file__).parent
        out = dst / package
        out.mkdir(parents=True)
        for f in sorted(src.glob("*.py")) if files is None else [src / f for f in files]:
            shutil.copy2(f, out / f.name)
        paths.append(str(out))
    return paths


def input_example(cfg: Config) -> tuple[list, dict[str, Any]]:
    """A small valid input per modality (JSON-friendly, so it also serves as the REST example) + params."""
    m = cfg.model.modality
    if m == "vision":
        from PIL import Image

        n = cfg.model.frontend.image_size
        ramp = np.linspace(0, 255, n, dtype=np.uint8)
        img = Image.fromarray(np.stack([np.add.outer(ramp, ramp) // 2] * 3, -1).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        items: list = [{"b64": base64.b64encode(buf.getvalue()).decode("ascii")}]
    elif m == "audio":
        t = np.arange(1600) / 16_000  # 0.1 s at 16 kHz
        items = [np.round(0.5 * np.sin(2 * np.pi * 440.0 * t), 4).tolist()]
    else:
        items = [EXAMPLE_TEXT]
    return items, {"output": "pooled"}


@contextlib.contextmanager
def _in_run(run_id: str) -> Iterator[None]:
    """Make run_id the active fluent run (log_model logs into the active run), nested if one is active already."""
    import mlflow

    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        yield


def log_pyfunc(run_id: str, ckpt: Path, tmp: Path, name: str = "encoder", *, python_model: Path = PYFUNC_FILE,
               extra_artifacts: dict[str, str] | None = None, example: Any = None, model_config: dict | None = None):
    """Log checkpoint dir `ckpt` into run `run_id` as a pyfunc MLflow Model; `tmp` is a scratch directory.
    python_model: the models-from-code file (default: the encoder's); extra_artifacts: artifact name -> file of
    ckpt, besides weights / config / tokenizer; example: the input example (default: input_example(cfg));
    model_config: what the models-from-code file reads with mlflow.models.ModelConfig().
    -> mlflow.models.model.ModelInfo (model_uri `models:/<model id>`)."""
    import mlflow

    cfg = load_config(ckpt)
    artifacts = {"weights": str(ckpt / MODEL_FILE), "config": str(ckpt / CONFIG_FILE)}
    if (ckpt / TOKENIZER_FILE).is_file():
        artifacts["tokenizer"] = str(ckpt / TOKENIZER_FILE)
    artifacts.update({k: str(ckpt / f) for k, f in (extra_artifacts or {}).items()})
    code_paths = stage_code(tmp / "pyfunc-code")
    saved_path = list(sys.path)
    try:
        with _in_run(run_id):
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(python_model), artifacts=artifacts, code_paths=code_paths,
                input_example=input_example(cfg) if example is None else example,
                pip_requirements=pinned_requirements(), model_config=model_config,
            )
    finally:  # validating the input example loads the model, which puts its (temporary) code dir first on sys.path
        sys.path[:] = saved_path
