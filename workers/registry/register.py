"""Register a training run's checkpoint as a new version of `data2vec-<modality>` (an MLflow Model) + alias.

Every version carries tags (modality, preset, version v1/v2, step, data_fingerprint, git_commit, run_name,
run_id, weights_sha256) and a description that names its training run. Registering the same weights of the
same run again (e.g. re-running a finished `d2v pretrain` under its run name) returns the existing version
instead of creating a new one.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

from model.checkpoint import MODEL_FILE, load_config, load_state

from .. import tracking
from .log import log_pyfunc

log = logging.getLogger("d2v.registry")

CANDIDATE = "candidate"


def register_checkpoint(run_id: str, artifact_path: str, modality: str, tags: dict[str, str] | None = None, *,
                        local_dir: str | Path | None = None, name: str | None = None) -> tuple[str, str]:
    """New version of `name` (default data2vec-<modality>) from the run's logged checkpoint `artifact_path`
    (read from `local_dir` when the caller has it on disk); alias 'candidate' -> it. -> (name, version)."""
    import mlflow

    c = tracking.client()
    name = name or tracking.MODEL_NAME.format(modality=modality)
    with tempfile.TemporaryDirectory(prefix="d2v-register-") as tmp:
        ckpt = Path(local_dir) if local_dir is not None else Path(
            mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp))
        version_tags = _version_tags(c, run_id, ckpt, tags or {})
        existing = find_version(c, name, run_id, version_tags["weights_sha256"])
        if existing is not None:
            log.warning("%s: run %s is already registered as version %s (same weights); no new version",
                        name, run_id, existing)
            return name, existing
        _ensure_registered_model(c, name, modality)
        info = log_pyfunc(run_id, ckpt, Path(tmp))
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=version_tags,
                                description=describe(name, version_tags), model_id=info.model_id)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    return name, str(mv.version)


def _version_tags(c, run_id: str, ckpt: Path, given: dict[str, str]) -> dict[str, str]:
    """Defaults from the checkpoint and the run's tags; the caller's tags win."""
    cfg = load_config(ckpt)
    state = load_state(ckpt) or {}
    run_tags = c.get_run(run_id).data.tags
    tags = {
        "modality": cfg.model.modality, "preset": cfg.preset, "version": cfg.version,
        "step": str(state.get("step", "")), "data_fingerprint": run_tags.get("data_fingerprint", ""),
        "git_commit": run_tags.get("git_commit") or tracking.git_commit(),
        "run_name": run_tags.get("d2v.run_name") or run_tags.get("mlflow.runName", ""),
        **{k: str(v) for k, v in given.items()},
    }
    tags.update(run_id=run_id, weights_sha256=sha256(ckpt / MODEL_FILE))  # identity: never overridden
    return tags


def describe(name: str, tags: dict[str, str]) -> str:
    return (
        f"data2vec {tags['version']} {tags['modality']} encoder ({tags['preset']}) from training run "
        f"'{tags['run_name']}' (run id {tags['run_id']}) at step {tags['step'] or '?'}; data fingerprint "
        f"{tags['data_fingerprint'] or 'unknown'}, git commit {tags['git_commit']}. An MLflow pyfunc model: "
        f"mlflow.pyfunc.load_model('models:/{name}/<version>').predict([...]) -> (N, D) embeddings."
    )


def find_version(c, name: str, run_id: str, weights_sha256: str) -> str | None:
    """The version of `name` registered from this run with these exact weights, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    same = [mv for mv in versions if (mv.tags or {}).get("weights_sha256") == weights_sha256]
    return str(min(int(mv.version) for mv in same)) if same else None


def _ensure_registered_model(c, name: str, modality: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        c.create_registered_model(name, description=f"data2vec {modality} encoders pretrained by d2v")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
