"""workers/console.py through Ray's own line dispatcher (no cluster): what reaches the console, the log file,
and that Ray's handler and logger levels are back afterwards. The end-to-end check of a real `d2v pretrain`
console is in tests/test_pretrain.py (the run on a `ray start --head` cluster)."""

from __future__ import annotations

import logging

from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

from workers.console import RunConsole


def _batch(lines, is_err=False, actor="RayTrainWorker"):
    return {"lines": lines, "pid": 123, "ip": "127.0.0.1", "is_err": is_err, "actor_name": actor, "task_name": None}


def test_progress_once_on_console_rest_in_log_and_ray_restored(tmp_path, capsys):
    seen = []
    dispatcher.add_handler("ray_print_logs", seen.append)  # what ray.init installs on a driver
    ray_logger = logging.getLogger("ray")
    console_handler = logging.StreamHandler()
    ray_logger.addHandler(console_handler)
    try:
        with RunConsole(tmp_path / "run" / "driver.log") as console:
            console.attach()
            dispatcher.emit(_batch(["[d2v rank 0] step 2/10 loss 0.5", "TrainingReport(metrics={...})"]))
            dispatcher.emit(_batch(["[d2v rank 0] step 2/10 loss 0.5"], is_err=True))  # Train's print patch: twice
            dispatcher.emit(_batch(["[d2v rank 1] step 2/10 loss 0.5", "Requesting resources"], actor="TrainController"))
            ray_logger.warning("internal chatter")
        dispatcher.emit(_batch(["after the run"]))
    finally:
        dispatcher.remove_handler("ray_print_logs")
        ray_logger.removeHandler(console_handler)
    err = capsys.readouterr().err
    assert err.splitlines() == ["d2v pretrain: step 2/10 loss 0.5"]  # once; rank 1, reprs, chatter: not here
    log = (tmp_path / "run" / "driver.log").read_text()
    for text in ("TrainingReport(metrics={...})", "(TrainController pid=123) Requesting resources",
                 "[d2v rank 1] step 2/10", "internal chatter"):
        assert text in log
    assert [b["lines"] for b in seen] == [["after the run"]]  # Ray's own handler is back, and only it
    assert console_handler.level == logging.NOTSET


def test_verbose_leaves_ray_alone(tmp_path):
    with RunConsole(tmp_path / "driver.log", verbose=True) as console:
        console.attach()
    assert not (tmp_path / "driver.log").exists()


def test_finetune_console_lines_carry_their_own_command(tmp_path, capsys):
    dispatcher.add_handler("ray_print_logs", lambda batch: None)
    try:
        with RunConsole(tmp_path / "driver.log", command="finetune") as console:
            console.attach()
            dispatcher.emit(_batch(["[d2v rank 0] step 3/9 loss 1.25"]))
    finally:
        dispatcher.remove_handler("ray_print_logs")
    assert capsys.readouterr().err.splitlines() == ["d2v finetune: step 3/9 loss 1.25"]
