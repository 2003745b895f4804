"""Send a d2v command to a remote Ray cluster as a job: the code travels as a runtime_env working_dir."""

from __future__ import annotations

import os
import shlex
import sys
import time

from .pretrain import _SHIP_EXCLUDES
from .tracking import REPO_ROOT


def submit_job(address: str, argv: list[str]) -> str:
    """Submit `argv` (e.g. ["d2v", "pretrain", ...]) to the Ray Jobs API at `address`; stream its logs."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "D2V_STORAGE") if k in os.environ}
    client = JobSubmissionClient(address)
    entry = "python -m workers.cli " + " ".join(shlex.quote(a) for a in argv[1:])
    job_id = client.submit_job(
        entrypoint=entry,
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": _SHIP_EXCLUDES, "env_vars": env},
    )
    print(f"submitted job {job_id} to {address}: {entry}", file=sys.stderr)
    seen = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    if status != JobStatus.SUCCEEDED:
        raise RuntimeError(f"job {job_id} ended {status}")
    return job_id
