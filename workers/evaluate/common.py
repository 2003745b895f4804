"""What every part of `d2v evaluate` shares: its error type and progress lines on stderr."""

from __future__ import annotations

import sys
import time

PROGRESS_EVERY_S = 5.0


class EvaluationError(ValueError):
    """A model reference, labelled split or promotion request that cannot be evaluated; says what to do."""


def log(msg: str) -> None:
    """Progress on stderr (stdout carries only the CLI's JSON line)."""
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """A line every PROGRESS_EVERY_S seconds while a phase runs, and a closing line if it ran that long."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.t0 = self.last = time.monotonic()

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            log(f"evaluate: {self.what} {self.done}/{self.total} ({rate:.1f}/s){' ' + note if note else ''}")

    def close(self) -> None:
        if self.last != self.t0:
            log(f"evaluate: {self.what} {self.done}/{self.total} done in {time.monotonic() - self.t0:.1f}s")
