"""MLflow records of an evaluation, and promotion.

One run per scored model in experiment `d2v-eval-<modality>` (tags model.name / model.version /
model.source_run_id / model.uri; params task, data, pooling, ...; metrics accuracy, baseline_accuracy,
raw_accuracy). A registered version also gets the tags
`eval.<task>.{accuracy,baseline_accuracy,raw_accuracy,data_fingerprint,run_id}`.

Promotion (registered versions only): alias `champion` moves to this version iff its accuracy is strictly
greater than the champion's on the same task and data (the champion's `eval.<task>.accuracy` tag where its
`eval.<task>.data_fingerprint` equals ours; a champion without such a result is evaluated now, the same
way, and tagged). No champion yet -> promote. The reason is recorded either way as `eval.<task>.promotion`
on the version and the eval run, and returned.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .. import tracking
from .common import log
from .resolve import ModelRef, version_ref

CHAMPION = "champion"
METRICS = ("accuracy", "baseline_accuracy", "raw_accuracy")


def log_run(ref: ModelRef, result: dict, params: dict) -> str:
    """A finished run in experiment d2v-eval-<modality>, linked to the model by tags; returns its id."""
    from mlflow.entities import Metric, Param, RunTag

    c = tracking.client()
    task = result["task"]
    exp = tracking.experiment_id(f"d2v-eval-{result['modality']}")
    label = f"{ref.name} v{ref.version}" if ref.version else Path(ref.given.rstrip("/")).name
    tags = {"mlflow.runName": f"{task} {label}", "model.uri": ref.given, "eval.task": task,
            "git_commit": tracking.git_commit()}
    if ref.version is not None:
        tags.update({"model.name": ref.name, "model.version": ref.version})
    if ref.source_run_id:
        tags["model.source_run_id"] = ref.source_run_id
    params = {"task": task, "data": result["data"], "pooling": result["pooling"],
              "data_fingerprint": result["data_fingerprint"], "num_train": result["num_train"],
              "num_test": result["num_test"], "num_classes": len(result["classes"]), **params}
    run = c.create_run(exp, run_name=tags["mlflow.runName"], tags=tags)
    ts = int(time.time() * 1000)
    c.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(result[k]), ts, 0) for k in METRICS],
        params=[Param(k, str(v)) for k, v in params.items()],
        tags=[RunTag("eval.classes", ",".join(result["classes"])[:5000])],
    )
    c.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def tag_version(ref: ModelRef, result: dict) -> None:
    """eval.<task>.{accuracy,baseline_accuracy,raw_accuracy,data_fingerprint,run_id} on the version."""
    c = tracking.client()
    values = {k: repr(result[k]) for k in METRICS}
    values.update(data_fingerprint=result["data_fingerprint"], run_id=result["eval_run_id"])
    for key, value in values.items():
        c.set_model_version_tag(ref.name, ref.version, f"eval.{result['task']}.{key}", value)


def promote_version(ref: ModelRef, result: dict, rescore: Callable[[ModelRef], float]) -> tuple[bool, str]:
    """Move alias `champion` to ref's version iff it strictly beats the champion on this task and data.
    `rescore(champion ref)` scores (and records) a champion that has no result on this data yet."""
    c = tracking.client()
    acc = result["accuracy"]
    champ = dict(c.get_registered_model(ref.name).aliases or {}).get(CHAMPION)
    if champ is None:
        promoted, reason = True, f"promoted: no champion yet (v{ref.version} {acc:.4f})"
    elif str(champ) == ref.version:
        promoted, reason = False, f"unchanged: v{ref.version} is already the champion ({acc:.4f})"
    else:
        champ = str(champ)
        champ_acc = champion_accuracy(ref.name, champ, result, rescore)
        promoted = acc > champ_acc
        sign = ">" if promoted else "<="
        reason = f"{'promoted' if promoted else 'not promoted'}: {acc:.4f} {sign} champion v{champ} {champ_acc:.4f}"
    if promoted:
        c.set_registered_model_alias(ref.name, CHAMPION, ref.version)
    key = f"eval.{result['task']}.promotion"
    c.set_model_version_tag(ref.name, ref.version, key, reason)
    c.set_tag(result["eval_run_id"], key, reason)
    log(f"evaluate: {ref.name}: {reason}")
    return promoted, reason


def champion_accuracy(name: str, version: str, result: dict, rescore: Callable[[ModelRef], float]) -> float:
    """The champion's recorded accuracy on this task and data; evaluated (and tagged) now if it has none."""
    mv = tracking.client().get_model_version(name, version)
    tags = dict(mv.tags or {})
    key = f"eval.{result['task']}."
    if tags.get(key + "data_fingerprint") == result["data_fingerprint"] and key + "accuracy" in tags:
        return float(tags[key + "accuracy"])
    log(f"evaluate: champion {name} v{version} has no {result['task']} result on this data; evaluating it now")
    return rescore(version_ref(name, version, mv.run_id))
