"""Prometheus gauges of retraining, read from the store at scrape time.

The training process never touches the daemon's registry: everything it does is in the
`retrain_runs` and `models` tables, which :class:`RetrainCollector` reads per scrape, so
nothing is lost when the worker exits or the daemon restarts. The model gauges
(`triage_model_*`, the served model's validation AUROC among them) are
:class:`triage.ops.summary.OpsCollector`'s. Register it with
``registry.register(RetrainCollector(lambda: store.connect(path, readonly=True), labels))``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import sqlite_utils
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from triage.training.runs import RUN_STATES, labels_since_last_run


class RetrainCollector(Collector):
    """Retraining gauges (see `collect` for the names).

    Args:
        open_db: Opens a (read-only) connection; it is closed after each scrape.
        class_names: `model.labels` (to count new class labels).
    """

    def __init__(self, open_db: Callable[[], sqlite_utils.Database],
                 class_names: list[str]) -> None:
        self._open_db = open_db
        self._names = list(class_names)

    def collect(self) -> Iterator[GaugeMetricFamily | SummaryMetricFamily]:
        db = self._open_db()
        try:
            counts = dict(db.execute(
                "SELECT state, COUNT(*) FROM retrain_runs GROUP BY state").fetchall())
            durations = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(finished_at - started_at), 0) FROM retrain_runs "
                "WHERE finished_at IS NOT NULL").fetchone()
            last_done = db.execute(
                "SELECT finished_at - started_at FROM retrain_runs WHERE finished_at IS NOT NULL "
                "ORDER BY id DESC LIMIT 1").fetchone()
            last = db.execute(
                "SELECT state, started_at, progress FROM retrain_runs "
                "ORDER BY id DESC LIMIT 1").fetchone()
            new_labels = labels_since_last_run(db, self._names)
        finally:
            db.close()
        family = GaugeMetricFamily(
            "triage_retrain_runs", "Retrain runs in the store, by state.", labels=["result"])
        for state in RUN_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family
        yield SummaryMetricFamily(
            "triage_retrain_duration_seconds", "Wall time of finished retrain runs.",
            count_value=int(durations[0]), sum_value=float(durations[1]))
        yield GaugeMetricFamily(
            "triage_retrain_last_duration_seconds",
            "Wall time of the last finished retrain run (0 if none).",
            value=float(last_done[0]) if last_done else 0.0)
        yield GaugeMetricFamily(
            "triage_retrain_last_run_timestamp_seconds",
            "Start time of the most recent retrain run (Unix seconds; 0 if none).",
            value=float(last[1]) if last else 0.0)
        running = last is not None and last[0] == "running"
        yield GaugeMetricFamily(
            "triage_retrain_running", "1 while a retrain run is in progress.",
            value=1.0 if running else 0.0)
        yield GaugeMetricFamily(
            "triage_retrain_progress", "Progress of the running retrain (0 to 1; 0 if none).",
            value=float(last[2]) if running else 0.0)
        yield GaugeMetricFamily(
            "triage_labels_since_retrain",
            "Class labels stored since the last retrain run started.", value=new_labels)
