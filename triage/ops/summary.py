"""Operations metrics read from the store at scrape time: the served model (the version
the scorer actually loaded, which is not the registry's serving version when that one's
checkpoint cannot be loaded), its validation AUROC, operating point and audit-estimated
live accuracy, and quarantined files by reason.

Everything here is derived from tables the daemon already writes, so it survives a
restart and needs no update hooks. The helpers are shared with the status page
(:mod:`triage.api.ops_status`) so that both report the same numbers. Register it with
``registry.register(OpsCollector(lambda: store.connect(path, readonly=True), labels))``.

Labels are closed sets (a model version, a quarantine reason code); never a UID, a path
or PHI.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import json
from typing import Any

import sqlite_utils
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from triage.model.calibration import OperatingPoint
from triage.model.registry import model_operating_point
from triage.model.serving_state import ServingStatus, read_serving_status


@dataclass(frozen=True)
class ServingModel:
    """The model version serving now."""

    version: str
    promoted_at: float | None


@dataclass(frozen=True)
class ServedModel:
    """The model the scorer actually serves, beside the registry's serving version.

    Attributes:
        version: The version the scorer loaded and scores with (the ``serving_state`` row
            it writes); None during cold start, while no promoted version loads, and
            before the scorer first looked.
        promoted_at: When ``version`` was (last) promoted (Unix seconds).
        validation_auroc: ``version``'s validation AUROC, recorded when it was trained.
        operating_point: The temperature and threshold ``version`` predicts at.
        registry_version: The registry's ``serving`` version now (None: none). It differs
            from ``version`` when its checkpoint cannot be loaded (an older one serves)
            or for the moment between a promotion and the scorer's next look.
        status: The scorer's serving status row (None before it first looked).
    """

    version: str | None
    promoted_at: float | None
    validation_auroc: float | None
    operating_point: OperatingPoint | None
    registry_version: str | None
    status: ServingStatus | None

    @property
    def differs(self) -> bool:
        """The scorer serves something other than the registry's serving version."""
        return self.version != self.registry_version


def served_model(db: sqlite_utils.Database) -> ServedModel:
    """What the scorer serves (its ``serving_state`` row) and what the registry names.

    Args:
        db: An open store connection.
    """
    registry = serving_model(db)
    status = read_serving_status(db)
    version = status.served_version if status is not None else None
    promoted_at = None
    if version is not None:
        row = db.execute("SELECT promoted_at FROM models WHERE version = ?",
                         [version]).fetchone()
        promoted_at = float(row[0]) if row is not None and row[0] is not None else None
    return ServedModel(
        version=version, promoted_at=promoted_at,
        validation_auroc=validation_auroc(db, version),
        operating_point=model_operating_point(db, version),
        registry_version=registry.version if registry is not None else None,
        status=status)


def validation_auroc(db: sqlite_utils.Database, version: str | None) -> float | None:
    """A version's validation AUROC from its stored metrics (None: none recorded)."""
    if version is None:
        return None
    row = db.execute("SELECT metrics FROM models WHERE version = ?", [version]).fetchone()
    if row is None or not row[0]:
        return None
    try:
        value: Any = json.loads(row[0]).get("validation", {}).get("auroc")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


@dataclass(frozen=True)
class AuditAccuracy:
    """Agreement of audit-routed predictions with their readers' current labels."""

    samples: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        """Fraction correct, or None without samples."""
        return self.correct / self.samples if self.samples else None


def serving_model(db: sqlite_utils.Database) -> ServingModel | None:
    """The registry's serving model version, or None during cold start (what the scorer
    actually serves is :func:`served_model`).

    Args:
        db: An open store connection.
    """
    row = db.execute(
        "SELECT version, promoted_at FROM models WHERE status = 'serving' "
        "ORDER BY promoted_at DESC LIMIT 1"
    ).fetchone()
    if row is None:
        return None
    return ServingModel(str(row[0]), float(row[1]) if row[1] is not None else None)


def audit_accuracy(db: sqlite_utils.Database, class_names: list[str]) -> AuditAccuracy:
    """Live accuracy estimated from studies routed at random as ``audit``.

    A sample is a queue item routed with reason ``audit`` whose study has a current
    (not superseded) label in one of ``class_names`` (``skip`` and ``not-diagnostic``
    do not count) and whose routing decision stored a prediction. It is correct when
    the decision's stored predicted label equals the reader's label: the label as the
    model gave it at its operating point (calibrated, thresholded), never re-derived from
    the stored probabilities, which with a threshold may differ from their argmax. The
    audit draw is uniform over scored studies, so this is an unbiased estimate of
    accuracy on live traffic (all model versions that made audited decisions together).

    Args:
        db: An open store connection.
        class_names: ``model.labels``.
    """
    if not class_names:
        return AuditAccuracy(0, 0)
    marks = ", ".join("?" for _ in class_names)
    samples, correct = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN json_extract(d.prediction, '$.label') "
        "= l.label THEN 1 ELSE 0 END), 0) "
        "FROM queue_items q "
        "JOIN decisions d ON d.id = q.decision_id "
        "JOIN labels l ON l.study_id = q.study_id AND l.superseded_by IS NULL "
        f"WHERE q.reason = 'audit' AND l.label IN ({marks}) "
        "AND json_extract(d.prediction, '$.label') IS NOT NULL",
        list(class_names),
    ).fetchone()
    return AuditAccuracy(int(samples), int(correct))


def quarantined_by_reason(db: sqlite_utils.Database) -> dict[str, int]:
    """Quarantined files in the ingestion journal, by reason code.

    Args:
        db: An open store connection.
    """
    rows = db.execute(
        "SELECT COALESCE(reason_code, 'unknown'), COUNT(*) FROM files "
        "WHERE state = 'quarantined' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    return {str(code): int(count) for code, count in rows}


class OpsCollector(Collector):
    """Model and quarantine gauges (see :meth:`collect` for the names).

    Args:
        open_db: Opens a (read-only) connection; it is closed after each scrape.
        class_names: ``model.labels`` (the labels that count for audit accuracy).
    """

    def __init__(self, open_db: Callable[[], sqlite_utils.Database],
                 class_names: list[str]) -> None:
        self._open_db = open_db
        self._names = list(class_names)

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        """Yield, for the model the scorer actually serves (absent during cold start and
        while no promoted version loads): ``triage_model_info{version}``,
        ``triage_model_promoted_timestamp_seconds``, ``triage_model_validation_auroc``
        (when recorded), ``triage_model_temperature`` and
        ``triage_model_decision_threshold`` (its operating point; the threshold only when
        it has one, else it predicts by argmax). Beside them
        ``triage_model_registry_info{version}``: the registry's serving version (absent
        when none), which differs from ``triage_model_info`` when its checkpoint cannot
        be loaded. Then ``triage_model_audit_samples``, ``triage_model_audit_accuracy``
        (only with samples) and ``triage_quarantined_files``."""
        db = self._open_db()
        try:
            served = served_model(db)
            audit = audit_accuracy(db, self._names)
            quarantined = quarantined_by_reason(db)
        finally:
            db.close()
        if served.version is not None:
            yield InfoMetricFamily(
                "triage_model", "The model version the scorer serves now (absent during "
                "cold start and while no promoted version loads).",
                value={"version": served.version})
            if served.promoted_at is not None:
                yield GaugeMetricFamily(
                    "triage_model_promoted_timestamp_seconds",
                    "When the served model was promoted (Unix seconds).",
                    value=served.promoted_at)
            if served.validation_auroc is not None:
                yield GaugeMetricFamily(
                    "triage_model_validation_auroc",
                    "Validation AUROC of the served model, recorded when it was trained.",
                    value=served.validation_auroc)
        if served.registry_version is not None:
            yield InfoMetricFamily(
                "triage_model_registry",
                "The registry's serving version (differs from triage_model_info when its "
                "checkpoint cannot be loaded and an older version serves).",
                value={"version": served.registry_version})
        point = served.operating_point
        if point is not None:
            yield GaugeMetricFamily(
                "triage_model_temperature",
                "Temperature the served model's logits are divided by (1: uncalibrated).",
                value=point.temperature)
            if point.threshold is not None:
                yield GaugeMetricFamily(
                    "triage_model_decision_threshold",
                    "Calibrated probability of the second class at or above which the "
                    "served model predicts it (absent: argmax).",
                    value=point.threshold)
        yield GaugeMetricFamily(
            "triage_model_audit_samples",
            "Audit-routed studies with a current class label and a stored prediction.",
            value=audit.samples)
        if audit.accuracy is not None:
            yield GaugeMetricFamily(
                "triage_model_audit_accuracy",
                "Share of audit-routed studies whose predicted label matches the reader's.",
                value=audit.accuracy)
        family = GaugeMetricFamily(
            "triage_quarantined_files", "Quarantined files in the store, by reason code.",
            labels=["reason"])
        for reason, count in quarantined.items():
            family.add_metric([reason], count)
        yield family
