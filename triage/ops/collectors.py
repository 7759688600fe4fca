"""Gauges read from the store and the disk at each scrape (`triage_files`, `triage_studies`,
`triage_queue_*`, `triage_replicas`, `triage_state_dir_free_bytes`), so they are right
after a restart too."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlite_utils
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from triage.store.db import STUDY_STATES, count_by
from triage.store.replicas import listing


class StoreCollector(Collector):
    """Gauges read from the store and the disk at each scrape."""

    def __init__(self, open_db: Callable[[], sqlite_utils.Database], home: Path,
                 lease_seconds: float = 30.0) -> None:
        self._open_db = open_db
        self._home = home
        self._lease = lease_seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        db = self._open_db()
        try:
            files = count_by(db, "files", "state")
            studies = count_by(db, "studies", "state")
            queue = count_by(db, "queue_items", "state")
            oldest = db.execute(
                "SELECT MIN(routed_at) FROM queue_items WHERE state = 'pending'"
            ).fetchone()[0]
            members = listing(db, time.time(), self._lease)
        finally:
            db.close()
        family = GaugeMetricFamily(
            "triage_replicas", "Daemons registered on this store: live (heartbeat within "
            "replica.lease_seconds), silent (no heartbeat for longer: dead or cut off; what "
            "they held is taken over) or stopped (cleanly).", labels=["state"])
        for state in ("live", "silent", "stopped"):
            family.add_metric([state], sum(
                1 for m in members if ("stopped" if m["stopped"] else
                                       "live" if m["live"] else "silent") == state))
        yield family
        family = GaugeMetricFamily(
            "triage_files", "Files in the ingestion journal, by state.", labels=["state"]
        )
        for state, count in sorted(files.items()):
            family.add_metric([state], count)
        yield family
        family = GaugeMetricFamily(
            "triage_queue_items", "Review queue items by state.", labels=["state"]
        )
        for state in ("pending", "claimed", "labeled"):
            family.add_metric([state], queue.get(state, 0))
        yield family
        yield GaugeMetricFamily(
            "triage_queue_oldest_pending_seconds",
            "Age of the oldest pending review queue item (0 when none).",
            value=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
        )
        family = GaugeMetricFamily("triage_studies", "Studies by state.", labels=["state"])
        for state in STUDY_STATES:
            family.add_metric([state], studies.get(state, 0))
        yield family
        yield GaugeMetricFamily(
            "triage_state_dir_free_bytes",
            "Free bytes on the file system holding the state directory.",
            value=shutil.disk_usage(self._home).free,
        )
