"""Resuming a run under its name: which config changes may happen on resume, and which refuse.

A resumed run continues the same trajectory (weights, optimiser moments, data position), so anything that
changes the model, the objective, the data stream or the batch would silently mix two experiments in one
run. Only the fields below may differ; they change how long the run goes and how it reports, not what one
update computes. (train.max_steps also stretches the LR schedule from the resume point on, which is what
asking for a longer run means.) No ray / mlflow here: the driver and the training loop both call it.
"""

from __future__ import annotations

from typing import Any

from model.config import Config, ConfigError

# Fields that may change when a run resumes; everything else in the Config must match.
SAFE_FIELDS = (
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.max_failures",
    "train.collapse_min_target_var", "train.collapse_min_pred_var", "train.collapse_after",
)
_UNSET = "(unset)"


class ResumeConflict(ConfigError):
    """The run being resumed was started with values that the new invocation changes unsafely."""


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] for every field that differs, sorted by field.

    A field present on one side only (a masking kind switched, so its fields differ) shows as "(unset)".
    """
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    pairs = ((k, a.get(k, _UNSET), b.get(k, _UNSET)) for k in sorted(a.keys() | b.keys()))
    return [(k, o, n) for k, o, n in pairs if o != n]


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    """'train.max_steps: 16 -> 20; ...' (or '' for no change)."""
    return "; ".join(f"{k}: {o} -> {n}" for k, o, n in changes)


def check_resume(
    what: str, old: Config, new: Config, extra: list[tuple[str, Any, Any]] = ()
) -> list[tuple[str, Any, Any]]:
    """The safe changes between the run's config and the new one; raises ResumeConflict naming the rest.

    what: names the resumed thing in the message ("run 'NAME'", "checkpoint DIR").
    extra: (name, old, new) of run settings outside the Config that must not change (e.g. --workers, the
    data fingerprint); they are refused when old != new.
    """
    changes = config_changes(old, new)
    unsafe = [c for c in changes if c[0] not in SAFE_FIELDS] + [c for c in extra if c[1] != c[2]]
    if unsafe:
        raise ResumeConflict(
            f"{what} was started with other values; resuming it would mix two experiments. "
            f"Changed: {describe(unsafe)}. Resume with the run's values, or start a new run (another "
            f"--run-name). Fields that may change on resume: {', '.join(SAFE_FIELDS)}."
        )
    return [c for c in changes if c[0] in SAFE_FIELDS]
