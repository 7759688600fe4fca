"""The training subprocess and its scheduler: triggers, one run at a time, crashes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelRegistry
from triage.model.settings import TrainSettings
from triage.store import db as store
from triage.training.runs import RetrainBusy, last_run, retrain_status
from triage.training.scheduler import RetrainScheduler

from .conftest import TINY_MODEL, Store, make_settings, subset


def _serve(st: Store, tmp_path) -> str:
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "serving.pt", build_network(TINY_MODEL),
                           build_loss_predictor(TINY_MODEL), TINY_MODEL)
    registry = ModelRegistry(st.db, st.settings.path("models"), TINY_MODEL)
    version = registry.add(path, source="import").version
    registry.promote(version)
    return version


def _models(st: Store) -> list[tuple]:
    return st.db.execute("SELECT version, status FROM models ORDER BY version").fetchall()


def _wait(scheduler: RetrainScheduler, run_id: int, timeout: float = 120) -> None:
    scheduler.processes[run_id].wait(timeout=timeout)


def _fill(st: Store, data, n_train: int = 120, n_val: int = 40) -> None:
    x, y = subset(data, "train", n_train)
    st.labelled(x, y, "train")
    xv, yv = subset(data, "val", n_val)
    st.labelled(xv, yv, "validation")


def test_nan_loss_fails_the_run_and_keeps_the_serving_model(tmp_path, pneumonia):
    st = Store(make_settings(tmp_path, rebalance=False))
    _fill(st, pneumonia)
    st.label(st.add_study(torch.full((1, 1, 28, 28), float("nan"))), "normal", "train")
    serving = _serve(st, tmp_path)
    before = _models(st)
    scheduler = RetrainScheduler(st.settings, st.settings.database())
    run_id = scheduler.start("manual")
    _wait(scheduler, run_id)
    assert scheduler.processes[run_id].returncode == 1
    run = last_run(st.db)
    assert run["state"] == "failed" and "not finite" in run["message"]
    assert _models(st) == before and _models(st)[0] == (serving, "serving")
    assert run["finished_at"] is not None


def test_killed_worker_is_marked_failed_and_changes_nothing(tmp_path, pneumonia):
    long = TINY_MODEL.model_copy(update={"training": TrainSettings(epochs=5000, batch_size=32)})
    st = Store(make_settings(tmp_path, model=long))
    _fill(st, pneumonia)
    serving = _serve(st, tmp_path)
    before = _models(st)
    scheduler = RetrainScheduler(st.settings, st.settings.database())
    run_id = scheduler.start("manual")
    deadline = time.monotonic() + 60
    while "epoch" not in (last_run(st.db)["message"] or ""):  # training has begun
        assert time.monotonic() < deadline, last_run(st.db)
        time.sleep(0.2)
    assert retrain_status(st.db)["running"] is True
    assert scheduler.due() is None  # not while one runs, even with labels waiting
    with pytest.raises(RetrainBusy, match="already running"):
        RetrainScheduler(st.settings, st.settings.database()).start("manual")
    proc = scheduler.processes[run_id]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert scheduler.check() == [run_id]
    run = last_run(st.db)
    assert run["state"] == "failed" and run["message"] == "process died"
    assert _models(st) == before and _models(st)[0] == (serving, "serving")


def test_dead_pid_is_detected_by_any_process(tmp_path):
    st = Store(make_settings(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, pid) "
                  "VALUES ('labels', 'running', ?, ?)", [now - 5, gone.pid])
    scheduler = RetrainScheduler(st.settings, st.settings.database())
    assert scheduler.check() == [1]
    assert last_run(st.db)["message"] == "process died"
    # a row whose process never got a pid is given a grace period, then failed
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at) "
                  "VALUES ('labels', 'running', ?)", [now])
    assert scheduler.check() == []
    late = RetrainScheduler(st.settings, st.settings.database(), clock=lambda: now + 120)
    assert late.check() == [2]


def test_due_by_label_count_and_by_hours(tmp_path):
    now = 1_000_000.0
    st = Store(make_settings(tmp_path, min_new_labels=3, every_hours=2, idle_minutes=600))
    scheduler = RetrainScheduler(st.settings, st.settings.database(), clock=lambda: now)
    studies = [st.add_study(torch.zeros(1, 1, 28, 28)) for _ in range(6)]
    st.label(studies[0], "normal", "train", created_at=now - 10)
    st.label(studies[1], "skip", None, created_at=now - 10)  # never counts
    assert scheduler.due(now) is None  # no run yet: the first needs min_new_labels
    st.label(studies[2], "pneumonia", "validation", created_at=now - 9)
    st.label(studies[3], "pneumonia", "train", created_at=now - 8)
    assert scheduler.due(now) == "labels"
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, finished_at) "
                  "VALUES ('labels', 'promoted', ?, ?)", [now - 5, now - 2])
    assert scheduler.due(now) is None  # those labels came before the last run
    assert scheduler.due(now + 3 * 3600) is None  # hours passed, but no new label
    st.label(studies[4], "normal", "train", created_at=now - 1)
    assert scheduler.due(now) is None  # one new label after 5 seconds
    assert scheduler.due(now + 2 * 3600) == "schedule"
    assert retrain_status(st.db)["labels_since_last_run"] == 1
    off = make_settings(tmp_path, min_new_labels=1, enabled=False)
    assert RetrainScheduler(off, off.database()).due(now) is None


def test_labels_of_a_quiet_stream_trigger_an_idle_run(tmp_path):
    """Fewer than min_new_labels waiting: a run starts once no label came for
    idle_minutes, and only then; labels older than the last run never count."""
    now = 1_000_000.0
    st = Store(make_settings(tmp_path, min_new_labels=50, every_hours=24, idle_minutes=30))
    scheduler = RetrainScheduler(st.settings, st.settings.database(), clock=lambda: now)
    studies = [st.add_study(torch.zeros(1, 1, 28, 28)) for _ in range(3)]
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, finished_at) "
                  "VALUES ('labels', 'promoted', ?, ?)", [now - 3600, now - 3500])
    st.label(studies[0], "normal", "train", created_at=now - 40 * 60)
    st.label(studies[1], "pneumonia", "train", created_at=now - 20 * 60)
    assert scheduler.due(now) is None  # the newest label came 20 minutes ago
    assert scheduler.due(now + 10 * 60) == "idle"
    st.label(studies[2], "skip", None, created_at=now)  # no class label: the stream is quiet
    assert scheduler.due(now + 10 * 60) == "idle"
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, finished_at) "
                  "VALUES ('idle', 'promoted', ?, ?)", [now + 11 * 60, now + 12 * 60])
    assert scheduler.due(now + 5 * 3600) is None  # nothing new since the idle run


def test_daemon_start_up_recovers_a_dead_run_and_its_candidate(tmp_path, caplog):
    """A worker killed between registering its candidate and deciding leaves a `running`
    row and a `candidate` model: start-up marks the run failed and rejects the candidate,
    with events; an admin's import and a candidate awaiting an admin stay candidates."""
    from triage.daemon import Daemon
    from triage.training.settings import RetrainSettings

    caplog.set_level(logging.INFO, logger="triage")
    settings = make_settings(tmp_path / "home").model_copy(
        update={"retrain": RetrainSettings(enabled=False)})
    st = Store(settings)
    serving = _serve(st, tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, pid, message) "
                  "VALUES ('labels', 'running', ?, ?, 'deciding')", [now - 600, gone.pid])
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, finished_at, message) "
                  "VALUES ('labels', 'succeeded', ?, ?, 'awaits an admin')", [now, now])
    registry = ModelRegistry(st.db, settings.path("models"), TINY_MODEL)
    checkpoint = save_checkpoint(tmp_path / "candidate.pt", build_network(TINY_MODEL),
                                 build_loss_predictor(TINY_MODEL), TINY_MODEL)
    orphan = registry.add(checkpoint, source="retrain:1", parent=serving).version
    awaiting = registry.add(checkpoint, source="retrain:2", parent=serving).version
    imported = registry.add(checkpoint, source="import").version
    st.db.close()

    daemon = Daemon(settings)
    daemon.start()
    try:
        db = store.connect(settings.database(), readonly=True)
        try:
            runs = db.execute("SELECT state, message FROM retrain_runs ORDER BY id").fetchall()
            models = dict(db.execute("SELECT version, status FROM models").fetchall())
            note = db.execute("SELECT note FROM models WHERE version = ?", [orphan]).fetchone()
        finally:
            db.close()
    finally:
        daemon.stop()
    assert runs == [("failed", "process died"), ("succeeded", "awaits an admin")]
    assert models == {serving: "serving", orphan: "rejected", awaiting: "candidate",
                      imported: "candidate"}
    assert "retrain run 1" in note[0]
    (died,) = [r for r in caplog.records if r.getMessage() == "retrain_process_died"]
    assert died.run_id == 1
    (rejected,) = [r for r in caplog.records if r.getMessage() == "retrain_candidate_orphaned"]
    assert (rejected.version, rejected.run_id) == (orphan, 1)
