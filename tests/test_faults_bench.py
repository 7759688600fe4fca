"""The fault-injection bench's fast subset, its checks, and the product fixes it led to.

Each scenario of bench/faults.py runs here on the real daemon and must end with nothing
lost, duplicated, stuck or flooded. `make test` runs the six fast scenarios with one
trial each (``FAST_TRIALS``); ``TRIAGE_FULL_SCALE=1``, as in `make test-full`, adds the
four inherently slow ones (``SLOW``: a training subprocess per trial, a 10 s lock, a
lease waited out; about 90 s of the 2-core machine's time, which kept `make test` over
its 10 minutes) and runs 2 trials of the fast ones. ``bench/faults.py --trials 20`` is
the full run of all ten behind bench/results/faults.json.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import REPO
from faults_support import Batch, final_problems
from prometheus_client import CollectorRegistry

from triage.config import Settings
from triage.daemon import Daemon
from triage.ingest.assembly import StudyAssembler
from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelError, ModelRegistry
from triage.model.serving import failure_reason
from triage.model.settings import ModelSettings
from triage.review.auth import Principal
from triage.review.queue import ReviewQueue, enqueue
from triage.store import db as store
from triage.telemetry.metrics import build_metrics
from triage.training.scheduler import RetrainScheduler

_spec = importlib.util.spec_from_file_location("bench_faults", REPO / "bench" / "faults.py")
faults = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = faults  # dataclasses look their module up there
_spec.loader.exec_module(faults)

# Run only by `make test-full` (`make test` keeps the 10-minute budget): a training
# subprocess per trial (retrain, promotion), a 10 s lock (sqlite_busy), a lease waited
# out (clock_jump); and those whose fault `make test` meets elsewhere: a corrupt serving
# model (tests/gate/test_degraded_serving.py), an unreadable archive file
# (tests/gate/test_worker_faults.py), SIGKILL during ingest and scoring (the seeded kill
# points of tests/test_fault_harness.py; on PostgreSQL, test_a_scenario_runs_on_postgresql).
SLOW = ("kill_during_retrain", "kill_during_promotion", "sqlite_busy", "clock_jump",
        "corrupt_serving_model", "unreadable_archive_file", "kill_during_ingest",
        "kill_during_scoring")
FULL_SCALE = os.environ.get("TRIAGE_FULL_SCALE") == "1"
FAST_TRIALS = {name: 2 if FULL_SCALE and name not in SLOW else 1 for name in faults.SCENARIOS}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(
        name in SLOW and not FULL_SCALE, reason="slow: make test-full runs it"))
    for name in faults.SCENARIOS])
def test_scenario_fast_subset(name: str, tmp_path: Path) -> None:
    result = faults.run_scenario(name, FAST_TRIALS[name], seed=0, workdir=tmp_path)
    print(f"{name}: {result}")
    counts = {k: result[k] for k in ("lost", "duplicated", "stuck", "flooded", "other")}
    assert counts == dict.fromkeys(counts, 0), result["details"]
    assert result["trials"] == FAST_TRIALS[name] and result["fault_points"], result


def test_a_scenario_runs_on_postgresql(tmp_path: Path, postgres_server) -> None:
    """`bench/faults.py --store postgresql`: the daemon's store is a database on the
    server and every invariant is read from there (one trial here; the bench runs all
    ten scenarios)."""
    url = postgres_server.new_database()
    result = faults.run_scenario("kill_during_ingest", 1, seed=0, workdir=tmp_path,
                                 store_url=url)
    counts = {k: result[k] for k in ("lost", "duplicated", "stuck", "flooded", "other")}
    assert counts == dict.fromkeys(counts, 0), result["details"]
    assert not (tmp_path / "home" / "triage.db").exists()  # nothing went to SQLite
    db = store.connect(url, readonly=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM files").fetchone()[0] >= 10
    finally:
        db.close()


def test_command_line_writes_the_results_file(tmp_path: Path, monkeypatch, capsys) -> None:
    """`bench/faults.py --trials N --out PATH --scenarios a,b` (the scenarios themselves
    run above; here a stand-in that records one fault point)."""
    def stand_in(rig, trials: int) -> None:
        rig.points["stand-in"] += trials

    monkeypatch.setitem(faults.SCENARIOS, "kill_during_ingest", stand_in)
    out = tmp_path / "faults.json"
    assert faults.main(["--trials", "3", "--scenarios", "kill_during_ingest",
                        "--out", str(out)]) == 0
    report = faults.json.loads(out.read_text())
    assert faults.json.loads(capsys.readouterr().out) == report
    (row,) = report["scenarios"]
    assert {"name", "trials", "lost", "duplicated", "stuck", "flooded", "seconds"} <= set(row)
    assert (row["name"], row["trials"], row["fault_points"]) == (
        "kill_during_ingest", 3, {"stand-in": 3})
    assert {"machine", "date", "command"} <= set(report)
    with pytest.raises(SystemExit) as refused:
        faults.main(["--scenarios", "nope"])
    assert refused.value.code == 2 and "unknown scenario" in capsys.readouterr().err


# -- the checks count what they claim to ---------------------------------------------------


def _home(tmp_path: Path) -> tuple[Path, store.sqlite_utils.Database]:
    home = tmp_path / "home"
    for folder in ("inbox", "archive", "quarantine", "models", "logs"):
        (home / folder).mkdir(parents=True)
    return home, store.connect(home / "triage.db")


def _study(db, uid: str, state: str, now: float) -> int:
    return int(db.execute(
        "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, round) "
        "VALUES (?, ?, ?, ?, 1)", [uid, state, now, now]).lastrowid)


def _decide(db, study_id: int, reason: str, routed: bool, now: float,
            version: str | None = None) -> int:
    result = db.execute("INSERT INTO study_results (study_id, round, status, created_at) "
                        "VALUES (?, 1, 'ok', ?)", [study_id, now]).lastrowid
    return int(db.execute(
        "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
        "model_version, strategy, needs_label, reason, decision) "
        "VALUES (?, ?, 1, ?, ?, ?, 'combined', ?, ?, '{}')",
        [result, study_id, result, now, version, int(routed), reason]).lastrowid)


def test_each_broken_invariant_is_counted_in_its_kind(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    now = time.time()
    batch = Batch()
    batch.add("2.25.1", "gone.dcm")  # left the inbox, no row: lost
    batch.add("2.25.2", "waiting.dcm")  # never read, still in the inbox: stuck
    (home / "inbox" / "waiting.dcm").write_bytes(b"x")
    for _ in range(2):  # one file, two rows: duplicated
        db.execute("INSERT INTO files (inbox_path, size, state, received_at) "
                   "VALUES ('twice.dcm', 1, 'duplicate', ?)", [now])
    _study(db, "2.25.1", "scoring", now)  # stuck
    routed = _study(db, "2.25.2", "scored", now)
    _decide(db, routed, "uncertainty", True, now)  # routed, no queue item: lost
    for version in ("v0001", "v0002"):  # two serving models: duplicated
        db.execute("INSERT INTO models (version, status, path, source, created_at, "
                   "promoted_at) VALUES (?, 'serving', 'x', 'import', ?, ?)",
                   [version, now, now])
    problems, _ = final_problems(home, batch, strict_results=False)
    kinds = {(p.kind, p.detail.split(":")[0].split(" ")[0]) for p in problems}
    details = " | ".join(p.detail for p in problems)
    assert ("lost", "gone.dcm") in kinds and ("stuck", "waiting.dcm") in kinds, details
    assert any(p.kind == "duplicated" and "twice.dcm" in p.detail for p in problems), details
    assert any(p.kind == "stuck" and "ended scoring" in p.detail for p in problems), details
    assert any(p.kind == "lost" and "missing from the queue" in p.detail
               for p in problems), details
    assert any(p.kind == "duplicated" and "2 serving" in p.detail for p in problems), details


def test_a_cold_start_flood_after_a_promotion_is_counted(tmp_path: Path) -> None:
    home, db = _home(tmp_path)
    rig = faults.Rig("corrupt_serving_model", tmp_path, 0, dict(faults.BASE_ENV))
    since = rig.snapshot()
    now = time.time()
    db.execute("INSERT INTO models (version, status, path, source, created_at, promoted_at) "
               "VALUES ('v0001', 'serving', 'x', 'import', ?, ?)", [now - 10, now - 10])
    for k in range(10):  # what the old fallback did: every study routed as cold start
        study = _study(db, f"2.25.{k}", "scored", now)
        decision = _decide(db, study, "cold_start", True, now)
        enqueue(db, study_id=study, decision_id=decision, reason="cold_start",
                combined=None, now=now)
    rig.measure_flood(since)
    assert rig.flooded == 10
    fine = faults.Rig("kill_during_ingest", tmp_path, 0, dict(faults.BASE_ENV))
    since = fine.snapshot()
    for k in range(10, 20):  # routed at the label rate by the serving model
        study = _study(db, f"2.25.{k}", "scored", now)
        decision = _decide(db, study, "uncertainty", k % 3 == 0, now, "v0001")
        if k % 3 == 0:
            enqueue(db, study_id=study, decision_id=decision, reason="uncertainty",
                    combined=0.5, now=now)
    fine.measure_flood(since)
    assert fine.flooded == 0


def _claimed_study(db, clock) -> tuple[ReviewQueue, int]:
    """A routed study claimed by a reader at ``clock()`` with a 900 s lease; the queue
    (on that clock) and the study's id."""
    study = _study(db, "2.25.9", "scored", clock())
    enqueue(db, study_id=study, decision_id=_decide(db, study, "uncertainty", True, clock()),
            reason="uncertainty", combined=0.5, now=clock())
    token = db.execute("INSERT INTO tokens (name, role, token_hash, created_at) VALUES "
                       "('a', 'radiologist', 'h', 0)").lastrowid
    queue = ReviewQueue(db, lease_seconds=900, audit_every=5, labels=["normal", "pneumonia"],
                        clock=clock)
    assert queue.claim_next(Principal(int(token), "a", "radiologist"), None).study_id == study
    return queue, study


# -- product fixes the bench led to (each test fails without its fix) ----------------------


def test_a_lease_granted_before_the_clock_stepped_back_is_cut_to_one_lease(
        tmp_path: Path) -> None:
    """clock_jump: a reader's claim made just before the wall clock stepped back an hour
    held the study for the hour plus the lease (a dead session's study, unreachable)."""
    _, db = _home(tmp_path)
    clock = [1_000_000.0]
    queue, study = _claimed_study(db, lambda: clock[0])
    clock[0] -= 3600  # NTP steps the clock back an hour
    queue.list()
    expires, claimed = db.execute("SELECT lease_expires_at, claimed_at FROM queue_items"
                                  ).fetchone()
    assert expires == clock[0] + 900 and claimed == clock[0]
    clock[0] += 901  # one lease later the study is free again
    assert queue.list(state="pending")[0]["study_id"] == study
    assert db.execute("SELECT action FROM audit ORDER BY id DESC LIMIT 1").fetchone() == (
        "lease_expired",)


def test_a_lease_granted_before_the_clock_stepped_back_is_cut_at_start_up(
        tmp_path: Path) -> None:
    """clock_jump: the daemon restarted on a clock an hour behind kept a dead session's
    claim for the hour plus the lease: start-up recovery did not cut long leases."""
    home, db = _home(tmp_path)
    now = time.time()
    _claimed_study(db, lambda: now + 3600)  # claimed before NTP stepped back an hour
    settings = Settings(home=home, review={"lease_minutes": 15})
    Daemon(settings)._recover_queue()
    (expires,) = db.execute("SELECT lease_expires_at FROM queue_items").fetchone()
    assert now + 900 <= expires <= time.time() + 900


def test_an_open_study_stamped_before_the_clock_stepped_back_waits_one_stable_age(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """clock_jump: an open study whose last instance came in just before the wall clock
    stepped back an hour stayed open for the hour plus the stable age."""
    caplog.set_level(logging.INFO, logger="triage")
    _, db = _home(tmp_path)
    clock = [1_000_000.0]
    study = _study(db, "2.25.9", "open", clock[0])
    db.execute("UPDATE studies SET n_images = 1 WHERE id = ?", [study])
    assembler = StudyAssembler(db, build_metrics(CollectorRegistry()), 30, lambda: clock[0])
    clock[0] -= 3600  # NTP steps the clock back an hour
    assert assembler.complete_due() == []  # re-stamped now: quiet for one stable age from here
    (warned,) = [r for r in caplog.records if r.getMessage() == "studies_restamped_clock_behind"]
    assert (warned.studies, warned.seconds_behind, warned.levelno) == (1, 3600.0,
                                                                       logging.WARNING)
    clock[0] += 29
    assert assembler.complete_due() == []
    clock[0] += 1
    assert assembler.complete_due() == [study]
    assert db.execute("SELECT state FROM studies").fetchone() == ("complete",)


TINY = ModelSettings(input_size=16, channels=(4, 8), subunits=1, lossnet_width=8)


def test_a_checkpoint_whose_weights_changed_on_disk_is_refused(tmp_path: Path) -> None:
    """corrupt_serving_model: torch loads a checkpoint with a flipped byte in its
    weights, so the damaged model would have served silently."""
    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "c.pt", build_network(TINY), build_loss_predictor(TINY),
                             TINY)
    db = store.connect(tmp_path / "triage.db")
    registry = ModelRegistry(db, tmp_path / "models", TINY)
    entry = registry.add(source, source="import")
    registry.load(entry.version)
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the weights: the zip and pickle still parse
    entry.path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupt or unreadable") as caught:
        registry.load(entry.version)
    assert failure_reason(caught.value) == "corrupt"
    db.close()


def test_a_killed_workers_temporary_files_are_removed_with_its_run(tmp_path: Path) -> None:
    """kill_during_retrain: a worker SIGKILLed between saving its candidate and
    registering it left `models/.retrain-N.pt`, and one killed while re-scoring the queue
    after its promotion (the run already ended) its settings file, forever."""
    settings = Settings(home=tmp_path)
    db = store.connect(settings.database())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    now = time.time()
    db.execute("INSERT INTO retrain_runs (trigger, state, started_at, pid) "
               "VALUES ('labels', 'running', ?, ?)", [now - 5, gone.pid])  # 1: died
    db.execute("INSERT INTO retrain_runs (trigger, state, started_at, pid) "
               "VALUES ('labels', 'promoted', ?, ?)", [now - 4, gone.pid])  # 2: ended
    db.execute("INSERT INTO retrain_runs (trigger, state, started_at, pid) "
               "VALUES ('labels', 'running', ?, ?)", [now - 3, os.getpid()])  # 3: running
    db.close()
    models = settings.path("models")
    models.mkdir(parents=True)
    (tmp_path / "retrain").mkdir()
    left = [models / ".retrain-1.pt", models / ".retrain-1.pt.partial",
            tmp_path / "retrain" / "run-1.json", tmp_path / "retrain" / "run-2.json"]
    kept = [models / ".retrain-3.pt", tmp_path / "retrain" / "run-3.json"]
    for path in left + kept:
        path.write_bytes(b"x")
    with mock.patch("triage.training.runs.pid_alive", lambda pid: pid == os.getpid()):
        assert RetrainScheduler(settings, settings.path("database")).check() == [1]
    assert [p.exists() for p in left] == [False] * 4 and all(p.exists() for p in kept)
