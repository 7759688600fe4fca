"""Restart recovery of the ingestion journal, one crash point at a time (real SQLite)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from conftest import make_image, store_environ
from prometheus_client import CollectorRegistry

from triage.config import load_settings
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.store import db as store
from triage.telemetry.metrics import build_metrics


@pytest.fixture
def setup(tmp_path: Path):
    settings = load_settings(None, home=tmp_path / "home", environ=store_environ(tmp_path / "home"))
    settings.path("inbox").mkdir(parents=True)
    db = store.connect(settings.database())
    yield settings, db, Ingestor(settings, db, build_metrics(CollectorRegistry()))
    db.close()


def _journal(settings, db, rel: str, data: bytes, state: str, **extra) -> int:
    """A journal row as the daemon of this home writes it (its replica's)."""
    sha = hashlib.sha256(data).hexdigest()
    replica = settings.replica_name()
    with store.transaction(db):
        cursor = db.execute(
            "INSERT INTO files (inbox_path, sha256, size, state, received_at, replica) "
            "VALUES (?, ?, ?, ?, 0, ?)",
            [rel, sha, len(data), state, replica],
        )
        for key, value in extra.items():
            db.execute(f"UPDATE files SET {key} = ? WHERE id = ?", [value, cursor.lastrowid])
    return int(cursor.lastrowid)


def _states(db) -> list[tuple]:
    return db.execute("SELECT state, reason_code FROM files ORDER BY id").fetchall()


def test_crash_while_reading_is_retried_then_quarantined(setup) -> None:
    settings, db, ingestor = setup
    path = make_image(settings.path("inbox") / "a.dcm", seed=1)
    _journal(settings, db, "a.dcm", path.read_bytes(), "reading")
    assert ingestor.recover() == 1
    assert _states(db) == [("archived", None)]

    path = make_image(settings.path("inbox") / "b.dcm", seed=2)
    _journal(settings, db, "b.dcm", path.read_bytes(), "reading",
             attempts=settings.ingest.max_read_attempts)
    ingestor.recover()
    assert _states(db)[-1] == ("quarantined", "reader_crashed")
    assert not path.exists()


def test_crash_after_move_before_commit_finishes_without_duplicating(setup) -> None:
    settings, db, ingestor = setup
    path = make_image(settings.path("inbox") / "c.dcm", seed=3)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    stored = f"archive/{sha[:2]}/{sha[2:4]}/{sha}.dcm"
    _journal(settings, db, "c.dcm", data, "moving", target_state="archived", stored_path=stored)
    (settings.home / stored).parent.mkdir(parents=True)
    shutil.move(path, settings.home / stored)
    ingestor.recover()
    assert _states(db) == [("archived", None)]
    assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1
    # the same bytes sent again are a duplicate of the recovered instance, and are removed
    again = settings.path("inbox") / "c-again.dcm"
    shutil.copyfile(settings.home / stored, again)
    assert ingestor.ingest(ReadyFile(again)) == "duplicate"
    assert not again.exists() and (settings.home / stored).exists()


def test_crash_before_move_moves_and_commits(setup) -> None:
    settings, db, ingestor = setup
    path = make_image(settings.path("inbox") / "d.dcm", seed=4)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    stored = f"archive/{sha[:2]}/{sha[2:4]}/{sha}.dcm"
    _journal(settings, db, "d.dcm", data, "moving", target_state="archived", stored_path=stored)
    ingestor.recover()
    assert _states(db) == [("archived", None)]
    assert (settings.home / stored).exists() and not path.exists()


def test_crash_during_quarantine_and_duplicate_removal(setup) -> None:
    settings, db, ingestor = setup
    junk = settings.path("inbox") / "junk.dcm"
    junk.write_text("not dicom")
    _journal(
        settings, db,
        "junk.dcm",
        junk.read_bytes(),
        "moving",
        target_state="quarantined",
        reason_code="not_dicom",
        reason="not a DICOM file",
        stored_path="quarantine/1-not_dicom.dcm",
    )
    original = make_image(settings.path("inbox") / "e.dcm", seed=5)
    assert ingestor.ingest(ReadyFile(original)) == "archived"
    copy_bytes = (
        settings.home / db.execute("SELECT path FROM instances").fetchone()[0]
    ).read_bytes()
    # the duplicate was already deleted when the process died
    _journal(settings, db, "e-copy.dcm", copy_bytes, "moving", target_state="duplicate")
    ingestor.recover()
    assert _states(db) == [("quarantined", "not_dicom"), ("archived", None), ("duplicate", None)]
    assert (settings.home / "quarantine" / "1-not_dicom.dcm").exists()
    assert (settings.home / "quarantine" / "1-not_dicom.json").exists()


def test_file_gone_while_down_is_recorded_as_vanished(setup) -> None:
    settings, db, ingestor = setup
    _journal(settings, db, "never-here.dcm", b"x", "reading")
    ingestor.recover()
    assert _states(db) == [("vanished", None)]


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    db = store.connect(tmp_path / "t.db")
    db.execute(f"PRAGMA user_version = {len(store.MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer than this triage"):
        store.connect(tmp_path / "t.db")
