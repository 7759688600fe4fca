"""The operations status page and its data, for sites without Grafana.

``GET /api/ops/summary`` (role ops or admin) returns the key figures and hourly series
of the last day, computed from the store (plus the few live values only the running
daemon knows: the gate's window, the ingest pause). ``GET /status`` serves the page,
which signs in with a token and draws the figures without any external resource.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Annotated, Any

import sqlite_utils
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from prometheus_client.metrics import MetricWrapperBase

from triage.api.deps import DbDep, SettingsDep, require
from triage.config import Settings
from triage.gate.queries import auto_mix, batch_waiting
from triage.ops.summary import audit_accuracy, quarantined_by_reason, served_model
from triage.review.auth import Principal
from triage.store.db import FINAL_FILE_STATES, STUDY_STATES, count_by
from triage.store import replicas
from triage.training.runs import retrain_status

STATIC = Path(__file__).parent / "static"
HOURS = 24
QUEUE_STATES = ("pending", "claimed", "labeled")
INGESTED_STATES = ("archived", "unsupported", "out_of_scope")

router = APIRouter(tags=["ops"])
Ops = Annotated[Principal, Depends(require("ops", "admin"))]


@router.get("/status", include_in_schema=False)
def status_page() -> FileResponse:
    """The status page (it asks for a token itself; the data route checks the role)."""
    return FileResponse(STATIC / "status.html")


@router.get("/api/ops/summary", summary="Key operational figures and hourly series of the "
            "last day (role ops or admin)")
def summary(request: Request, who: Ops, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    """Everything the status page shows, as one JSON object."""
    daemon = request.app.state.daemon
    live = {
        "ingest_paused": _gauge(daemon.metrics.ingest_paused),
        "inbox_pending": _gauge(daemon.metrics.inbox_pending),
        "routed_fraction": _gauge(daemon.metrics.gate_routed_fraction),
        "threshold": _gauge(daemon.metrics.gate_threshold),
        "dicom": dicom_live(daemon),
    }
    return build_summary(db, settings, live, time.time())


def build_summary(db: sqlite_utils.Database, settings: Settings,
                  live: dict[str, float | None], now: float) -> dict[str, Any]:
    """The summary from the store at ``now`` and the daemon's live gauges.

    Args:
        db: An open store connection (read-only is enough).
        settings: The daemon's settings (targets, class names, home).
        live: ``ingest_paused``, ``inbox_pending``, ``routed_fraction`` (the gate's
            rolling window) and ``threshold``; None where unknown. ``dicom``: the
            receiver's live figures (:func:`dicom_live`), absent outside a daemon.
        now: Unix seconds; the series cover the ``HOURS`` whole hours up to now.
    """
    files = count_by(db, "files", "state")
    studies = count_by(db, "studies", "state")
    queue = count_by(db, "queue_items", "state")
    oldest = db.execute(
        "SELECT MIN(routed_at) FROM queue_items WHERE state = 'pending'").fetchone()[0]
    day_ago = now - 86400
    decided = dict(db.execute(
        "SELECT reason, COUNT(*) FROM decisions WHERE created_at >= ? GROUP BY reason",
        [day_ago]).fetchall())
    routed_24h, total_24h = db.execute(
        "SELECT COALESCE(SUM(needs_label), 0), COUNT(*) FROM decisions WHERE created_at >= ?",
        [day_ago]).fetchone()
    queued = dict(db.execute(
        "SELECT reason, COUNT(*) FROM queue_items WHERE routed_at >= ? GROUP BY reason",
        [day_ago]).fetchall())
    served = served_model(db)
    audit = audit_accuracy(db, settings.model.labels)
    retrain = retrain_status(db, settings.model.labels)
    point = served.operating_point
    disk = shutil.disk_usage(settings.home)
    paused = live.get("ingest_paused")
    return {
        "generated_at": now,
        "files": {state: files.get(state, 0) for state in FINAL_FILE_STATES}
        | {"in_flight": files.get("received", 0) + files.get("reading", 0) + files.get("moving", 0),
           "total": sum(files.values())},
        "quarantine": quarantined_by_reason(db),
        "inbox_pending": live.get("inbox_pending"),
        "studies": {state: studies.get(state, 0) for state in STUDY_STATES}
        | {"total": sum(studies.values())},
        "queue": {state: queue.get(state, 0) for state in QUEUE_STATES}
        | {"oldest_pending_seconds": max(0.0, now - oldest) if oldest is not None else 0.0},
        "gate": {
            "label_rate_target": settings.gate.label_rate,
            "routed_fraction": live.get("routed_fraction"),
            "routed_fraction_24h": routed_24h / total_24h if total_24h else None,
            "threshold": live.get("threshold"),
            "daily_cap": settings.gate.daily_cap,
            "strategy": settings.gate.strategy,
            "budget_manager": settings.gate.manager,
            # under `auto`: each candidate's share of the studies it ranks, from the
            # labelled audits (None under another strategy)
            "auto_mix": auto_mix(db, settings),
            # under `budget_manager: batch`: scored studies waiting for their batch's
            # decision and the oldest one's wait (0 and None otherwise)
            "batch": batch_waiting(db, now),
        },
        "decisions_24h": {
            "total": int(total_24h), "routed": int(routed_24h),
            "by_reason": {str(k): int(v) for k, v in sorted(decided.items())},
            "queued_by_reason": {str(k): int(v) for k, v in sorted(queued.items())},
        },
        "model": {
            # the version the scorer actually serves (None: cold start, no promoted
            # version loads, or the scorer has not looked yet), and its figures
            "serving_version": served.version,
            "promoted_at": served.promoted_at,
            "validation_auroc": served.validation_auroc,
            # the registry's serving version: differs from serving_version when its
            # checkpoint cannot be loaded (an older version serves, or none)
            "registry_version": served.registry_version,
            "audit_accuracy": audit.accuracy,
            "audit_samples": audit.samples,
            # temperature and threshold the served model predicts at (threshold None:
            # argmax); the audit accuracy counts the labels stored at these points
            "operating_point": point.to_json() if point is not None else None,
            # the scorer's serving state: whether it serves the registry's version, and
            # why not; None before it first looked
            "serving": served.status.to_json() if served.status is not None else None,
        },
        "retrain": {
            "enabled": settings.retrain.enabled,
            "running": retrain["running"],
            "last_run": retrain["run"],
            "labels_since_last_run": retrain["labels_since_last_run"],
        },
        "disk": {
            "free_bytes": disk.free, "total_bytes": disk.total,
            "min_free_bytes": settings.ingest.min_free_bytes,
            "ingest_paused": bool(paused) if paused is not None else None,
        },
        "dicom": dicom_summary(db, settings, live.get("dicom"), day_ago),
        # every daemon on this store: roles, host, last heartbeat, live (a heartbeat
        # younger than replica.lease_seconds and not stopped); `retrain_lease`: which
        # replica's scheduler starts retrains now
        "replicas": {
            "this": settings.replica_name(),
            "members": replicas.listing(db, now, settings.replica.lease_seconds),
            "retrain_lease": replicas.lease_holder(db, "retrain", now),
        },
        "series": hourly_series(db, now),
    }


def dicom_live(daemon: Any) -> dict[str, Any]:
    """What only the running daemon knows of its DICOM node: the bound port (None while
    the receiver is off) and its counters since the daemon started."""
    metrics = daemon.metrics
    return {
        "port": daemon.dicom_port,
        "active_associations": _gauge(metrics.dicom_active_associations),
        "associations": _counts(metrics.dicom_associations, "result"),
        "instances": _counts(metrics.dicom_instances, "status"),
    }


def dicom_summary(db: sqlite_utils.Database, settings: Settings,
                  live: dict[str, Any] | None, since: float) -> dict[str, Any]:
    """The DICOM node panel: configuration, live counters and the last day's arrivals.

    AE titles and addresses are shown (the page needs role ops or admin); nothing from
    the instances themselves.
    """
    dicom = settings.dicom
    # Both answered from the index on (origin, received_at), whatever the table's size.
    received = db.execute(
        "SELECT COUNT(*) FROM files WHERE origin = 'dicom' AND received_at >= ?", [since]
    ).fetchone()[0]
    last = db.execute(
        "SELECT MAX(received_at) FROM files WHERE origin = 'dicom'").fetchone()[0]
    senders = db.execute(
        "SELECT COALESCE(sender, ''), COUNT(*) AS n FROM files WHERE origin = 'dicom' "
        "AND received_at >= ? GROUP BY 1 ORDER BY n DESC, 1 LIMIT 10", [since]).fetchall()
    live = live or {}
    return {
        "enabled": dicom.port is not None,
        "listening": live.get("port") is not None,
        "port": live.get("port") or dicom.port,
        "host": dicom.host,
        "ae_title": dicom.ae_title,
        "allowed_calling_ae_titles": list(dicom.allowed_calling_ae_titles),
        "allowed_hosts": list(dicom.allowed_hosts),
        "max_associations": dicom.max_associations,
        "active_associations": live.get("active_associations"),
        # counters since the daemon started (None outside a daemon)
        "associations": live.get("associations"),
        "instances": live.get("instances"),
        "received_24h": int(received or 0),
        "last_received_at": last,
        "senders_24h": {str(name): int(n) for name, n in senders},
    }


def hourly_series(db: sqlite_utils.Database, now: float) -> dict[str, Any]:
    """Counts per hour over the last ``HOURS`` hours, oldest first.

    Hours are whole Unix (UTC) hours; the last one is the current, partial hour.

    Args:
        db: An open store connection.
        now: Unix seconds.
    """
    start = (math.floor(now / 3600) - HOURS + 1) * 3600.0
    end = start + HOURS * 3600.0
    ingested = ", ".join(f"'{state}'" for state in INGESTED_STATES)
    sources = {  # name: (table, time column, condition)
        "files_ingested": ("files", "finished_at", f"state IN ({ingested})"),
        "files_quarantined": ("files", "finished_at", "state = 'quarantined'"),
        "decisions": ("decisions", "created_at", "1 = 1"),
        "decisions_routed": ("decisions", "created_at", "needs_label = 1"),
        "labels": ("labels", "created_at", "is_correction = 0"),
    }
    series: dict[str, Any] = {"hour_starts": [start + 3600 * i for i in range(HOURS)]}
    for name, (table, column, condition) in sources.items():
        counts = [0] * HOURS
        rows = db.execute(
            f"SELECT CAST(FLOOR(({column} - ?) / 3600.0) AS INTEGER) AS hour, COUNT(*) FROM {table} "
            f"WHERE {condition} AND {column} >= ? AND {column} < ? GROUP BY hour",
            [start, start, end],
        ).fetchall()
        for hour, count in rows:
            if 0 <= hour < HOURS:
                counts[int(hour)] = int(count)
        series[name] = counts
    return series


def _counts(metric: MetricWrapperBase, label: str) -> dict[str, float]:
    """A labelled counter's values by ``label``, through its public ``collect``."""
    counts: dict[str, float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and label in sample.labels:
                counts[sample.labels[label]] = float(sample.value)
    return dict(sorted(counts.items()))


def _gauge(metric: MetricWrapperBase) -> float | None:
    """The value of an unlabelled gauge, through its public ``collect``."""
    for family in metric.collect():
        for sample in family.samples:
            return float(sample.value)
    return None
