"""What a reader sees of a study: its images, why it was routed, prediction, labels."""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

import pydicom
import sqlite_utils

from triage.config import Settings
from triage.ingest.assembly import store_view_header
from triage.ingest.dicom import view_header
from triage.model.registry import model_operating_point
from triage.review import audit
from triage.review.auth import Principal
from triage.review.queue import QueueError, explain
from triage.store.db import transaction
from triage.store.images import INSTANCE_ORDER
from triage.telemetry.logs import event
from triage.training.runs import forgetting_of

log = logging.getLogger("triage.api")

_SHOWN_PHI = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate")
# What the view reads of each instance: all in the store since migration 8.
_COLUMNS = ", ".join(f"instances.{c}" for c in (
    "id", "modality", "photometric", "rows", "cols", "frames", "path", "view_cached",
    "window_center", "window_width", "window_index", "window_count", "window_explanation",
    "series_description", "study_description"))


def study_view(db: sqlite_utils.Database, settings: Settings, study_id: int,
               who: Principal, address: str | None) -> dict[str, Any]:
    """The study as the web UI shows it; viewing is audited."""
    item = next(iter(db.query("SELECT * FROM queue_items WHERE study_id = ?", [study_id])), None)
    if item is None:
        raise QueueError(f"study {study_id} is not in the review queue", status=404)
    why = explain_routing(db, study_id)
    instances = _instances(db, settings, study_id)
    images = [_image(row) for row in instances]
    view: dict[str, Any] = {
        "study_id": study_id,
        "state": item["state"],
        "reason": item["reason"],
        "why": why,
        "images": images,
        "modalities": sorted({row["modality"] or "?" for row in instances}),
        "description": (instances[0]["study_description"] or "") if instances else "",
        # forgetting events of its images over the retrains that trained on its label
        # (None before one did)
        "forgetting": forgetting_of(db, study_id),
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
        # identifiers are never copied into the store: one header read, whatever the size
        header = _header(settings.home / instances[0]["path"])
        view["patient"] = {k: str(header.get(k, "")) for k in _SHOWN_PHI} if header else None
    with transaction(db):
        audit.record(db, actor=who.name, role=who.role, action="view", study_id=study_id,
                     address=address, model_version=why["model_version"])
    return view


def explain_routing(db: sqlite_utils.Database, study_id: int) -> dict[str, Any]:
    """`triage.review.queue.explain` plus the ``operating_point`` (temperature, threshold) of the
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


def _instances(db: sqlite_utils.Database, settings: Settings,
               study_id: int) -> list[dict[str, Any]]:
    """The study's image instances in reading order (:data:`INSTANCE_ORDER`, the order
    they are scored in), with what the view shows of their headers, from the store only.

    Instances stored before migration 8 have no copy of their header yet: each is read
    once here and the copy kept, so only the first view of such a study reads files.
    """
    query = (f"SELECT {_COLUMNS} FROM instances WHERE study_id = ? AND scoreable = 1 "
             f"ORDER BY {INSTANCE_ORDER}")
    rows = list(db.query(query, [study_id]))
    stale = [row for row in rows if not row["view_cached"]]
    if stale and _fill_view_headers(db, settings, stale):
        rows = list(db.query(query, [study_id]))
    return rows


def _fill_view_headers(db: sqlite_utils.Database, settings: Settings,
                       rows: list[dict[str, Any]]) -> int:
    """Read the headers of instances stored before migration 8 and keep what the view
    needs; a header that cannot be read now is left for the next view. Returns how many
    were filled."""
    read = [(row["id"], _header(settings.home / row["path"])) for row in rows]
    read = [(instance_id, header) for instance_id, header in read if header is not None]
    if read:
        with transaction(db):
            for instance_id, header in read:
                store_view_header(db, instance_id, view_header(header))
        event(log, "study_view_headers_cached", instances=len(read))
    return len(read)


def _image(row: dict[str, Any]) -> dict[str, Any]:
    """One instance as the view lists it. ``window`` is the header's default VOI window
    (None: the server windows by percentiles); ``window_preset`` says which of the
    header's (centre, width) pairs it is, how many there were and the pair's
    WindowCenterWidthExplanation, so a multi-valued window is never taken silently."""
    has_window = row["window_center"] is not None and row["window_width"] is not None
    return {
        "instance_id": row["id"], "modality": row["modality"],
        "photometric": row["photometric"], "rows": row["rows"], "cols": row["cols"],
        "frames": row["frames"],
        "window": [row["window_center"], row["window_width"]] if has_window else None,
        "window_preset": {
            "index": row["window_index"], "count": row["window_count"],
            "explanation": row["window_explanation"],
        } if has_window else None,
        "series_description": row["series_description"] or "",
    }
