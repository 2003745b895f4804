"""Where models live: local checkpoint directories and MLflow (`runs:/…`, `models:/name@alias`, `models:/name/3`)."""

from __future__ import annotations

from pathlib import Path


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
    if (path / "config.yaml").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("config.yaml") if (p.parent / "model.safetensors").is_file())
    if len(found) == 1:
        return found[0]
    raise ModelNotFound(f"{ref}: {path} holds no d2v checkpoint (config.yaml + model.safetensors)")
