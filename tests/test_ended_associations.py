"""The ingest loop's order for what ended associations stored: smallest first, and each
association's studies complete as soon as its last instance is read (real ReceivedStore,
Ingestor, StudyAssembler and SQLite file, driven in this process)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from conftest import store_environ

from triage.config import load_settings
from triage.daemon import Daemon
from triage.ingest.assembly import StudyAssembler
from triage.ingest.ingestor import Ingestor
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store

ANY_IMAGE = {"TRIAGE__SCOPE__MODALITIES": "[]", "TRIAGE__SCOPE__BODY_PARTS": "[]",
             "TRIAGE__INGEST__MIN_FREE_BYTES": "0"}


def _instance(folder: Path, study_uid: str, number: int, modality: str) -> bytes:
    pixels = np.random.default_rng(number).integers(0, 4000, (32, 32)).astype(np.int16)
    ds = image_dataset(pixels, modality=modality, study_uid=study_uid, instance_number=number)
    return write_dataset(ds, folder / f"{modality}{number}.dcm").read_bytes()


def _two_associations(tmp_path: Path, series: str, single: str):  # type: ignore[no-untyped-def]
    """A daemon (not started) whose received store holds what two associations stored:
    40 CT instances of ``series`` from CTSCAN, one DX of ``single`` from DXROOM."""
    home = tmp_path / "home"
    settings = load_settings(None, home=home, environ={**store_environ(home), **ANY_IMAGE})
    for name in ("inbox", "archive", "quarantine", "models", "logs", "received"):
        settings.path(name).mkdir(parents=True, exist_ok=True)
    store.connect(settings.database()).close()
    daemon = Daemon(settings)
    large = [daemon.received.accept(_instance(tmp_path / "src", series, i, "CT"),
                                    origin="dicom", sender="CTSCAN") for i in range(1, 41)]
    small = [daemon.received.accept(_instance(tmp_path / "src", single, 99, "DX"),
                                    origin="dicom", sender="DXROOM")]
    return settings, daemon, large, small


def test_a_small_association_that_ended_after_a_large_one_is_read_and_completed_first(
    tmp_path: Path,
) -> None:
    series, single = "2.25.1001", "2.25.1002"
    settings, daemon, large, small = _two_associations(tmp_path, series, single)
    daemon.association_ended(large)  # the long series ended first...
    daemon.association_ended(small)  # ...the single image just after it
    db = store.connect(settings.database())
    ingestor = Ingestor(settings, db, daemon.metrics)
    assembler = StudyAssembler(db, daemon.metrics, 3600.0, time.time)
    completed_when: dict[str, int] = {}
    sent: list[list[int]] = []
    original = assembler.complete_sent

    def spy(file_ids):  # records how many files were read when each study completed
        done = original(file_ids)
        if done:
            read = db.execute("SELECT COUNT(*) FROM files WHERE state != 'received'"
                              ).fetchone()[0]
            for uid in (row[0] for row in db.execute(
                    f"SELECT study_uid FROM studies WHERE id IN ({','.join('?' * len(done))})",
                    done)):
                completed_when[uid] = read
        return done

    assembler.complete_sent = spy
    assert daemon._read_ended(ingestor, assembler, sent)
    order = [row[0] for row in db.execute(
        "SELECT sender FROM files JOIN instances ON instances.id = files.instance_id "
        "ORDER BY instances.id")]
    assert order == ["DXROOM"] + ["CTSCAN"] * 40  # the single image was read first
    # ...and its study completed before the series was read (one batch in), not after it
    assert completed_when[single] < 41 and completed_when[series] == 41
    assert sent == [] and daemon._scoring_wake.is_set()
    states = dict(db.execute("SELECT study_uid, state FROM studies"))
    assert states == {series: "complete", single: "complete"}


def test_an_association_that_ends_while_another_is_read_is_taken_up_after_the_instance_in_hand(
    tmp_path: Path,
) -> None:
    """A single image whose association ends while a 40-instance series is being read
    does not wait for the rest of the batch of eight: it is read after the series'
    instance in hand (the second here). Without the stop between instances it came
    eighth."""
    series, single = "2.25.2001", "2.25.2002"
    settings, daemon, large, small = _two_associations(tmp_path, series, single)
    daemon.association_ended(large)
    db = store.connect(settings.database())
    ingestor = Ingestor(settings, db, daemon.metrics)
    assembler = StudyAssembler(db, daemon.metrics, 3600.0, time.time)
    process = ingestor._process
    read: list[int] = []

    def reading(file_id, *args):  # the DX association ends while the 2nd CT is read
        read.append(file_id)
        if len(read) == 2:
            daemon.association_ended(small)
        return process(file_id, *args)

    ingestor._process = reading
    assert daemon._read_ended(ingestor, assembler, [])
    order = [row[0] for row in db.execute(
        "SELECT sender FROM files JOIN instances ON instances.id = files.instance_id "
        "ORDER BY instances.id")]
    assert order == ["CTSCAN", "CTSCAN", "DXROOM"] + ["CTSCAN"] * 38
    states = dict(db.execute("SELECT study_uid, state FROM studies"))
    assert states == {series: "complete", single: "complete"}
