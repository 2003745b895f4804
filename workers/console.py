"""What a `d2v pretrain` driver shows on its console, and where everything else goes.

Console (stderr): rank 0's progress lines (`[d2v rank 0] step 20/100 loss … samples/s … ETA …`, one per
log interval, each once) and the closing summary. Everything else Ray forwards from its processes (the
Train controller's INFO lines, per-rank reports, worker warnings and tracebacks) and the log records of
Ray's own `ray` logger in this process are appended to the run's log file, `<storage>/<run>/driver.log`
(runs/<run>/driver.log by default). `--verbose` leaves Ray's stream untouched: everything on the console.

Ray offers no public hook for the lines it forwards to the driver; we swap its `ray_print_logs` handler on
the dispatcher it uses for them (`ray._private.ray_logging`). If a Ray version moves that, the console
simply falls back to Ray's full stream (the run itself is unaffected).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import time
from pathlib import Path

PROGRESS_MARK = "[d2v rank 0]"  # what worker_entry prefixes rank 0's progress lines with
_RAY_HANDLER = "ray_print_logs"  # the name ray.init gives its console handler for forwarded lines
_QUIET_LOGGERS = ("ray", "mlflow")  # this process's loggers whose INFO/WARNING records go to the log file


class RunConsole:
    """`with RunConsole(log_path, verbose): ...` around ray.init + fit; call `attach()` right after ray.init."""

    def __init__(self, log_path: Path, verbose: bool = False, command: str = "pretrain"):
        self.path, self.verbose, self.command = Path(log_path), verbose, command  # command: the line prefix
        self.file = None
        self._recent: collections.deque[str] = collections.deque(maxlen=64)
        self._saved_levels: list[tuple[logging.Handler, int]] = []
        self._file_handler: logging.Handler | None = None
        self._dispatcher, self._ray_handlers = None, []

    def __enter__(self) -> RunConsole:
        if self.verbose:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", buffering=1, encoding="utf-8")  # line-buffered: readable while running
        self._file_handler = logging.StreamHandler(self.file)
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        # Ray's and MLflow's (registration at the end) own console handlers: only errors stay on the console
        for name in _QUIET_LOGGERS:
            logger = logging.getLogger(name)
            for h in logger.handlers:
                self._saved_levels.append((h, h.level))
                h.setLevel(logging.ERROR)
            logger.addHandler(self._file_handler)
        logging.captureWarnings(True)  # library warnings (MLflow's type-hint notes...) to the log as well
        logging.getLogger("py.warnings").addHandler(self._file_handler)
        self._bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        return self

    def attach(self) -> None:
        """Take over the lines Ray forwards from workers and actors (after ray.init added its handler)."""
        if self.verbose or self.file is None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # moved in another Ray version: keep Ray's stream as it is
            return
        ray_handlers = [h for name, h in dispatcher.handlers if name == _RAY_HANDLER]
        if not ray_handlers:  # log_to_driver off, or not the driver: nothing to take over
            return
        dispatcher.remove_handler(_RAY_HANDLER)
        dispatcher.add_handler("d2v_console", self.on_lines)
        self._dispatcher, self._ray_handlers = dispatcher, ray_handlers

    def on_lines(self, data: dict) -> None:
        """One batch of forwarded lines: all to the log file, rank 0's progress lines (once) to the console."""
        who = data.get("actor_name") or data.get("task_name") or "worker"
        now = time.strftime("%H:%M:%S")
        for line in data.get("lines", []):
            self.file.write(f"{now} ({who} pid={data.get('pid')}) {line}\n")
            i = line.find(PROGRESS_MARK)
            if i < 0:
                continue
            text = line[i + len(PROGRESS_MARK):].strip()
            if text not in self._recent:  # Train's print patch can deliver a line on stdout and stderr
                self._recent.append(text)
                print(f"d2v {self.command}: {text}", file=sys.stderr, flush=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        if self._dispatcher is not None:  # Ray's handler back, for whatever this process does next
            self._dispatcher.remove_handler("d2v_console")
            for h in self._ray_handlers:
                self._dispatcher.add_handler(_RAY_HANDLER, h)
        for h, level in self._saved_levels:
            h.setLevel(level)
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).removeHandler(self._file_handler)
        logging.getLogger("py.warnings").removeHandler(self._file_handler)
        logging.captureWarnings(False)
        if self._bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = self._bar
        self.file.close()
        if exc_type is not None:
            print(f"d2v {self.command}: Ray's log of this run: {self.path}", file=sys.stderr, flush=True)
