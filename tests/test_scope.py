"""Scope routing: images the model is not for are archived `out_of_scope`, never scored.

Real DICOM (pydicom's own test files and files written here), the real ingestor on a
real SQLite store, and a real daemon scraped over HTTP; no mocks.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from conftest import PHI_STRINGS, REPO, DaemonProcess, make_image, store_rows
from prometheus_client import CollectorRegistry
from pydicom.uid import generate_uid

from triage.config import ScopeSettings, Settings, load_settings
from triage.ingest.assembly import StudyAssembler
from triage.ingest.ingestor import Ingestor
from triage.ingest.scope import check_scope
from triage.ingest.watcher import ReadyFile
from triage.model.settings import ModelSettings
from triage.ops.status import collect_status, format_status
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store
from triage.store.images import load_study_images
from triage.telemetry.metrics import build_metrics

TINY = ModelSettings(input_size=32, channels=(4, 8), subunits=1, lossnet_width=8, mc_samples=3)
CT_REASON = "out of scope: modality CT is not in scope.modalities [CR, DX]"
MR_REASON = "out of scope: modality MR is not in scope.modalities [CR, DX]"


class Home:
    """A state directory with the real ingestor and study assembler on its store."""

    def __init__(self, root: Path, settings: Settings | None = None) -> None:
        self.settings = settings or Settings(home=root, model=TINY)
        self.settings.path("inbox").mkdir(parents=True, exist_ok=True)
        self.db = store.connect(self.settings.database())
        self.registry = CollectorRegistry()
        self.metrics = build_metrics(self.registry)
        self.now = 1_000_000.0
        self.ingestor = Ingestor(self.settings, self.db, self.metrics, lambda: self.now)
        self.assembler = StudyAssembler(self.db, self.metrics, 5.0, lambda: self.now)
        self.count = 0

    def ingest(self, source: Path) -> str | None:
        self.count += 1
        target = self.settings.path("inbox") / f"{self.count:03d}_{source.name}"
        shutil.copyfile(source, target)
        return self.ingestor.ingest(ReadyFile(target))

    def complete(self) -> None:
        self.now += 3600
        self.assembler.complete_due()

    def file(self, count: int) -> dict:
        return next(iter(self.db.query("SELECT * FROM files WHERE id = ?", [count])))

    def instance(self, sop_uid: str) -> dict:
        return next(iter(self.db.query("SELECT * FROM instances WHERE sop_uid = ?", [sop_uid])))

    def study_state(self, study_uid: str) -> str:
        return self.db.execute("SELECT state FROM studies WHERE study_uid = ?",
                               [study_uid]).fetchone()[0]

    def out_of_scope_count(self, reason: str) -> float:
        value = self.registry.get_sample_value("triage_out_of_scope_instances_total",
                                               {"reason": reason})
        return value or 0.0


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path / "home")


def _uids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPInstanceUID), str(ds.StudyInstanceUID)


def test_pydicom_ct_and_mr_are_archived_out_of_scope_and_never_scored(
    home: Home, pydicom_files: Path
) -> None:
    for name, reason in (("CT_small.dcm", CT_REASON), ("MR_small.dcm", MR_REASON)):
        source = pydicom_files / name
        assert home.ingest(source) == "out_of_scope"
        row = home.file(home.count)
        assert (row["state"], row["reason_code"], row["reason"]) == (
            "out_of_scope", "modality", reason)
        # kept in the content-addressed archive, byte for byte, and accounted for
        stored = home.settings.home / row["stored_path"]
        assert stored.is_file() and row["stored_path"].startswith("archive/")
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row["sha256"]
        assert not list(home.settings.path("inbox").iterdir())
        sop_uid, study_uid = _uids(source)
        instance = home.instance(sop_uid)
        assert (instance["scoreable"], instance["note"], instance["scope_reason"],
                instance["frames"]) == (0, reason, "modality", 0)
        assert instance["path"] == row["stored_path"] and row["instance_id"] == instance["id"]
        assert home.db.execute("SELECT COUNT(*) FROM images WHERE instance_id = ?",
                               [instance["id"]]).fetchone()[0] == 0
    home.complete()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        assert home.study_state(_uids(pydicom_files / name)[1]) == "out_of_scope"
    # nothing reached the scorer
    assert home.db.execute("SELECT COUNT(*) FROM studies WHERE state = 'complete'"
                           ).fetchone()[0] == 0
    assert home.out_of_scope_count("modality") == 2
    assert home.registry.get_sample_value("triage_ingest_files_total",
                                          {"outcome": "out_of_scope"}) == 2
    status = collect_status(home.settings)
    assert status["files"]["out_of_scope"] == 2 and status["studies"]["out_of_scope"] == 2
    assert status["studies"]["unscoreable"] == 0
    text = format_status(status)
    assert "out_of_scope" in text


def test_an_out_of_scope_series_costs_no_pixel_decode(home: Home, tmp_path: Path) -> None:
    """A "600-slice CT" whose header declares far more pixels than ingest.max_pixels and
    than the file holds: in scope it would be rejected by the decoding step; out of
    scope it is archived from its header alone."""
    def big_series(modality: str) -> Path:
        ds = image_dataset(np.zeros((8, 8), np.int16), modality=modality)
        ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, 600  # 157 M values declared
        return write_dataset(ds, tmp_path / f"{modality}.dcm")

    assert home.ingest(big_series("CT")) == "out_of_scope"
    assert home.file(home.count)["reason_code"] == "modality"
    assert home.ingest(big_series("DX")) == "quarantined"  # the same header, decoded
    assert home.file(home.count)["reason_code"] in ("too_large", "truncated")


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # ' chest ' on purpose
def test_body_part_photometric_and_size_reasons(tmp_path: Path, pydicom_files: Path) -> None:
    home = Home(tmp_path / "home")
    hand = make_image(tmp_path / "hand.dcm", body_part="HAND", seed=1)
    assert home.ingest(hand) == "out_of_scope"
    row = home.file(home.count)
    assert row["reason_code"] == "body_part"
    assert row["reason"] == ("out of scope: body part HAND is not in scope.body_parts "
                             "[CHEST, THORAX, LUNG]")
    # compared case-insensitively, stripped; a missing body part passes by default
    for k, part in enumerate((" chest ", "Thorax", None)):
        path = make_image(tmp_path / f"in{k}.dcm", body_part=part, seed=10 + k)
        assert home.ingest(path) == "archived", part
    tiny = make_image(tmp_path / "tiny.dcm", size=8, seed=2)
    assert home.ingest(tiny) == "out_of_scope"
    row = home.file(home.count)
    assert row["reason_code"] == "size" and "8 x 8 pixels" in row["reason"]
    assert "scope.min_rows x scope.min_cols (16 x 16)" in row["reason"]
    # a CR spine film: the modality is in scope, the body part is not
    cspine = pydicom_files / "dicomdirtests" / "77654033" / "CR1" / "6154"
    assert home.ingest(cspine) == "out_of_scope"
    assert home.file(home.count)["reason_code"] == "body_part"
    assert "CSPINE" in home.file(home.count)["reason"]
    assert home.out_of_scope_count("body_part") == 2
    assert home.out_of_scope_count("size") == 1
    assert home.out_of_scope_count("modality") == 0

    # colour, once any modality is admitted: the photometric check
    colour = Home(tmp_path / "colour", Settings(home=tmp_path / "colour", model=TINY,
                                                scope=ScopeSettings(modalities=[])))
    assert colour.ingest(pydicom_files / "SC_rgb_rle.dcm") == "out_of_scope"
    row = colour.file(colour.count)
    assert row["reason_code"] == "photometric"
    assert row["reason"] == ("out of scope: photometric interpretation RGB is not in "
                             "scope.photometric [MONOCHROME1, MONOCHROME2]")
    assert colour.out_of_scope_count("photometric") == 1


def test_the_checks_run_in_order_and_empty_lists_admit_anything() -> None:
    scope = ScopeSettings()
    fields = {"modality": "dx", "body_part": "chest", "photometric": "monochrome1",
              "rows": 16, "cols": 16}
    assert check_scope(scope, **fields) is None
    assert check_scope(scope, **{**fields, "modality": "CT", "rows": 2}).code == "modality"
    assert check_scope(scope, **{**fields, "modality": None}).reason.startswith(
        "out of scope: modality (missing)")
    assert check_scope(scope, **{**fields, "body_part": "SKULL", "photometric": "RGB"}
                       ).code == "body_part"
    assert check_scope(scope, **{**fields, "photometric": None}) is None  # read as MONO2
    assert check_scope(scope, **{**fields, "cols": 15}).code == "size"
    strict = ScopeSettings(accept_missing_body_part=False)
    assert check_scope(strict, **{**fields, "body_part": "  "}).code == "body_part"
    anything = ScopeSettings(modalities=[], body_parts=[], photometric=[], min_rows=1,
                             min_cols=1, accept_missing_body_part=False)
    assert check_scope(anything, modality=None, body_part=None, photometric="RGB", rows=1,
                       cols=1) is None


def test_non_images_stay_unsupported_whatever_their_modality(
    home: Home, pydicom_files: Path
) -> None:
    """Precedence: an object that holds no scoreable image (no pixel data, or a modality
    in ingest.unscored_modalities) is `unsupported`, not out of scope."""
    for name in ("rtdose.dcm", "rtplan.dcm", "test-SR.dcm"):
        assert home.ingest(pydicom_files / name) == "unsupported", name
    assert home.db.execute("SELECT COUNT(*) FROM instances WHERE scope_reason IS NOT NULL"
                           ).fetchone()[0] == 0
    home.complete()
    states = {row[0] for row in home.db.execute("SELECT state FROM studies").fetchall()}
    assert states == {"unscoreable"}


def test_a_mixed_study_is_scored_on_its_in_scope_images_and_a_late_one_reopens_it(
    home: Home, tmp_path: Path, pydicom_files: Path
) -> None:
    study = "2.25.73001"
    ct = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    ct.StudyInstanceUID, ct.SOPInstanceUID = study, generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.save_as(tmp_path / "ct.dcm")
    assert home.ingest(tmp_path / "ct.dcm") == "out_of_scope"
    home.complete()
    assert home.study_state(study) == "out_of_scope"
    # a chest film of the same study arrives late: reopened, complete, scored on it alone
    assert home.ingest(make_image(tmp_path / "dx.dcm", study_uid=study, seed=3)) == "archived"
    assert home.study_state(study) == "open"
    home.complete()
    assert home.study_state(study) == "complete"
    ((study_id, n_instances, n_images),) = home.db.execute(
        "SELECT id, n_instances, n_images FROM studies WHERE study_uid = ?", [study]).fetchall()
    assert (n_instances, n_images) == (2, 1)
    images = load_study_images(home.db, study_id)
    assert tuple(images.shape) == (1, 1, TINY.input_size, TINY.input_size)
    assert home.registry.get_sample_value("triage_studies_reopened_total") == 1


def test_an_out_of_scope_duplicate_is_a_duplicate(home: Home, pydicom_files: Path) -> None:
    assert home.ingest(pydicom_files / "CT_small.dcm") == "out_of_scope"
    assert home.ingest(pydicom_files / "CT_small.dcm") == "duplicate"
    original, again = home.file(1), home.file(2)
    assert again["instance_id"] == original["instance_id"]
    assert home.out_of_scope_count("modality") == 1


def test_the_out_of_scope_event_names_the_reason_and_no_patient(
    home: Home, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    assert home.ingest(make_image(tmp_path / "ct.dcm", modality="CT", body_part="HEAD")
                       ) == "out_of_scope"
    (record,) = [r for r in caplog.records if r.getMessage() == "file_out_of_scope"]
    assert (record.reason_code, record.modality, record.body_part) == ("modality", "CT", "HEAD")
    assert (record.rows, record.cols) == (64, 64)
    text = " ".join(f"{k}={v}" for k, v in record.__dict__.items())
    note = home.db.execute("SELECT note FROM instances").fetchone()[0]
    for secret in PHI_STRINGS:
        assert secret not in text and secret not in note


def test_the_shipped_scope_and_an_environment_override(tmp_path: Path,
                                                       pydicom_files: Path) -> None:
    config = REPO / "config.yaml"
    shipped = load_settings(config, home=tmp_path / "a", environ={})
    assert shipped.scope == ScopeSettings()
    first = Home(tmp_path / "a", shipped.model_copy(update={"model": TINY}))
    assert first.ingest(pydicom_files / "CT_small.dcm") == "out_of_scope"
    widened = load_settings(config, home=tmp_path / "b",
                            environ={"TRIAGE__SCOPE__MODALITIES": "[CR, DX, CT]"})
    second = Home(tmp_path / "b", widened.model_copy(update={"model": TINY}))
    assert second.ingest(pydicom_files / "CT_small.dcm") == "archived"
    second.complete()
    assert second.study_state(_uids(pydicom_files / "CT_small.dcm")[1]) == "complete"
    narrowed = load_settings(config, home=tmp_path / "c", environ={
        "TRIAGE__SCOPE__BODY_PARTS": "[CHEST]", "TRIAGE__SCOPE__MIN_ROWS": "128"})
    third = Home(tmp_path / "c", narrowed.model_copy(update={"model": TINY}))
    assert third.ingest(make_image(tmp_path / "t.dcm", body_part="THORAX")) == "out_of_scope"
    assert third.file(third.count)["reason_code"] == "body_part"
    assert third.ingest(make_image(tmp_path / "s.dcm", seed=4)) == "out_of_scope"
    assert third.file(third.count)["reason_code"] == "size"


def test_the_pydicom_corpus_under_the_default_scope(home: Home, pydicom_files: Path) -> None:
    """None of pydicom's test images is a chest radiograph: under the default scope every
    file ends in a final state and not one image is archived for scoring."""
    corpus = sorted(p for p in pydicom_files.rglob("*") if p.is_file())
    for path in corpus:
        assert home.ingest(path) in store.FINAL_FILE_STATES, path.name
    files = store.count_by(home.db, "files", "state")
    assert sum(files.values()) == len(corpus)
    assert files.get("archived", 0) == 0
    assert files["out_of_scope"] > 50 and files["unsupported"] > 10
    assert home.db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 0
    by_reason = dict(home.db.execute(
        "SELECT scope_reason, COUNT(*) FROM instances WHERE scope_reason IS NOT NULL "
        "GROUP BY scope_reason").fetchall())
    assert by_reason["modality"] > 40 and by_reason["body_part"] >= 3
    for reason, count in by_reason.items():
        assert home.out_of_scope_count(reason) == count


def _rows(proc: DaemonProcess, sql: str) -> list[tuple]:
    return store_rows(proc.home, sql)


def test_a_running_daemon_scores_only_what_is_in_scope(
    daemon: DaemonProcess, pydicom_files: Path, tmp_path: Path
) -> None:
    mixed = "2.25.73002"
    shutil.copyfile(pydicom_files / "CT_small.dcm", daemon.inbox / "ct.dcm")
    shutil.copyfile(pydicom_files / "MR_small.dcm", daemon.inbox / "mr.dcm")
    make_image(daemon.inbox / "chest.dcm", study_uid="2.25.73003", seed=1)
    make_image(daemon.inbox / "hand.dcm", study_uid="2.25.73004", body_part="HAND", seed=2)
    make_image(daemon.inbox / "tiny.dcm", study_uid="2.25.73005", size=8, seed=3)
    make_image(daemon.inbox / "mixed_dx.dcm", study_uid=mixed, seed=4)
    make_image(daemon.inbox / "mixed_ct.dcm", study_uid=mixed, modality="CT", seed=5)
    status = daemon.wait_for(
        lambda s: s["studies"]["scored"] == 2 and s["studies"]["out_of_scope"] == 4,
        60, "two studies scored and four out of scope")
    assert status["files"]["out_of_scope"] == 5 and status["files"]["archived"] == 2
    assert status["studies"]["unscoreable"] == 0 and status["studies"]["total"] == 6
    scored = _rows(daemon, "SELECT studies.study_uid, studies.n_instances, studies.n_images "
                           "FROM study_results JOIN studies ON studies.id = study_id")
    assert sorted(scored) == [("2.25.73002", 2, 1), ("2.25.73003", 1, 1)]
    metrics = httpx.get(f"{daemon.url}/metrics", timeout=5).text
    assert 'triage_out_of_scope_instances_total{reason="modality"} 3.0' in metrics
    assert 'triage_out_of_scope_instances_total{reason="body_part"} 1.0' in metrics
    assert 'triage_out_of_scope_instances_total{reason="size"} 1.0' in metrics
    assert 'triage_studies{state="out_of_scope"} 4.0' in metrics
    assert 'triage_files{state="out_of_scope"} 5.0' in metrics
    text = daemon.cli("status").stdout
    assert any(line.split() == ["out_of_scope", "5"] for line in text.splitlines())
    assert any(line.split() == ["out_of_scope", "4"] for line in text.splitlines())
