"""Retraining in two processes under torchrun (`retrain.nproc: 2`), real processes.

The scheduler starts ``python -m torch.distributed.run --standalone`` (its own free
port, so concurrent tests never meet); rank 0 alone writes the store.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from triage.model.settings import TrainSettings
from triage.training.runs import last_run, pid_alive
from triage.training.scheduler import RetrainScheduler

from .conftest import FULL_SCALE, TINY_MODEL, Store, make_settings, subset
from .test_worker_scheduler import _models, _serve


def _store(tmp_path: Path, data, model=TINY_MODEL) -> Store:
    st = Store(make_settings(tmp_path, model=model, nproc=2))
    x, y = subset(data, "train", 120)
    st.labelled(x, y, "train")
    xv, yv = subset(data, "val", 40)
    st.labelled(xv, yv, "validation")
    return st


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _events(st: Store) -> list[dict]:
    lines = (st.settings.path("logs") / "retrain.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def _training_started(st: Store, deadline: float) -> None:
    while "epoch" not in (last_run(st.db)["message"] or ""):
        assert time.monotonic() < deadline, last_run(st.db)
        time.sleep(0.2)


def _all_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_two_process_retrain_decides_and_registers_once(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia)
    serving = _serve(st, tmp_path)
    scheduler = RetrainScheduler(st.settings, st.settings.database())
    run_id = scheduler.start("manual")
    launcher = scheduler.processes[run_id]
    assert launcher.wait(timeout=180) == 0
    run = last_run(st.db)
    assert run["state"] in ("promoted", "rejected"), run["message"]
    assert run["pid"] == launcher.pid  # the launcher: SIGTERM to it reaches every rank
    models = _models(st)
    assert len(models) == 2 and models[0][0] == serving  # exactly one new version
    version = models[1][0]
    assert st.db.execute("SELECT source FROM models WHERE version = ?",
                         [version]).fetchone()[0] == f"retrain:{run_id}"
    assert run["metrics"]["version"] == version and run["metrics"]["epochs_run"] == 6
    events = [e["event"] for e in _events(st)]
    assert events.count("retrain_started") == 1 and events.count("retrain_decision") == 1
    assert "retrain_rank_stopped" not in events and "retrain_failed" not in events
    if run["state"] == "promoted":  # the refit was the group's second training
        assert events.count("retrain_refit") == 1
    assert list((tmp_path / "retrain").glob("run-*.json")) == []


def _training_run(tmp_path, pneumonia):
    """A two-process run that trains for long, once both ranks train: the store, the
    scheduler, the launcher and its ranks' pids."""
    long = TINY_MODEL.model_copy(update={"training": TrainSettings(epochs=5000, batch_size=32)})
    st = _store(tmp_path, pneumonia, long)
    scheduler = RetrainScheduler(st.settings, st.settings.database())
    run_id = scheduler.start("manual")
    launcher = scheduler.processes[run_id]
    _training_started(st, time.monotonic() + 120)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2
    return st, scheduler, launcher, ranks


@pytest.mark.skipif(not FULL_SCALE, reason="make test-full runs it (the launcher forwards "
                    "SIGTERM itself; SIGKILL, which it cannot forward, is tested below)")
def test_sigterm_to_the_launcher_fails_the_run_and_stops_every_rank(tmp_path, pneumonia):
    st, scheduler, launcher, ranks = _training_run(tmp_path, pneumonia)
    os.kill(launcher.pid, signal.SIGTERM)
    launcher.wait(timeout=60)
    run = last_run(st.db)
    assert run["state"] == "failed" and run["message"] == "cancelled"
    assert _all_gone(ranks)
    assert st.db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0
    assert scheduler.check() == []  # the row was ended by rank 0, not found dead


def test_a_launcher_killed_outright_takes_its_ranks_along(tmp_path, pneumonia):
    """SIGKILL cannot be forwarded: each rank asked the kernel for SIGTERM when its
    parent dies, so rank 0 ends the row and no rank trains on unsupervised."""
    st, scheduler, launcher, ranks = _training_run(tmp_path, pneumonia)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=30)
    assert _all_gone(ranks)
    scheduler.check()
    run = last_run(st.db)
    assert run["state"] == "failed" and run["message"] in ("cancelled", "process died")
