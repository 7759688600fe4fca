"""Operations metrics read from the store at scrape time: the serving model and its
audit-estimated live accuracy and operating point, and quarantined files by reason.

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

import sqlite_utils
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from triage.model.registry import model_operating_point


@dataclass(frozen=True)
class ServingModel:
    """The model version serving now."""

    version: str
    promoted_at: float | None


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
    """The serving model version, or None during cold start.

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
        "SELECT COUNT(*), COALESCE(SUM(json_extract(d.prediction, '$.label') = l.label), 0) "
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
        """Yield ``triage_model_info``, ``triage_model_promoted_timestamp_seconds``,
        ``triage_model_temperature`` and ``triage_model_decision_threshold`` (the serving
        model's operating point; the threshold only when it has one, else it predicts by
        argmax), ``triage_model_audit_samples``, ``triage_model_audit_accuracy`` (only
        with samples) and ``triage_quarantined_files``."""
        db = self._open_db()
        try:
            serving = serving_model(db)
            point = model_operating_point(db, serving.version) if serving else None
            audit = audit_accuracy(db, self._names)
            quarantined = quarantined_by_reason(db)
        finally:
            db.close()
        if serving is not None:
            yield InfoMetricFamily(
                "triage_model", "The model version serving now (absent during cold start).",
                value={"version": serving.version})
            if serving.promoted_at is not None:
                yield GaugeMetricFamily(
                    "triage_model_promoted_timestamp_seconds",
                    "When the serving model was promoted (Unix seconds).",
                    value=serving.promoted_at)
        if point is not None:
            yield GaugeMetricFamily(
                "triage_model_temperature",
                "Temperature the serving model's logits are divided by (1: uncalibrated).",
                value=point.temperature)
            if point.threshold is not None:
                yield GaugeMetricFamily(
                    "triage_model_decision_threshold",
                    "Calibrated probability of the second class at or above which the "
                    "serving model predicts it (absent: argmax).",
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
