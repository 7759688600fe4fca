"""The study view reads the store, never the archive: what it shows of each header
(window and which preset it is, descriptions, reading order) is kept at ingest. Real
DICOM files through the real ingestor into a real SQLite file, viewed through the real
FastAPI app."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydicom.multival import MultiValue
from pydicom.valuerep import DSfloat

from conftest import store_settings

from triage.api.app import create_app
from triage.config import ScopeSettings, Settings
from triage.daemon import Daemon
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.model.settings import ModelSettings
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.review.auth import create_token
from triage.review.queue import enqueue
from triage.store import db as store
from triage.telemetry.metrics import build_metrics

TINY = ModelSettings(input_size=32, channels=(4, 8), subunits=1, lossnet_width=8, mc_samples=3)
CT_SCOPE = ScopeSettings(modalities=["CT"])  # CT series with window presets
STUDY = "2.25.6160"
AXIAL = [1, 0, 0, 0, 1, 0]
# (slice z, instance number) in arrival order; the view lists them by position
SLICES = [(10.0, 3), (-5.0, 1), (2.5, 2)]
LUNG, MEDIASTINUM = (-600.0, 1500.0), (40.0, 400.0)


def two_window_ct(path: Path, *, z: float, number: int, seed: int = 0) -> Path:
    """A CT slice whose header gives two VOI presets (lung, then mediastinum), as many
    scanners write them, with a study and a series description."""
    pixels = np.random.default_rng(seed).normal(40, 200, (32, 32)).astype(np.int16)
    ds = image_dataset(pixels, study_uid=STUDY, series_uid=STUDY + ".1",
                       instance_number=number)
    ds.WindowCenter = [LUNG[0], MEDIASTINUM[0]]
    ds.WindowWidth = [LUNG[1], MEDIASTINUM[1]]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.ImageOrientationPatient = AXIAL
    ds.ImagePositionPatient = [0, 0, z]
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Thorax 1.0 B70f"
    ds.StudyDescription = "CT THORAX"
    return write_dataset(ds, path)


class Viewed:
    """A study ingested by the real ingestor, routed to the queue, and the app to view it."""

    def __init__(self, home: Path) -> None:
        self.settings = Settings(home=home, store=store_settings(home), model=TINY,
                                 scope=CT_SCOPE)
        self.settings.path("inbox").mkdir(parents=True)
        self.db = store.connect(self.settings.database())
        ingestor = Ingestor(self.settings, self.db, build_metrics(CollectorRegistry()))
        for k, (z, number) in enumerate(SLICES):
            path = two_window_ct(self.settings.path("inbox") / f"{k}.dcm", z=z, number=number,
                                 seed=k)
            assert ingestor.ingest(ReadyFile(path)) == "archived"
        self.study_id = int(self.db.execute("SELECT id FROM studies").fetchone()[0])
        route(self.db, self.study_id)
        _, self.token = create_token(self.db, name="Dr Test", role="radiologist")
        self.client = TestClient(create_app(Daemon(self.settings)))

    def view(self) -> dict:
        response = self.client.get(f"/api/studies/{self.study_id}",
                                   headers={"Authorization": f"Bearer {self.token}"})
        assert response.status_code == 200, response.text
        return response.json()

    def hide_archive(self) -> None:
        """Take the archived files away: whatever the view still shows came from the store."""
        archive = self.settings.path("archive")
        shutil.move(archive, archive.with_name("archive.away"))


def route(db, study_id: int) -> None:  # type: ignore[no-untyped-def]
    """A routed decision with its queue item, stored as the scoring worker stores them."""
    with store.transaction(db):
        result = db.execute("INSERT INTO study_results (study_id, round, status, created_at) "
                            "VALUES (?, 1, 'routed', 0)", [study_id]).lastrowid
        decision = db.execute(
            "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
            "strategy, needs_label, reason, combined, decision) "
            "VALUES (?, ?, 1, 1, 0, 'combined', 1, 'uncertainty', 0.9, '{}')",
            [result, study_id]).lastrowid
        enqueue(db, study_id=study_id, decision_id=int(decision), reason="uncertainty",
                combined=0.9, now=0.0)


EXPECTED_PRESET = {"index": 0, "count": 2, "explanation": "LUNG"}
CACHE_COLUMNS = ("view_cached", "window_center", "window_width", "window_index",
                 "window_count", "window_explanation", "series_description",
                 "study_description")


def test_the_study_view_reads_the_store_not_the_archive(tmp_path: Path) -> None:
    home = Viewed(tmp_path / "home")
    home.hide_archive()
    view = home.view()
    assert view["description"] == "CT THORAX"
    images = view["images"]
    # reading order: along the slice normal, as the study is scored, not arrival order
    numbers = dict(home.db.execute("SELECT id, instance_number FROM instances").fetchall())
    assert [numbers[image["instance_id"]] for image in images] == [1, 2, 3]
    for image in images:
        assert image["series_description"] == "Thorax 1.0 B70f"
        assert image["window"] == list(LUNG)
        assert image["window_preset"] == EXPECTED_PRESET
        assert (image["rows"], image["cols"], image["frames"]) == (32, 32, 1)


def test_instances_stored_before_the_cache_are_read_once_then_served_from_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Viewed(tmp_path / "home")
    # take the store back to schema 7 (instances without a copy of their header), then
    # let it migrate again, as a store written by the previous version is upgraded
    # (the columns of the later steps go too: 9 the files' origin, 10 the scope reason,
    # 11 the forgetting table, 12 the gate's batch buffer, 13 the replicas)
    for table in ("gate_buffer", "forgetting", "replicas", "leases"):
        home.db.execute(f"DROP TABLE {table}")
    home.db.execute("DROP INDEX files_origin")
    home.db.execute("DROP INDEX files_replica_state")
    for table, column in [*(("instances", c) for c in CACHE_COLUMNS), ("files", "origin"),
                          ("files", "sender"), ("instances", "scope_reason"),
                          ("files", "replica"), ("studies", "claimed_by"),
                          ("retrain_runs", "replica")]:
        home.db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    home.db.execute("PRAGMA user_version = 7")
    home.db.close()
    home.db = store.connect(home.settings.database())
    assert store.schema_version(home.db) == len(store.MIGRATIONS) == 13
    assert home.db.execute("SELECT SUM(view_cached) FROM instances").fetchone()[0] == 0
    first = home.view()  # reads the three headers and keeps what it needs
    (logged,) = [r for r in caplog.records if r.getMessage() == "study_view_headers_cached"]
    assert logged.instances == 3
    assert home.db.execute("SELECT SUM(view_cached) FROM instances").fetchone()[0] == 3
    home.hide_archive()
    assert home.view()["images"] == first["images"]  # no file needed any more
    assert first["images"][0]["window_preset"] == EXPECTED_PRESET


def test_multi_valued_windows_are_read_deliberately(tmp_path: Path) -> None:
    from triage.ingest.dicom import window_choice

    path = two_window_ct(tmp_path / "ct.dcm", z=0.0, number=1)
    ds = pydicom.dcmread(path)
    assert isinstance(ds.WindowCenter, MultiValue) and len(ds.WindowCenter) == 2
    default = window_choice(ds)
    assert default is not None
    assert (default.centre, default.width, default.index, default.count,
            default.explanation) == (*LUNG, 0, 2, "LUNG")
    second = window_choice(ds, preset=1)
    assert second is not None
    assert (second.centre, second.width, second.explanation) == (*MEDIASTINUM, "MEDIASTINUM")
    assert window_choice(ds, preset=2) is None  # there is no third preset
    ds.WindowCenter = DSfloat(50.0)  # single-valued: one preset, no explanation needed
    ds.WindowWidth = DSfloat(350.0)
    del ds.WindowCenterWidthExplanation
    single = window_choice(ds)
    assert single is not None and (single.index, single.count, single.explanation) == (0, 1, None)
