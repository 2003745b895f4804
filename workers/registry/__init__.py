"""Model registry: resolve MODEL references, log checkpoints as MLflow Models (pyfunc from code), register them.

- resolve.py       MODEL (dir, runs:/…, models:/…) -> a local checkpoint directory (both registered formats)
- pyfunc_model.py  the models-from-code file: the encoder as an MLflow python_function model
- log.py           log a checkpoint as that MLflow Model (artifacts, code_paths, requirements, input example)
- register.py      create the version (tags, description), alias `candidate`; no duplicate for the same weights

Promotion (alias `champion`) lives with evaluation (workers/evaluate).
"""

from .resolve import ModelNotFound, resolve_model

__all__ = ["ModelNotFound", "resolve_model", "register_checkpoint"]


def register_checkpoint(*args, **kwargs):
    """See register.register_checkpoint (imported on use: it pulls in MLflow)."""
    from .register import register_checkpoint as register

    return register(*args, **kwargs)
