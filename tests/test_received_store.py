"""ReceivedStore, the durability step in front of every Success (real files, real store):
what an accepted instance leaves, what a refused one does not, and what start-up does with
what a crash or a power cut left in the received folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import store_environ

from triage.config import load_settings
from triage.ingest.dicom import (
    DOES_NOT_MATCH_SOP_CLASS,
    InstanceRefused,
    check_received,
)
from triage.ingest.received import ReceivedStore, StoreFailed
from triage.errors import DicomRejected
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store


@pytest.fixture
def received(tmp_path: Path):
    home = tmp_path / "home"
    settings = load_settings(None, home=home, environ={
        **store_environ(home), "TRIAGE__INGEST__MIN_FREE_BYTES": "1000"})
    store.connect(settings.database()).close()
    free = {"bytes": 10**12}
    made = ReceivedStore(settings, disk_free=lambda: free["bytes"])
    yield settings, made, free
    made.close()


def _instance(tmp_path: Path) -> bytes:
    pixels = np.arange(256, dtype=np.int16).reshape(16, 16)
    return write_dataset(image_dataset(pixels, modality="DX", study_uid="2.25.42"),
                         tmp_path / "dx.dcm").read_bytes()


def _rows(settings) -> list[tuple]:
    db = store.connect(settings.database())
    try:
        return [tuple(row) for row in db.execute(
            "SELECT inbox_path, sha256, size, state, origin, sender FROM files ORDER BY id")]
    finally:
        db.close()


def test_an_accepted_instance_is_a_complete_file_under_its_origins_name_and_a_row(
        received, tmp_path: Path) -> None:
    settings, store_, _ = received
    data = _instance(tmp_path)
    checked = []
    file_id = store_.accept(data, origin="stow", sender="viewer",
                            check=lambda b: checked.append(check_received(b)))
    [(name, sha, size, state, origin, sender)] = _rows(settings)
    assert file_id > 0 and checked[0].study_uid == "2.25.42"
    assert name.startswith("stow-") and name.endswith(".dcm")
    assert (settings.path("received") / name).read_bytes() == data
    assert (sha, size, state, origin, sender) == (
        hashlib.sha256(data).hexdigest(), len(data), "received", "stow", "viewer")
    assert sorted(p.name for p in settings.path("received").iterdir()) == [name]


def test_a_refused_instance_leaves_nothing_and_its_refusal_comes_before_a_full_disk(
        received, tmp_path: Path) -> None:
    settings, store_, free = received
    data = _instance(tmp_path)

    def refuse(_: bytes) -> None:
        raise InstanceRefused(DicomRejected("truncated", "pixel data is short"),
                              DOES_NOT_MATCH_SOP_CLASS, None)

    with pytest.raises(InstanceRefused, match="pixel data is short"):
        store_.accept(data, origin="dicom", sender="CT1", check=refuse)
    free["bytes"] = 0  # the disk is low too: the sender is still told what is wrong
    with pytest.raises(InstanceRefused):
        store_.accept(data, origin="dicom", sender="CT1", check=refuse)
    with pytest.raises(StoreFailed, match="min_free_bytes") as failed:
        store_.accept(data, origin="dicom", sender="CT1", check=check_received)
    assert failed.value.out_of_resources
    assert _rows(settings) == []
    assert list(settings.path("received").iterdir()) == []


def test_start_up_journals_complete_files_left_without_a_row_and_drops_partial_ones(
        received, tmp_path: Path) -> None:
    """A crash between rename and row, or a power cut taking a row that was committed
    without a sync: the complete file is journaled again, with the origin in its name."""
    settings, store_, _ = received
    data = _instance(tmp_path)
    folder = settings.path("received")
    kept = store_.accept(data, origin="dicom", sender="CT1")
    (folder / "stow-0a1b.dcm").write_bytes(data)  # renamed, its row never written
    (folder / "0c1d.dcm").write_bytes(data)  # a name from before the origin was in it
    (folder / "dicom-0e1f.dcm.partial").write_bytes(data[:100])  # never acknowledged
    assert store_.adopt_orphans() == 2
    rows = {row[0]: row for row in _rows(settings)}
    assert set(rows) == {_rows(settings)[0][0], "stow-0a1b.dcm", "0c1d.dcm"}
    assert rows["stow-0a1b.dcm"][3:] == ("received", "stow", None)
    assert rows["0c1d.dcm"][3:] == ("received", "dicom", None)
    assert rows["stow-0a1b.dcm"][1] == hashlib.sha256(data).hexdigest()
    assert not (folder / "dicom-0e1f.dcm.partial").exists()
    assert kept and store_.adopt_orphans() == 0  # once
