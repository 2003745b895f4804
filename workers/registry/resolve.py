"""Where models live: local checkpoint directories and MLflow (`runs:/…`, `models:/name@alias`, `models:/name/3`).

Two registered formats resolve to the same thing, a directory with `config.yaml` + `model.safetensors`:
- an MLflow Model (pyfunc from code, see `pyfunc_model.py`; fine-tuned `data2vec-<m>-<task>` versions:
  `finetuned_model.py`): the files sit in its `artifacts/` folder, for a fine-tuned model with
  `head.safetensors` + `head_config.json` beside them (a fine-tuned checkpoint directory, workers/finetune);
- an old-format version (registered before pyfunc models): the raw checkpoint directory itself.
"""

from __future__ import annotations

from pathlib import Path

from model.checkpoint import CONFIG_FILE, MODEL_FILE


class ModelNotFound(FileNotFoundError):
    """MODEL names nothing loadable; the message says what was tried."""


def resolve_model(ref: str | Path) -> Path:
    """MODEL reference -> a local checkpoint directory (downloaded from MLflow when needed)."""
    s = str(ref)
    if s.startswith(("runs:/", "models:/")):
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=s))
        except Exception as err:  # mlflow raises several types for "not there"
            raise ModelNotFound(f"{s}: cannot be fetched from MLflow at {mlflow.get_tracking_uri()}: {err}") from None
        return _checkpoint_dir(local, s)
    path = Path(s)
    if not path.exists():
        raise ModelNotFound(f"{s}: no such checkpoint directory (or use runs:/… or models:/name@alias)")
    return _checkpoint_dir(path, s)


def _checkpoint_dir(path: Path, ref: str) -> Path:
    if (path / CONFIG_FILE).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(CONFIG_FILE) if (p.parent / MODEL_FILE).is_file())
    if len(found) == 1:
        return found[0]
    hint = ""
    if (path / "MLmodel").is_file():  # an MLflow Model that is not one of ours (or lost its artifacts)
        hint = (" (it is an MLflow Model, but not a d2v encoder: re-register the training run's checkpoint with "
                "`workers.registry.register_checkpoint(run_id, 'checkpoint', modality)`)")
    raise ModelNotFound(f"{ref}: {path} holds no d2v checkpoint ({CONFIG_FILE} + {MODEL_FILE}){hint}")
