"""Storage under faults, on real SQLite files: a COMMIT that fails is rolled back,
processes migrating a new store at once all start, a queue item keeps the reason
(hence the split of its label) it was first routed for, and claims whose lease ran out
while the daemon was down are released when it starts."""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triage.config import load_settings
from triage.daemon import Daemon
from triage.gate.budget_gate import Decision
from triage.review.auth import Principal
from triage.review.queue import ReviewQueue, enqueue
from triage.store import db as store
from triage.training.splits import assign_split


def test_a_failing_commit_is_rolled_back_and_the_connection_stays_usable(tmp_path: Path) -> None:
    db = store.connect(tmp_path / "triage.db")
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    with store.transaction(db):
        db.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        db.execute("CREATE TABLE child (parent_id INTEGER REFERENCES parent(id) "
                   "DEFERRABLE INITIALLY DEFERRED)")
    # the deferred foreign key is checked only at COMMIT, which then fails
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        with store.transaction(db):
            db.execute("INSERT INTO child (parent_id) VALUES (7)")
    assert not db.conn.in_transaction
    assert db.execute("SELECT COUNT(*) FROM child").fetchone()[0] == 0
    # the write lock is free: this connection and another can write again
    with store.transaction(db):
        db.execute("INSERT INTO parent (id) VALUES (7)")
        db.execute("INSERT INTO child (parent_id) VALUES (7)")
    other = store.connect(tmp_path / "triage.db")
    with store.transaction(other):
        other.execute("INSERT INTO parent (id) VALUES (8)")
    assert db.execute("SELECT COUNT(*) FROM parent").fetchone()[0] == 2
    other.close()
    db.close()


_MIGRATE = """
import sys, time
from pathlib import Path
from triage.store import db as store
path, go = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.001)
print(store.schema_version(store.connect(path)))
"""


def test_processes_starting_at_once_on_a_new_store_all_migrate_it(tmp_path: Path) -> None:
    n = 6
    for attempt in range(3):  # a fresh file each time: the race is at creation
        path, go = tmp_path / f"t{attempt}.db", tmp_path / f"go{attempt}"
        ready = [tmp_path / f"ready{attempt}.{i}" for i in range(n)]
        procs = [subprocess.Popen([sys.executable, "-c", _MIGRATE, str(path), str(go),
                                   str(ready[i])], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(n)]
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()  # all imported and waiting: they open the new file together
        outcomes = [p.communicate(timeout=60) for p in procs]
        for proc, (out, err) in zip(procs, outcomes, strict=True):
            assert proc.returncode == 0, err[-2000:]
            assert out.strip() == str(len(store.MIGRATIONS))
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == len(store.MIGRATIONS)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master "
                                                 "WHERE type = 'table'")}
            assert {"files", "studies", "queue_items", "retrain_runs"} <= tables
        finally:
            conn.close()


def test_a_store_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "triage.db"
    store.connect(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(store.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this triage"):
        store.connect(path)


# -- the review queue --------------------------------------------------------------------


class Routed:
    """A real store in which the gate decides about studies, round after round."""

    def __init__(self, home: Path) -> None:
        self.settings = load_settings(None, home=home, environ={})
        self.db = store.connect(self.settings.database())
        self.now = 1_709_280_000.0
        with store.transaction(self.db):
            token = self.db.execute(
                "INSERT INTO tokens (name, role, token_hash, created_at) "
                "VALUES ('reader', 'radiologist', 'hash', 0)").lastrowid
        self.reader = Principal(token_id=int(token), name="reader", role="radiologist")

    def study(self, uid: str) -> int:
        with store.transaction(self.db):
            return int(self.db.execute(
                "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, round) "
                "VALUES (?, 'scored', ?, ?, 1)", [uid, self.now, self.now]).lastrowid)

    def decide(self, study_id: int, reason: str, combined: float | None) -> None:
        """A routed decision stored with its queue item, as the scoring worker does."""
        self.now += 60
        with store.transaction(self.db):
            result = self.db.execute(
                "INSERT INTO study_results (study_id, round, status, created_at) "
                "VALUES (?, 1, 'routed', ?)", [study_id, self.now]).lastrowid
            decision = self.db.execute(
                "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
                "strategy, needs_label, reason, combined, decision) "
                "VALUES (?, ?, 1, ?, ?, 'combined', 1, ?, ?, '{}')",
                [result, study_id, result, self.now, reason, combined]).lastrowid
            enqueue(self.db, study_id=study_id, decision_id=int(decision), reason=reason,
                    combined=combined, now=self.now)

    def item(self, study_id: int) -> tuple:
        return self.db.execute("SELECT reason, priority, state FROM queue_items "
                               "WHERE study_id = ?", [study_id]).fetchone()


def test_a_queue_item_keeps_the_reason_it_was_first_routed_for(tmp_path: Path) -> None:
    home = Routed(tmp_path)
    audit, gated = home.study("2.25.1"), home.study("2.25.2")
    home.decide(audit, "audit", 0.3)
    home.decide(gated, "uncertainty", 0.6)
    # a late instance reopens both; the next rounds route them for other reasons
    home.decide(audit, "uncertainty", 0.9)
    home.decide(gated, "audit", 0.1)
    assert home.item(audit) == ("audit", -1.0, "pending")  # still an audit, ranked as one
    assert home.item(gated) == ("uncertainty", 0.6, "pending")
    home.decide(gated, "predicted_loss", 0.8)  # a gate item takes the newer priority
    assert home.item(gated) == ("uncertainty", 0.8, "pending")
    assert home.db.execute("SELECT COUNT(*) FROM queue_items").fetchone()[0] == 2

    # with the default `audit` validation source, the audit label validates and the
    # gate's pick trains, whatever the later rounds said
    queue = ReviewQueue(home.db, lease_seconds=900, audit_every=1_000_000,
                        labels=list(home.settings.model.labels), clock=lambda: home.now)
    assert home.settings.retrain.validation_source == "audit"

    def split_for(db, study_id: int, label: str, reason: str) -> str | None:
        return assign_split(db, study_id, label, reason, home.settings)

    for study_id in (audit, gated):
        queue.claim(study_id, home.reader, None)
        queue.label(study_id, home.reader, home.settings.model.labels[0], None, None,
                    split_for=split_for)
    splits = dict(home.db.execute("SELECT study_id, split FROM labels").fetchall())
    assert splits == {audit: "validation", gated: "train"}


def test_claims_whose_lease_ran_out_while_down_are_released_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Routed(tmp_path)
    dead, live = home.study("2.25.31"), home.study("2.25.32")
    home.decide(dead, "uncertainty", 0.7)
    home.decide(live, "uncertainty", 0.6)
    for sequence, study_id in enumerate((dead, live)):  # what the restarted gate reads back
        decision = Decision(sequence=sequence, timestamp="2024-03-01T08:00:00+00:00",
                            day="2024-03-01", strategy="combined", needs_label=True,
                            reason="uncertainty", key=study_id)
        home.db.execute("UPDATE decisions SET decision = ? WHERE study_id = ?",
                        [json.dumps(decision.to_dict()), study_id])
    now = time.time()
    # the daemon died with two claims out: one lease ran out while it was down
    for study_id, expires in ((dead, now - 120), (live, now + 600)):
        home.db.execute("UPDATE queue_items SET state = 'claimed', claimed_by = ?, "
                        "claimed_at = ?, lease_expires_at = ? WHERE study_id = ?",
                        [home.reader.token_id, now - 900, expires, study_id])
    home.db.close()

    daemon = Daemon(home.settings)
    daemon.start()
    try:
        (logged,) = [r for r in caplog.records if r.getMessage() == "queue_leases_recovered"]
        assert (logged.items, logged.study_ids, logged.levelno) == (1, [dead], logging.WARNING)
    finally:
        daemon.stop()
    db = store.connect(home.settings.database(), readonly=True)
    items = dict(db.execute("SELECT study_id, state FROM queue_items").fetchall())
    assert items == {dead: "pending", live: "claimed"}  # a live lease is kept
    trail = db.execute("SELECT actor, action, study_id FROM audit").fetchall()
    assert trail == [("reader", "lease_expired", dead)]
    db.close()
