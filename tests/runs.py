"""Helpers for tests that drive `d2v` runs as separate processes and watch them from outside: what Ray Train
has registered, which worker processes a run has, a process's stderr read while it runs, and polling with a
deadline (tests/test_failures.py, test_multinode.py, test_s3.py)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path


def registered(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (its controller's snapshot), oldest first."""
    try:
        text = (run_dir / "checkpoint_manager_snapshot.json").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"step_\d{8}(?:\.\d+)?", text)))


def wait_for(cond, what: str, timeout: float = 240):
    """Poll `cond` every 0.1 s until it returns something truthy (returned); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return got


def worker_pids(run_dir: Path) -> set[int]:
    """Train worker processes of a run, from the pids its driver.log gives each forwarded worker line."""
    try:
        return {int(p) for p in re.findall(r"pid=(\d+)\) \[d2v rank \d+\]", (run_dir / "driver.log").read_text())}
    except OSError:
        return set()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Lines:
    """Collect a process's stderr lines in a thread, so the test can wait for one while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.t = threading.Thread(target=lambda: self.lines.extend(iter(proc.stderr.readline, "")), daemon=True)
        self.t.start()

    def has(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def text(self) -> str:
        self.t.join(timeout=30)
        return "".join(self.lines)
