"""The task registry: `--task NAME` -> the module-level `TASK` object of workers/finetune/<NAME>.py.

Each task module exposes `TASK` (an instance implementing `workers.finetune.Task`). Modules are imported
lazily so that a task's optional dependencies (jiwer for asr) are only needed when it runs."""

from __future__ import annotations

import importlib

from . import FinetuneError, Task

TASK_MODULES = {"classify": "workers.finetune.classify", "asr": "workers.finetune.asr"}


def get_task(name: str) -> Task:
    if name not in TASK_MODULES:
        raise FinetuneError(f"--task {name!r}: expected one of {sorted(TASK_MODULES)}")
    task = importlib.import_module(TASK_MODULES[name]).TASK
    if not isinstance(task, Task):
        raise TypeError(f"{TASK_MODULES[name]}.TASK does not implement workers.finetune.Task")
    return task
