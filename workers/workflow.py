"""`d2v workflow`: demo corpus -> shard -> pretrain (+ register) -> evaluate (+ promote) [-> finetune (+ promote
by the task's metric, `--finetune TASK`)], on Ray.

Each stage runs as a Ray task and is skipped when its recorded outputs exist and its fingerprint (a hash
of its inputs and config) is unchanged; a failed stage re-runs from there on the next call (pretraining
resumes from its last checkpoint: the run name is derived from the stage fingerprint). The state lives
in `<data>.workflow.json` beside the shard directory. MLflow gets one parent run per workflow call and a
child run per stage (status ran/skipped, fingerprint, links to the stage's own runs).

With RAY_ADDRESS the stages run on that cluster (host:port: this process connects; http://: workers/cli.py
submits the whole command as a Ray job). The stages' folders (--input, --data, --labelled, the state file)
are plain paths: on a real cluster they must be on a filesystem every node mounts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import tracking
from .tracking import REPO_ROOT


class WorkflowError(RuntimeError):
    """A stage failed; earlier stages stay recorded, the next call re-runs from the failed one."""


@dataclass
class Plan:
    modality: str
    input: Path | None  # raw corpus; None = the demo corpus (built when missing)
    data: Path  # shard directory
    labelled: Path | None  # labelled split for evaluation; None = the demo corpus's
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    workers: int = 2
    task: str = "linear-probe"
    version: str | None = None  # data2vec version; None = the modality's default (model.presets.DEFAULT_VERSION)
    finetune: str | None = None  # fine-tune stage task ("classify", "asr"); None = no fine-tune stage
    finetune_data: Path | None = None  # its labelled data; None = the task's demo split
    finetune_overrides: list[str] = field(default_factory=list)  # its recipe overrides (`d2v finetune --set`)

    @property
    def resolved_version(self) -> str:
        from model.presets import default_version

        return self.version or default_version(self.modality)

    @property
    def demo_dir(self) -> Path:
        return REPO_ROOT / "data" / f"demo-{self.modality}"

    @property
    def state_file(self) -> Path:
        return self.data.parent / f"{self.data.name}.workflow.json"


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def listing_fingerprint(root: Path) -> str:
    """Sorted (relative path, size, mtime_ns) of every file under root: changes when any input changes."""
    rows = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            rows.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return _hash(sorted(rows))


# ------------------------------------------------------------------------------------------- stages
def stage_demo(plan: Plan) -> dict:
    from pipelines.demo import build_demo

    summary = build_demo(plan.modality, plan.demo_dir, skip_existing=True)
    return {"demo": str(plan.demo_dir), "counts": summary.get("counts")}


def stage_shard(plan: Plan, src: Path) -> dict:
    from pipelines.shard import run_shard

    stats = run_shard(plan.modality, str(src), str(plan.data))
    return {"data": str(plan.data), "samples": stats["samples"], "rejects": stats["rejects"],
            "input_fingerprint": stats["input_fingerprint"]}


def stage_pretrain(plan: Plan, run_name: str) -> dict:
    from .pretrain import pretrain

    out = pretrain(plan.modality, plan.data, preset=plan.preset, version=plan.resolved_version,
                   overrides=plan.overrides, workers=plan.workers, run_name=run_name)
    return {k: out[k] for k in ("run_id", "run_name", "checkpoint", "model", "version", "step") if k in out}


def stage_evaluate(plan: Plan, model: str) -> dict:
    from .evaluate import evaluate

    return evaluate(model, data=plan.labelled, task=plan.task, promote=True)


def stage_finetune(plan: Plan, model: str, run_name: str) -> dict:
    """`d2v finetune MODEL --task T`, then promotion of the fine-tuned version by the task's metric."""
    from .finetune.job import finetune
    from .finetune.register import promote
    from .finetune.tasks import get_task

    out = finetune(model, plan.finetune, data=plan.finetune_data, overrides=plan.finetune_overrides,
                   workers=plan.workers, run_name=run_name)
    task = get_task(plan.finetune)
    name = out["model"].removeprefix("models:/").split("@")[0]
    out["promoted"], out["promotion_reason"] = promote(name, out["version"], task.metric, task.lower_is_better)
    return out


# ------------------------------------------------------------------------------------------- runner
def run_workflow(plan: Plan) -> dict:
    """Run (or skip) every stage in order; returns the recorded state."""
    import ray

    tracking.check_reachable()
    state = json.loads(plan.state_file.read_text()) if plan.state_file.is_file() else {}
    c = tracking.client()
    exp = tracking.experiment_id(f"d2v-workflow-{plan.modality}")
    parent = c.create_run(exp, run_name=f"workflow-{plan.modality}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags={"modality": plan.modality, "git_commit": tracking.git_commit()})
    pid = parent.info.run_id
    started = not ray.is_initialized()
    if started:
        _init_ray()
    try:
        src = plan.input
        if src is None:
            _stage(plan, state, c, exp, pid, "demo", _hash("demo", plan.modality), lambda: stage_demo(plan),
                   valid=lambda out: (plan.demo_dir / "DONE.json").is_file())
            src = plan.demo_dir / "pretrain"
        shard_fp = _hash("shard", plan.modality, str(src), listing_fingerprint(src))
        _stage(plan, state, c, exp, pid, "shard", shard_fp, lambda: stage_shard(plan, src),
               valid=lambda out: (plan.data / "stats.json").is_file())
        # the resolved version: a changed default re-runs pretraining instead of keeping the old model
        cfg_fp = _hash("pretrain", shard_fp, plan.preset, plan.resolved_version, sorted(plan.overrides), plan.workers)
        run_name = f"workflow-{plan.modality}-{cfg_fp[:8]}"
        name = tracking.MODEL_NAME.format(modality=plan.modality)
        pre = _stage(plan, state, c, exp, pid, "pretrain", cfg_fp, lambda: stage_pretrain(plan, run_name),
                     valid=lambda out: _version_exists(name, out["version"]))
        model = f"models:/{name}/{pre['version']}"
        labelled = plan.labelled or plan.demo_dir / "labelled"
        eval_fp = _hash("evaluate", model, plan.task, listing_fingerprint(labelled) if labelled.is_dir() else "")
        _stage(plan, state, c, exp, pid, "evaluate", eval_fp, lambda: stage_evaluate(plan, model))
        if plan.finetune:  # after evaluation: the fine-tuned model of the same encoder version
            ft_data = plan.finetune_data
            ft_fp = _hash("finetune", model, plan.finetune, plan.workers, sorted(plan.finetune_overrides),
                          listing_fingerprint(ft_data) if ft_data and ft_data.is_dir() else "demo")
            ft_name = f"workflow-{plan.modality}-ft-{ft_fp[:8]}"
            _stage(plan, state, c, exp, pid, "finetune", ft_fp, lambda: stage_finetune(plan, model, ft_name),
                   valid=lambda out: _version_exists(out["model"].removeprefix("models:/").split("@")[0],
                                                     out["version"]))
        c.set_terminated(pid, "FINISHED")
    except BaseException:
        c.set_terminated(pid, "FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    return state


def _stage(plan: Plan, state: dict, c, exp: str, parent_id: str, name: str, fp: str, fn: Callable[[], dict],
           valid: Callable[[dict], bool] = lambda out: True) -> dict:
    import ray

    rec = state.get(name)
    child = c.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent_id, "stage": name,
                                                   "fingerprint": fp})
    if rec and rec.get("fingerprint") == fp and rec.get("status") == "done" and valid(rec["outputs"]):
        _say(f"{name}: up to date (fingerprint {fp}), skipped")
        c.set_tag(child.info.run_id, "status", "skipped")
        c.set_terminated(child.info.run_id, "FINISHED")
        return rec["outputs"]
    _say(f"{name}: running (fingerprint {fp})")
    t0 = time.time()
    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(runtime_env={"env_vars": _forwarded_env()})
    try:
        outputs = ray.get(task.remote())
    except Exception as err:
        state[name] = {"fingerprint": fp, "status": "failed", "error": str(err)[:2000]}
        _save(plan, state)
        c.set_tag(child.info.run_id, "status", "failed")
        c.set_terminated(child.info.run_id, "FAILED")
        cause = getattr(err, "cause", None) or err
        raise WorkflowError(f"stage {name!r} failed: {cause}; fix it and rerun `d2v workflow {plan.modality}` "
                            "(finished stages are skipped)") from None
    state[name] = {"fingerprint": fp, "status": "done", "outputs": outputs, "seconds": round(time.time() - t0, 1)}
    _save(plan, state)
    c.log_text(child.info.run_id, json.dumps(outputs, indent=2, default=str), "outputs.json")
    c.set_tag(child.info.run_id, "status", "ran")
    c.set_terminated(child.info.run_id, "FINISHED")
    return outputs


def _version_exists(name: str, version: str) -> bool:
    try:
        tracking.client().get_model_version(name, version)
        return True
    except Exception:
        return False


def _init_ray() -> None:
    """RAY_ADDRESS set: connect to that cluster, shipping this checkout and the storage/tracking variables as
    the other stages do (pipelines/fs.py; inside a job submitted through the http:// Jobs form, which
    workers/cli.py turns this command into, the job has both already). Else: a local instance."""
    import ray

    from pipelines.fs import cluster_runtime_env

    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=cluster_runtime_env(str(REPO_ROOT)))
        _say(f"ray: connected to {address}")
    else:
        ray.init(num_cpus=(os.cpu_count() or 1) + 2, runtime_env={"env_vars": _forwarded_env()})


def _forwarded_env() -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    if not os.environ.get("RAY_ADDRESS"):  # local workers import this checkout; a cluster's get it as working_dir
        env["PYTHONPATH"] = str(REPO_ROOT)
    if "D2V_STORAGE" in os.environ:
        env["D2V_STORAGE"] = os.environ["D2V_STORAGE"]
    return env


def _save(plan: Plan, state: dict) -> None:
    plan.state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    os.replace(tmp, plan.state_file)


def _say(msg: str) -> None:
    print(f"[d2v workflow] {msg}", file=sys.stderr, flush=True)
