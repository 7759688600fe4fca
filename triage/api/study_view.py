"""What a reader sees of a study: its images, why it was routed, prediction, labels."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pydicom
import sqlite_utils

from triage import audit
from triage.auth import Principal
from triage.config import Settings
from triage.db import transaction
from triage.ingest.dicom import dicom_window
from triage.queue import QueueError, explain
from triage.registry import model_operating_point

_SHOWN_PHI = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate")


def study_view(db: sqlite_utils.Database, settings: Settings, study_id: int,
               who: Principal, address: str | None) -> dict[str, Any]:
    """The study as the web UI shows it; viewing is audited."""
    item = next(iter(db.query("SELECT * FROM queue_items WHERE study_id = ?", [study_id])), None)
    if item is None:
        raise QueueError(f"study {study_id} is not in the review queue", status=404)
    why = explain_routing(db, study_id)
    instances = list(db.query(
        "SELECT id, modality, photometric, rows, cols, frames, path FROM instances "
        "WHERE study_id = ? AND scoreable = 1 ORDER BY id", [study_id]))
    images = []
    headers = []
    for row in instances:
        header = _header(settings.home / row["path"])
        headers.append(header)
        images.append({
            "instance_id": row["id"], "modality": row["modality"],
            "photometric": row["photometric"], "rows": row["rows"], "cols": row["cols"],
            "frames": row["frames"], "window": _window(header),
            "series_description": _text(header, "SeriesDescription"),
        })
    view: dict[str, Any] = {
        "study_id": study_id,
        "state": item["state"],
        "reason": item["reason"],
        "why": why,
        "images": images,
        "modalities": sorted({row["modality"] or "?" for row in instances}),
        "description": _text(headers[0] if headers else None, "StudyDescription"),
    }
    if settings.review.show_prediction:
        # the label stored with the decision: calibrated and thresholded at the model's
        # operating point when it was scored, never re-derived here
        decision = next(iter(db.query(
            "SELECT prediction FROM decisions WHERE id = ?", [item["decision_id"]])))
        prediction = json.loads(decision["prediction"]) if decision["prediction"] else None
        if prediction is not None:
            prediction["operating_point"] = why["operating_point"]
        view["prediction"] = prediction
    if settings.review.show_phi and instances:
        header = _header(settings.home / instances[0]["path"])
        view["patient"] = {k: str(header.get(k, "")) for k in _SHOWN_PHI} if header else None
    with transaction(db):
        audit.record(db, actor=who.name, role=who.role, action="view", study_id=study_id,
                     address=address, model_version=why["model_version"])
    return view


def explain_routing(db: sqlite_utils.Database, study_id: int) -> dict[str, Any]:
    """`triage.queue.explain` plus the ``operating_point`` (temperature, threshold) of the
    model that made the decision: what turned its probabilities into the stored label.
    None without a model (cold start) or when its checkpoint cannot be read;
    ``threshold`` None means argmax."""
    why = explain(db, study_id)
    point = model_operating_point(db, why["model_version"])
    why["operating_point"] = point.to_json() if point is not None else None
    return why


def _header(path: Any) -> pydicom.Dataset | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the archive copy was checked at ingest
        return None


def _text(header: pydicom.Dataset | None, keyword: str) -> str:
    """A header's text as the sender wrote it: markup included, so the UI must (and does)
    set it only as text, never as HTML."""
    value = header.get(keyword, "") if header is not None else ""
    return str(value or "")


def _window(header: pydicom.Dataset | None) -> list[float] | None:
    window = dicom_window(header) if header is not None else None
    return list(window) if window is not None else None
