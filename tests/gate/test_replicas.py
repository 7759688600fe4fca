"""Replicas on one store split the scoring without a coordinator: claims, take-over of a
dead replica's studies, one gate budget, one retrain scheduler (triage/store/replicas.py).

In-process, on the store of the test pass (SQLite here; PostgreSQL in the
TRIAGE_TEST_STORE=postgresql pass of `make test`): each "replica" is a scorer and worker
with its own name on the one store, as each daemon of a deployment is.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_scorer import Home

from triage.gate.scorer import GateScorer
from triage.gate.worker import ScoreResult, ScoringWorker, StudyToScore
from triage.model.registry import ModelRegistry
from triage.store import replicas
from triage.training.runs import RunEnded, create_run, finish_or_abort, reap_dead_runs

GATE = {"label_rate": 0.3, "warmup": 5, "window": 20, "exploration_rate": 0.1}


def _worker(home: Home, scorer: GateScorer, name: str) -> ScoringWorker:
    return ScoringWorker(home.db, scorer, home.metrics, clock=lambda: home.now, replica=name,
                         lease_seconds=30)


def _decided(home: Home) -> list[tuple]:
    return home.db.execute(
        "SELECT study_id, sequence, reason, needs_label, threshold FROM decisions ORDER BY id"
    ).fetchall()


def test_two_replicas_taking_turns_decide_as_one_gate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The budget, window and sequence are shared: replicas deciding in turn, each from a
    state that misses the other's last decision until it stores its own, store exactly
    the decisions one scorer makes for the same studies."""
    caplog.set_level(logging.INFO, logger="triage")
    alone = Home(tmp_path / "alone", **GATE)
    alone.promote(seed=3)
    reference = alone.score(alone.scorer(), 30)

    shared = Home(tmp_path / "shared", **GATE)
    shared.promote(seed=3)
    workers = [_worker(shared, GateScorer(shared.settings, shared.db, shared.metrics,
                                          clock=lambda: shared.now, replica=name), name)
               for name in ("a", "b")]
    ids = [shared.add_study() for _ in range(30)]
    for i, study_id in enumerate(ids):
        assert workers[i % 2].run_once() == study_id
        shared.now += 60
    decided = _decided(shared)
    assert decided == [(r["study_id"], r["sequence"], r["reason"], r["needs_label"],
                        r["threshold"]) for r in reference]
    assert [row[1] for row in decided] == list(range(30))  # one series of sequences
    assert sum(row[3] for row in decided) >= 4  # the gate routed some: a real comparison
    claimers = dict(shared.db.execute("SELECT id, claimed_by FROM studies").fetchall())
    assert [claimers[i] for i in ids] == ["a", "b"] * 15
    # each decision after the first was made stale by the other's and decided again
    assert sum(r.getMessage() == "gate_decision_settled" for r in caplog.records) == 29


class _Interrupted:
    """A replica's scorer during which the replica is taken for dead: the other replica
    takes the study over and decides it before this one stores its result."""

    def __init__(self, scorer: GateScorer, meanwhile) -> None:  # type: ignore[no-untyped-def]
        self._scorer, self._meanwhile = scorer, meanwhile

    def score(self, study: StudyToScore) -> ScoreResult:
        result = self._scorer.score(study)
        self._meanwhile()
        return result

    def commit(self, result: ScoreResult) -> None:
        self._scorer.commit(result)


def test_a_dead_replicas_study_is_scored_by_another_and_its_late_result_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, **GATE)
    home.promote(seed=3)
    replicas.register(home.db, "a", ["score"], home.now)
    replicas.register(home.db, "b", ["score"], home.now)
    b = _worker(home, GateScorer(home.settings, home.db, home.metrics,
                                 clock=lambda: home.now, replica="b"), "b")

    def a_is_taken_for_dead() -> None:
        home.now += 31  # a's last heartbeat is older than the lease; b beats
        replicas.heartbeat(home.db, "b", home.now)
        assert b.take_over_dead() == 1
        assert b.run_once() == study_id

    a = _worker(home, _Interrupted(GateScorer(home.settings, home.db, home.metrics,
                                              clock=lambda: home.now, replica="a"),
                                   a_is_taken_for_dead), "a")
    study_id = home.add_study()
    assert a.run_once() == study_id
    rows = home.db.execute("SELECT study_id FROM decisions").fetchall()
    assert rows == [(study_id,)]  # b's decision; a stored nothing
    assert home.db.execute("SELECT COUNT(*) FROM study_results").fetchone()[0] == 1
    assert home.db.execute("SELECT state, claimed_by FROM studies WHERE id = ?",
                           [study_id]).fetchone() == ("scored", "b")
    assert [r.study_id for r in caplog.records
            if r.getMessage() == "scoring_claim_lost"] == [study_id]
    assert home.prometheus.get_sample_value(
        "triage_scoring_studies_total", {"status": "claim_lost"}) == 1.0


def test_start_up_requeues_its_own_claims_and_leaves_a_live_replicas(tmp_path: Path) -> None:
    home = Home(tmp_path, **GATE)
    replicas.register(home.db, "a", ["score"], home.now)
    replicas.register(home.db, "b", ["score"], home.now)
    replicas.register(home.db, "gone", ["score"], home.now - 600)
    own, others, dead, unnamed = (home.add_study() for _ in range(4))
    for study_id, holder in ((own, "a"), (others, "b"), (dead, "gone"), (unnamed, None)):
        home.db.execute("UPDATE studies SET state = 'scoring', claimed_by = ? WHERE id = ?",
                        [holder, study_id])
    a = _worker(home, home.scorer(), "a")
    assert a.requeue_interrupted() == 3
    states = dict(home.db.execute("SELECT id, state FROM studies").fetchall())
    assert [states[i] for i in (own, others, dead, unnamed)] == [
        "complete", "scoring", "complete", "complete"]
    # between studies a replica holds nothing: a claim of its own left by a try whose
    # result could not be stored goes back
    home.db.execute("UPDATE studies SET state = 'scoring', claimed_by = 'a' WHERE id = ?",
                    [own])
    assert a.take_over_dead() == 1
    assert home.db.execute("SELECT state FROM studies WHERE id = ?", [own]).fetchone() == (
        "complete",)
    assert a.take_over_dead() == 0
    # b stops cleanly: what it still holds is taken over at once, not after the lease
    replicas.stopped(home.db, "b", home.now)
    assert a.take_over_dead() == 1 and home.db.execute(
        "SELECT state FROM studies WHERE id = ?", [others]).fetchone() == ("complete",)


def test_a_dead_replicas_batch_goes_back_to_be_scored(tmp_path: Path) -> None:
    batch = {"strategy": "badge", "budget_manager": "batch", "batch_size": 10,
             "label_rate": 0.3, "exploration_rate": 0.0}
    home = Home(tmp_path, **batch)
    home.promote(seed=1, head=True)
    replicas.register(home.db, "a", ["score"], home.now)
    a = _worker(home, GateScorer(home.settings, home.db, home.metrics,
                                 clock=lambda: home.now, replica="a"), "a")
    waiting = [home.add_study() for _ in range(3)]
    for study_id in waiting:
        assert a.run_once() == study_id
    home.now += 20
    replicas.register(home.db, "b", ["score"], home.now)
    b_scorer = GateScorer(home.settings, home.db, home.metrics, clock=lambda: home.now,
                          replica="b")
    assert b_scorer.batch_pending == 0  # a's batch is a's while a lives
    b = _worker(home, b_scorer, "b")
    assert b.take_over_dead() == 0
    home.now += 11  # a's heartbeat is 31 s old
    replicas.heartbeat(home.db, "b", home.now)
    assert b.take_over_dead() == 3
    assert home.db.execute("SELECT COUNT(*) FROM gate_buffer").fetchone()[0] == 0
    for study_id in waiting:  # scored again, now in b's batch
        assert b.run_once() == study_id
    assert b_scorer.batch_pending == 3
    assert home.db.execute("SELECT DISTINCT replica FROM gate_buffer").fetchall() == [("b",)]


def test_one_retrain_lease_at_a_time_passed_on_when_it_lapses(tmp_path: Path) -> None:
    home = Home(tmp_path)
    db, now = home.db, home.now
    assert replicas.take_lease(db, "retrain", "a", now, 30)
    assert not replicas.take_lease(db, "retrain", "b", now + 29, 30)
    assert replicas.take_lease(db, "retrain", "a", now + 29, 30)  # renewed
    assert not replicas.take_lease(db, "retrain", "b", now + 58, 30)
    assert replicas.lease_holder(db, "retrain", now + 58) == "a"
    assert replicas.take_lease(db, "retrain", "b", now + 60, 30)  # lapsed: b's
    assert replicas.lease_holder(db, "retrain", now + 60) == "b"
    replicas.release_lease(db, "retrain", "a")  # not a's to give up
    assert replicas.lease_holder(db, "retrain", now + 60) == "b"
    replicas.release_lease(db, "retrain", "b")
    assert replicas.lease_holder(db, "retrain", now + 60) is None


def test_another_replicas_run_is_dead_with_its_replica_and_decides_nothing(
    tmp_path: Path
) -> None:
    home = Home(tmp_path)
    db = home.db
    run_id = create_run(db, "manual", home.now, replica="elsewhere")
    db.execute("UPDATE retrain_runs SET pid = 999999999 WHERE id = ?", [run_id])
    # its pid means nothing on this host: judged by whether its replica is live
    assert reap_dead_runs(db, home.now, replica="here", live={"here", "elsewhere"}) == []
    assert reap_dead_runs(db, home.now, replica="here", live={"here"}) == [run_id]
    # its worker, still training on the other host, cannot promote what it trained
    registry = ModelRegistry(db, home.settings.path("models"), home.settings.model)
    version = home.promote(seed=5)
    candidate = registry.add(registry.get(version).path, source=f"retrain:{run_id}").version
    with pytest.raises(RunEnded):
        registry.promote(candidate, note="better", also=lambda d: finish_or_abort(
            d, run_id, "promoted", "promoted"))
    assert registry.get(candidate).status == "candidate"
    assert db.execute("SELECT state FROM retrain_runs WHERE id = ?",
                      [run_id]).fetchone() == ("failed",)


def test_a_home_keeps_its_name_and_a_renamed_replica_keeps_what_it_held(
    tmp_path: Path
) -> None:
    """The name is kept in the home: a new host name (a recreated container) does not
    orphan what the home's daemon had in flight; `replica.name` set later takes it over."""
    home = Home(tmp_path)
    first = home.settings.replica_name()
    assert replicas.adopt_name(home.db, home.settings.home, first) is None
    (tmp_path / replicas.NAME_FILE).write_text("old-host-1a2b3c\n")  # ran elsewhere before
    assert home.settings.replica_name() == "old-host-1a2b3c"
    study = home.add_study()
    home.db.execute("UPDATE studies SET state = 'scoring', claimed_by = ? WHERE id = ?",
                    ["old-host-1a2b3c", study])
    home.db.execute("INSERT INTO files (inbox_path, size, state, received_at, replica) "
                    "VALUES ('a.dcm', 1, 'received', 0, 'old-host-1a2b3c')")
    home.db.execute("INSERT INTO files (inbox_path, size, state, received_at, replica) "
                    "VALUES ('b.dcm', 1, 'archived', 0, 'old-host-1a2b3c')")
    assert replicas.adopt_name(home.db, home.settings.home, "ward-7") == "old-host-1a2b3c"
    assert replicas.stored_name(home.settings.home) == "ward-7"
    assert home.db.execute("SELECT inbox_path, replica FROM files ORDER BY id").fetchall() == [
        ("a.dcm", "ward-7"), ("b.dcm", "old-host-1a2b3c")]  # in flight re-tagged, history kept
    assert home.db.execute("SELECT claimed_by FROM studies WHERE id = ?",
                           [study]).fetchone() == ("ward-7",)


def test_a_promoted_runs_coverage_queries_are_routed_once_across_replicas(
    tmp_path: Path
) -> None:
    """Both replicas' scoring loops look for promoted runs whose coverage queries are not
    routed yet: one routes them, the other finds them routed, and counts them against
    the shared cap and budget offset."""
    home = Home(tmp_path, **GATE)
    home.promote(seed=3)
    scorers = [GateScorer(home.settings, home.db, home.metrics, clock=lambda: home.now,
                          replica=name) for name in ("a", "b")]
    home.score(scorers[0], 12)
    unqueued = [row[0] for row in home.db.execute(
        "SELECT id FROM studies WHERE id NOT IN (SELECT study_id FROM queue_items) "
        "ORDER BY id").fetchall()]
    picks = unqueued[:3]
    home.db.execute(
        "INSERT INTO retrain_runs (trigger, state, started_at, progress, message, metrics) "
        "VALUES ('manual', 'promoted', ?, 1, 'promoted', ?)",
        [home.now, json.dumps({"coverage_picks": picks})])
    b_offset_before = scorers[1].gate.pending_offset
    assert scorers[0].route_coverage() == 3
    assert scorers[1].route_coverage() == 0
    routed = [row[0] for row in home.db.execute(
        "SELECT study_id FROM queue_items WHERE reason = 'coverage' ORDER BY id")]
    assert routed == picks
    # b folds a's decisions and routes in when it next decides (under the write lock):
    # its day count and pending offset are then the store's
    assert scorers[1].gate.pending_offset == b_offset_before
    worker = _worker(home, scorers[1], "b")
    study = home.add_study()
    assert worker.run_once() == study
    day = scorers[1].gate.day_of(datetime.fromtimestamp(home.now, UTC))
    routed_today = home.db.execute(
        "SELECT (SELECT COUNT(*) FROM decisions WHERE needs_label = 1) + "
        "(SELECT COUNT(*) FROM queue_items WHERE reason = 'coverage')").fetchone()[0]
    assert scorers[1].gate.routed_on(day) == routed_today
    stored_offset = home.db.execute(
        "SELECT value FROM gate_state WHERE name = 'budget_offset'").fetchone()[0]
    assert scorers[1].gate.pending_offset == stored_offset
    assert stored_offset == 3 - home.db.execute(
        "SELECT COUNT(*) FROM decisions WHERE reason = 'budget_offset'").fetchone()[0]
