"""RAY_ADDRESS in its two forms, for every stage that runs on Ray (shard, pretrain, workflow, embed --data):

- `host:6379` / `ray://host:10001` (the cluster itself): the command runs here as the Ray driver and
  connects (code shipped as runtime_env working_dir);
- `http://host:8265` (the Ray Jobs API of the head's dashboard): the same command line is submitted as a
  job (`python -m workers.cli ...` on the head), its log streamed here, its exit status returned.

The job gets the submitting shell's storage and tracking variables (pipelines/fs.py: CLUSTER_ENV), and
its local path arguments made absolute: a path means the same file on the cluster only where the
filesystem is shared; object-store URIs (s3://, gs://) mean the same thing everywhere.
"""

from __future__ import annotations

import os
import shlex
import sys
import time

from pipelines.fs import SHIP_EXCLUDES, cluster_env

from .storage import is_uri
from .tracking import REPO_ROOT

PATH_OPTIONS = ("--input", "--output", "--data", "--storage", "--labelled", "--out", "--tokenizer")


class JobFailed(RuntimeError):
    """The submitted job ended FAILED or STOPPED (its log has been streamed above); `exit_code`: its driver's."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


def jobs_address() -> str | None:
    """RAY_ADDRESS when it is the Jobs API form (http[s]://...), else None."""
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else None


def job_argv(argv: list[str]) -> list[str]:
    """`argv` with the values of PATH_OPTIONS made absolute when they are local paths."""
    out, it = [], iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in PATH_OPTIONS and eq:
            out.append(f"{name}={_absolute(value)}")
        elif arg in PATH_OPTIONS:
            out += [arg, _absolute(next(it, ""))]
        else:
            out.append(arg)
    return out


def _absolute(value: str) -> str:
    return value if not value or is_uri(value) else os.path.abspath(os.path.expanduser(value))


def submit_job(address: str, argv: list[str], poll_s: float = 1.0, agent_wait_s: float = 60.0) -> str:
    """Submit `d2v ARGV` to the Ray Jobs API at `address`, stream its log to stdout until it ends (a job agent
    not up yet is waited for, up to agent_wait_s).

    Returns the job id; raises JobFailed unless the job SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    entry = "python -m workers.cli " + " ".join(shlex.quote(a) for a in job_argv(argv))
    runtime_env = {"working_dir": str(REPO_ROOT), "excludes": list(SHIP_EXCLUDES), "env_vars": cluster_env()}
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            job_id = client.submit_job(entrypoint=entry, runtime_env=runtime_env)
            break
        except RuntimeError as err:  # a head that just started has a dashboard before its job agent
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)
    print(f"d2v: submitted job {job_id} to {address}: {entry}", file=sys.stderr, flush=True)
    seen = 0
    while True:
        status = client.get_job_status(job_id)  # before the logs: a finished job's log is then complete
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[seen:])
        sys.stdout.flush()
        seen = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(poll_s)
    if status != JobStatus.SUCCEEDED:
        info = client.get_job_info(job_id)
        code = getattr(info, "driver_exit_code", None)  # the d2v command's own exit status (2 bad input, 3 stop)
        raise JobFailed(f"job {job_id} on {address} ended {status}: {info.message or 'see its log above'} "
                        f"(`ray job logs {job_id} --address {address}`)", code)
    return job_id
