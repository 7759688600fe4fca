"""The scoring worker under faults, on a real store fed by the real ingestor: a study
whose stored image is corrupt ends `error` with a reason instead of staying `scoring`,
the stream goes on, and studies a crash left `scoring` are scored again at start-up."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from conftest import PHI_STRINGS, make_image, store_settings
from prometheus_client import CollectorRegistry

from triage.config import Settings
from triage.gate.scorer import GateScorer
from triage.gate.worker import ScoringWorker
from triage.ingest.assembly import StudyAssembler
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.model.settings import ModelSettings
from triage.store import db as store
from triage.telemetry.metrics import build_metrics

TINY = ModelSettings(input_size=32, channels=(4, 8), subunits=1, lossnet_width=8, mc_samples=3)


class Pipeline:
    """Ingestor, assembler and scoring worker of the daemon on one store and clock."""

    def __init__(self, home: Path) -> None:
        self.settings = Settings(home=home, store=store_settings(home), model=TINY)
        self.settings.path("inbox").mkdir(parents=True)
        self.db = store.connect(self.settings.database())
        self.metrics = build_metrics(CollectorRegistry())
        self.now = time.time()  # the ingestor stamps instances with the wall clock
        self.ingestor = Ingestor(self.settings, self.db, self.metrics)
        self.assembler = StudyAssembler(self.db, self.metrics, 30, clock=lambda: self.now)
        self._n = 0

    def worker(self) -> ScoringWorker:
        """A freshly started scoring thread's worker (as after a restart)."""
        scorer = GateScorer(self.settings, self.db, self.metrics, clock=lambda: self.now)
        return ScoringWorker(self.db, scorer, self.metrics, clock=lambda: self.now)

    def receive(self, study_uid: str, images: int) -> int:
        """Ingest ``images`` real DICOM files of a study and complete it; its id."""
        for _ in range(images):
            self._n += 1
            path = make_image(self.settings.path("inbox") / f"{self._n}.dcm",
                              study_uid=study_uid, seed=self._n)
            assert self.ingestor.ingest(ReadyFile(path)) == "archived"
        self.now += 60
        self.assembler.complete_due()
        return int(self.db.execute("SELECT id FROM studies WHERE study_uid = ?",
                                   [study_uid]).fetchone()[0])

    def corrupt_one_image(self, study_id: int) -> None:
        """Cut the stored pixels of one of the study's instances short."""
        self.db.execute(
            "UPDATE images SET data = substr(data, 1, 10) WHERE instance_id = "
            "(SELECT MIN(id) FROM instances WHERE study_id = ?)", [study_id])

    def study(self, study_id: int) -> tuple:
        return self.db.execute("SELECT state, error_reason, error_count FROM studies "
                               "WHERE id = ?", [study_id]).fetchone()


def _no_phi(records: list[logging.LogRecord], *uids: str) -> None:
    for record in records:
        text = record.getMessage() + json.dumps(record.__dict__, default=str)
        for secret in (*PHI_STRINGS, *uids):
            assert secret not in text, f"{secret!r} logged in {record.getMessage()}"


def test_an_unreadable_stored_image_ends_its_study_in_error_and_the_stream_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7001", images=2)
    good = home.receive("2.25.7002", images=1)
    home.corrupt_one_image(bad)
    worker = home.worker()
    assert worker.requeue_interrupted() == 0

    assert worker.run_once() == bad
    state, reason, count = home.study(bad)
    assert (state, count) == ("error", 1)
    assert reason == "stored images could not be read (ValueError)"
    results = home.db.execute("SELECT status, detail FROM study_results WHERE study_id = ?",
                              [bad]).fetchall()
    assert [(s, json.loads(d)["error"]) for s, d in results] == [("error", "images_unreadable")]
    assert home.db.execute("SELECT COUNT(*) FROM decisions WHERE study_id = ?",
                           [bad]).fetchone()[0] == 0  # the gate never saw it
    (logged,) = [r for r in caplog.records if r.getMessage() == "study_images_unreadable"]
    assert logged.levelno == logging.ERROR and logged.study_id == bad

    assert worker.run_once() == good  # the next study is scored as usual
    assert home.study(good)[0] == "scored"
    assert worker.run_once() is None
    assert home.db.execute("SELECT COUNT(*) FROM studies WHERE state = 'scoring'"
                           ).fetchone()[0] == 0
    assert home.metrics.scored.labels("error")._value.get() == 1.0

    # a late instance reopens the study; it is tried again and fails again: the first
    # failure of the new round (error_count is per round), both kept in the results
    home.receive("2.25.7001", images=1)
    assert worker.run_once() == bad
    assert home.study(bad)[0::2] == ("error", 1)
    assert home.db.execute("SELECT COUNT(*) FROM study_results WHERE study_id = ? AND "
                           "status = 'error'", [bad]).fetchone()[0] == 2
    _no_phi(caplog.records, "2.25.7001", "2.25.7002")


def test_studies_left_scoring_by_a_crash_are_scored_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Pipeline(tmp_path / "home")
    first, second = home.receive("2.25.8001", images=1), home.receive("2.25.8002", images=1)
    # the daemon died after taking both (one each in two runs): they are left `scoring`
    home.db.execute("UPDATE studies SET state = 'scoring' WHERE id IN (?, ?)", [first, second])

    worker = home.worker()
    assert worker.requeue_interrupted() == 2
    (logged,) = [r for r in caplog.records if r.getMessage() == "scoring_interrupted_requeued"]
    assert (logged.studies, logged.study_ids) == (2, [first, second])
    assert [worker.run_once(), worker.run_once(), worker.run_once()] == [first, second, None]
    assert {home.study(s)[0] for s in (first, second)} == {"scored"}
    _no_phi(caplog.records, "2.25.8001", "2.25.8002")


def _events(records: list[logging.LogRecord], name: str) -> list[logging.LogRecord]:
    return [r for r in records if r.getMessage() == name]


def test_an_unreadable_study_is_retried_with_growing_backoff_then_left_for_an_operator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7101", images=1)
    home.corrupt_one_image(bad)
    worker = home.worker()
    assert worker.run_once() == bad and home.study(bad)[0::2] == ("error", 1)
    # waits of 60 s, 300 s and 1800 s before the 2nd, 3rd and 4th try, counted from the
    # failed try; not a second earlier
    for count, wait in ((1, 60), (2, 300), (3, 1800)):
        home.now += wait - 1
        assert worker.run_once() is None and home.study(bad)[0::2] == ("error", count)
        home.now += 1
        assert worker.run_once() == bad
        assert home.study(bad)[0::2] == ("error", count + 1)
    retries = _events(caplog.records, "study_error_retry")
    assert [(r.study_id, r.attempt, r.of) for r in retries] == [(bad, 2, 4), (bad, 3, 4),
                                                               (bad, 4, 4)]
    # the tries are spent: it stays `error` for an operator, said once, loudly
    home.now += 7 * 86400
    assert worker.run_once() is None
    assert home.study(bad) == ("error", "stored images could not be read (ValueError)", 4)
    (left,) = _events(caplog.records, "study_error_left_for_operator")
    assert (left.study_id, left.attempts, left.levelno) == (bad, 4, logging.ERROR)
    assert [r.retry_in_seconds for r in _events(caplog.records, "study_images_unreadable")
            ] == [60, 300, 1800, None]
    assert home.db.execute("SELECT COUNT(*) FROM study_results WHERE study_id = ?",
                           [bad]).fetchone()[0] == 4  # one error result per try
    assert home.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0
    # a restarted worker keeps the schedule (it is read from the store)
    assert home.worker().run_once() is None
    _no_phi(caplog.records, "2.25.7101")


def test_a_study_whose_images_read_again_is_scored_at_its_retry(tmp_path: Path) -> None:
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7201", images=2)
    instance = home.db.execute("SELECT MIN(id) FROM instances WHERE study_id = ?",
                               [bad]).fetchone()[0]
    stored = home.db.execute("SELECT data FROM images WHERE instance_id = ?",
                             [instance]).fetchone()[0]
    home.corrupt_one_image(bad)
    worker = home.worker()
    assert worker.run_once() == bad and home.study(bad)[0] == "error"
    # the fault passes (a remounted disk, a restored backup): the same bytes are back
    home.db.execute("UPDATE images SET data = ? WHERE instance_id = ?", [stored, instance])
    home.now += 60
    assert worker.run_once() == bad
    assert home.study(bad)[0::2] == ("scored", 1)
    assert home.db.execute("SELECT COUNT(*) FROM decisions WHERE study_id = ?",
                           [bad]).fetchone()[0] == 1
    statuses = [row[0] for row in home.db.execute(
        "SELECT status FROM study_results WHERE study_id = ? ORDER BY id", [bad])]
    assert statuses[0] == "error" and statuses[1] != "error"


def test_no_retry_when_the_waits_are_configured_off(tmp_path: Path) -> None:
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7301", images=1)
    home.corrupt_one_image(bad)
    scorer = GateScorer(home.settings, home.db, home.metrics, clock=lambda: home.now)
    worker = ScoringWorker(home.db, scorer, home.metrics, clock=lambda: home.now,
                           error_retry_seconds=[])
    assert worker.run_once() == bad
    home.now += 30 * 86400
    assert worker.run_once() is None and home.study(bad)[0::2] == ("error", 1)


def test_a_late_instance_gives_a_study_left_for_an_operator_a_new_retry_schedule(
    tmp_path: Path,
) -> None:
    """`error_count` counts the failures of the current round: a late instance reopens a
    study whose tries were spent, and if it fails again it is retried again, instead of
    staying `error` for good."""
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7301", images=1)
    home.corrupt_one_image(bad)
    worker = home.worker()
    assert worker.run_once() == bad
    for wait in (60, 300, 1800):
        home.now += wait
        assert worker.run_once() == bad
    home.now += 7 * 86400
    assert worker.run_once() is None and home.study(bad)[0::2] == ("error", 4)
    assert home.receive("2.25.7301", images=1) == bad  # late instance: reopened, complete
    assert home.study(bad)[0::2] == ("complete", 0)
    assert worker.run_once() == bad  # the old image is still unreadable
    assert home.study(bad)[0::2] == ("error", 1)
    home.now += 60
    assert worker.run_once() == bad  # ...and retried on the schedule again
    assert home.study(bad)[0::2] == ("error", 2)


def test_a_failed_study_is_retried_after_the_wall_clock_stepped_back(tmp_path: Path) -> None:
    """The backoff counts from the failed try's wall-clock time: after NTP steps the clock
    back an hour, the study must not wait the hour on top of its 60 s."""
    home = Pipeline(tmp_path / "home")
    bad = home.receive("2.25.7401", images=1)
    home.corrupt_one_image(bad)
    worker = home.worker()
    assert worker.run_once() == bad and home.study(bad)[0::2] == ("error", 1)
    home.now -= 3600
    assert worker.run_once() == bad
    assert home.study(bad)[0::2] == ("error", 2)
    home.now += 299  # the next wait (300 s) counts from this try, on the stepped clock
    assert worker.run_once() is None
    home.now += 1
    assert worker.run_once() == bad
