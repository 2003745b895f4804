"""MODEL references: `models:/name@alias`, `models:/name/N` and `models:/name/latest` are pinned to a version
number first (`models:/name/N`), so a result is attached to exactly the version that was scored even if the
alias moves meanwhile; `runs:/…` and checkpoint directories pass through."""

from __future__ import annotations

from dataclasses import dataclass

from .. import tracking
from .common import EvaluationError


@dataclass(frozen=True)
class ModelRef:
    given: str  # MODEL as the user wrote it
    uri: str  # what is loaded: models:/name/N when registered (pinned), else `given`
    name: str | None = None  # registered model name, if any
    version: str | None = None  # registered model version, if any
    source_run_id: str | None = None  # the run that produced the checkpoint, if known


def resolve_ref(model: str) -> ModelRef:
    """models:/name@alias | models:/name/N | models:/name/latest -> the pinned version; else as given."""
    if model.startswith("runs:/"):
        run_id = model.removeprefix("runs:/").split("/", 1)[0]
        return ModelRef(model, model, source_run_id=run_id or None)
    if not model.startswith("models:/"):
        return ModelRef(model, model)
    body = model.removeprefix("models:/").strip("/")
    name, alias, number = body, None, None
    if "@" in body:
        name, alias = body.split("@", 1)
    elif "/" in body:
        name, number = body.rsplit("/", 1)
    if not name or not (alias or number):
        raise EvaluationError(f"{model}: expected models:/<name>@<alias> or models:/<name>/<version>")
    c = tracking.client()
    rm = _registered_model(c, name, model)
    if alias is not None:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            have = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise EvaluationError(
                f"{model}: registered model {name!r} has no alias {alias!r} (existing aliases: {have}); "
                f"use one of them or models:/{name}/<version>"
            )
        version = str(aliases[alias])
    else:
        version = _version_number(c, name, number, model)
    mv = c.get_model_version(name, version)
    return ModelRef(model, f"models:/{name}/{version}", name, version, mv.run_id or None)


def version_ref(name: str, version: str, run_id: str | None) -> ModelRef:
    """A registered version already pinned (the champion, when it has to be scored now)."""
    uri = f"models:/{name}/{version}"
    return ModelRef(uri, uri, name, version, run_id or None)


def _registered_model(c, name: str, model: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    names = sorted(m.name for m in c.search_registered_models(max_results=100))
    raise EvaluationError(
        f"{model}: no registered model named {name!r} at {tracking.tracking_uri()} "
        f"(registered: {', '.join(names) or 'none'}); register one with `d2v pretrain` or check MLFLOW_TRACKING_URI"
    )


def _version_number(c, name: str, number: str, model: str) -> str:
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name = '{name}'"))
    if number == "latest" and versions:
        return str(versions[-1])
    if number.isdigit() and int(number) in versions:
        return str(int(number))
    raise EvaluationError(f"{model}: {name!r} has no version {number!r} (versions: {versions or 'none'})")
