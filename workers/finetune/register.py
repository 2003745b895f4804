"""Record and register a finished fine-tune.

- the run (experiment `d2v-finetune-<modality>`): metrics `test_<m>` (and `baseline_<m>` with --baseline),
  a curves PNG, and the fine-tuned model logged as MLflow Model `finetuned` (below);
- a new version of `data2vec-<modality>-<task>` that is an MLflow pyfunc Model logged from code
  (workers/registry/finetuned_model.py: `mlflow.pyfunc.load_model(...).predict([...])` -> labels and
  probabilities, or transcripts; `mlflow models serve` serves it): code, pinned requirements, a signature and an
  input example, and the checkpoint's files as its artifacts -- model.safetensors, config.yaml,
  head.safetensors, head_config.json (+ tokenizer.json), no optimizer state -- so `models:/…` also resolves
  to a fine-tuned checkpoint directory (workers/registry/resolve.py) for `d2v transcribe` / `d2v export`.
  Alias `candidate`, tags: task, metric, the test metrics, `parent.name` / `parent.version` / `parent.uri`
  (the encoder it started from), run id, data fingerprint, weights sha256 (the same weights of the same run
  are not registered twice: nothing is logged, the alias moves back to that version);
- the parent encoder's version (when MODEL was a registered one) gets `finetune.<task>.<metric>` (and
  `finetune.<task>.baseline_<metric>`, `finetune.<task>.model` = `<name>/<version>`).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from model.checkpoint import MODEL_FILE, load_config

from .. import tracking
from ..registry.register import CANDIDATE, find_version, sha256
from . import HEAD_CONFIG_FILE, HEAD_FILE, FinetuneError

ARTIFACT = "finetuned"  # the logged MLflow Model's name in the run
# pyfunc artifact name -> checkpoint file, besides weights / config / tokenizer (registry/log.py); optimizer.pt
# and state.json (resume only) stay in the run's Ray storage
HEAD_ARTIFACTS = {"head": HEAD_FILE, "head_config": HEAD_CONFIG_FILE}


def model_name(modality: str, task: str) -> str:
    return f"data2vec-{modality}-{task}"


def _check(result, run_name: str, run_id: str) -> dict:
    c = tracking.client()
    if result.error is not None or result.checkpoint is None:
        c.set_terminated(run_id, status="FAILED")
        raise FinetuneError(f"fine-tuning run {run_name!r} failed: {result.error or 'no checkpoint'}")
    return dict(result.metrics or {})


def finish(p, results: dict, runs: dict[str, str], run_name: str) -> dict:
    """Log, register, tag the parent; -> the CLI's result dict (test metrics, baseline_ ones, where it went)."""
    c = tracking.client()
    task, modality = p.task, p.cfg.model.modality
    metrics = {k.removeprefix("test_"): v for k, v in _check(results["model"], run_name, runs["model"]).items()
               if k.startswith("test_")}
    if task.metric not in metrics:
        raise FinetuneError(f"run {run_name!r}: the task reported no {task.metric!r} ({sorted(metrics)})")
    out: dict = dict(metrics)
    if "baseline" in results:
        base = {k.removeprefix("test_"): v for k, v in _check(results["baseline"], run_name, runs["baseline"]).items()
                if k.startswith("test_")}
        out.update({f"baseline_{k}": v for k, v in base.items()})
        c.set_terminated(runs["baseline"], status="FINISHED")
        c.log_batch(runs["model"], metrics=_metrics({f"baseline_{k}": v for k, v in base.items()}))
    run_id = runs["model"]
    with results["model"].checkpoint.as_directory() as d:
        d = Path(d)
        tracking.log_curves(c, run_id, d, _draw_curves)
        name, version = register(c, run_id, d, p, metrics, run_name)
    c.log_batch(run_id, metrics=_metrics({f"test_{k}": v for k, v in metrics.items()}))
    if p.ref.version is not None:
        for key, value in out.items():
            c.set_model_version_tag(p.ref.name, p.ref.version, f"finetune.{task.name}.{key}", repr(value))
        c.set_model_version_tag(p.ref.name, p.ref.version, f"finetune.{task.name}.model", f"{name}/{version}")
    c.set_terminated(run_id, status="FINISHED")
    return {**out, "task": task.name, "metric": task.metric, "model": f"models:/{name}@{CANDIDATE}",
            "version": version, "parent": p.ref.given, "parent_version": p.ref.version, "run_name": run_name,
            "run_id": run_id, "checkpoint": results["model"].checkpoint.path, "data": str(p.data),
            "num_train": len(p.train), "num_test": len(p.test)}


def _metrics(values: dict):
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items()]


def log_finetuned(run_id: str, ckpt: Path, tmp: Path):
    """Log fine-tuned checkpoint dir `ckpt` into run `run_id` as a pyfunc MLflow Model (finetuned_model.py)
    -> mlflow.models.model.ModelInfo."""
    from ..registry.log import FINETUNED_FILE, input_example, log_pyfunc

    example = input_example(load_config(ckpt))[0]  # the encoders' example items; this model takes no params
    task = json.loads((ckpt / HEAD_CONFIG_FILE).read_text(encoding="utf-8"))["task"]
    return log_pyfunc(run_id, ckpt, tmp, ARTIFACT, python_model=FINETUNED_FILE, extra_artifacts=HEAD_ARTIFACTS,
                      example=example, model_config={"task": task})


def register(c, run_id: str, ckpt: Path, p, metrics: dict, run_name: str) -> tuple[str, str]:
    """Log the fine-tuned checkpoint as an MLflow Model and register it (alias candidate) -> (name, version).
    `p`: the job's Prepared (task, cfg, ref, data, fingerprint)."""
    from mlflow.exceptions import MlflowException

    modality, task = p.cfg.model.modality, p.task
    name = model_name(modality, task.name)
    weights = sha256(ckpt / MODEL_FILE)[:32] + sha256(ckpt / HEAD_FILE)[:32]
    existing = find_version(c, name, run_id, weights)
    if existing is not None:
        c.set_registered_model_alias(name, CANDIDATE, existing)
        return name, existing
    try:
        c.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        c.create_registered_model(name, description=f"data2vec {modality} encoders fine-tuned by `d2v finetune "
                                                     f"--task {task.name}` (MLflow pyfunc models: encoder + head)")
    head = json.loads((ckpt / HEAD_CONFIG_FILE).read_text(encoding="utf-8"))
    tags = {"task": task.name, "metric": task.metric, "lower_is_better": str(task.lower_is_better),
            "modality": modality, "preset": p.cfg.preset, "version": p.cfg.version, "run_id": run_id,
            "run_name": run_name, "data": str(p.data), "data_fingerprint": p.fingerprint,
            "git_commit": tracking.git_commit(), "weights_sha256": weights, "parent.uri": p.ref.given,
            "head": json.dumps(head)[:5000], **{f"test.{k}": repr(v) for k, v in metrics.items()}}
    if p.ref.version is not None:
        tags.update({"parent.name": p.ref.name, "parent.version": p.ref.version})
    output = "the greedy transcript per input" if task.name == "asr" else "per input {label, probabilities}"
    desc = (f"{modality} encoder fine-tuned for {task.name} from {p.ref.given} (run '{run_name}', id {run_id}); "
            f"test {task.metric} {metrics[task.metric]:.4f}. An MLflow pyfunc model: mlflow.pyfunc.load_model("
            f"'models:/{name}/<version>').predict([...]) -> {output}. d2v: workers.registry.resolve_model(uri) "
            f"-> its checkpoint directory; `d2v export --format hf` for Hugging Face.")
    with tempfile.TemporaryDirectory(prefix="d2v-ft-register-") as tmp:
        info = log_finetuned(run_id, ckpt, Path(tmp))
    mv = c.create_model_version(name, source=info.model_uri, run_id=run_id, tags=tags, description=desc,
                                model_id=info.model_id)
    c.set_registered_model_alias(name, CANDIDATE, mv.version)
    return name, str(mv.version)


def _draw_curves(plt, history: list[dict]):
    """Training loss per epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history])
    ax.set(title="fine-tuning loss", xlabel="epoch", ylabel="train loss")
    fig.tight_layout()
    return fig


def promote(name: str, version: str, metric: str, lower_is_better: bool) -> tuple[bool, str]:
    """Move alias `champion` of a fine-tuned model to `version` iff its test metric beats the champion's on
    the same data (tags `test.<metric>`, `data_fingerprint`; lower is better for WER/CER). No champion yet ->
    promote; a champion tested on other data is not comparable -> not promoted (the reason says so).
    The reason is recorded as tag `finetune.promotion` on the version and returned."""
    from ..evaluate.record import CHAMPION

    c = tracking.client()
    tags = dict(c.get_model_version(name, version).tags or {})
    value = float(tags[f"test.{metric}"])
    champ = dict(c.get_registered_model(name).aliases or {}).get(CHAMPION)
    if champ is None:
        promoted, reason = True, f"promoted: no champion yet (v{version} {metric} {value:.4f})"
    elif str(champ) == str(version):
        promoted, reason = False, f"unchanged: v{version} is already the champion ({metric} {value:.4f})"
    else:
        ctags = dict(c.get_model_version(name, str(champ)).tags or {})
        if ctags.get("data_fingerprint") != tags.get("data_fingerprint") or f"test.{metric}" not in ctags:
            promoted, reason = False, (f"not promoted: champion v{champ} was tested on other data, so {metric} "
                                       "values are not comparable; move the alias by hand if intended")
        else:
            other = float(ctags[f"test.{metric}"])
            promoted = value < other if lower_is_better else value > other
            sign = ("<" if lower_is_better else ">") if promoted else (">=" if lower_is_better else "<=")
            reason = (f"{'promoted' if promoted else 'not promoted'}: {metric} {value:.4f} {sign} champion v{champ} "
                      f"{other:.4f} ({'lower' if lower_is_better else 'higher'} is better)")
    if promoted:
        c.set_registered_model_alias(name, CHAMPION, version)
    c.set_model_version_tag(name, version, "finetune.promotion", reason)
    return promoted, reason
