"""Study assembly: instances grouped by StudyInstanceUID become complete studies.

A study is complete once ``studies.stable_age_seconds`` pass without a new instance, or
at once when the DICOM association that sent it ends (:meth:`StudyAssembler.complete_sent`).
A late instance reopens it (the ingestor sets it back to ``open``) and it is completed and
scored again, with ``round`` counting the completions. Studies without a scoreable image
end ``out_of_scope`` when at least one of their instances is an image outside ``scope``
(:mod:`triage.ingest.scope`), else ``unscoreable``; neither reaches the scorer. A study
with images both in and out of scope is scored on those in scope only (the others carry
no stored image).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

import sqlite_utils

from triage.ingest.dicom import ViewHeader
from triage.store.db import transaction
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

log = logging.getLogger("triage.studies")

CLOCK_TOLERANCE_SECONDS = 1.0
"""How far in the future an open study's last instance time may lie before
:meth:`StudyAssembler.complete_due` takes it for a backward step of the wall clock."""


class StudyAssembler:
    """Marks quiet open studies complete, in the order they became quiet."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        metrics: Metrics,
        stable_age_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._db = db
        self._metrics = metrics
        self._stable_age = stable_age_seconds
        self._clock = clock

    def complete_due(self) -> list[int]:
        """Complete every open study quiet for the stable age; return their ids.

        An open study whose last instance is stamped later than now (the wall clock
        stepped back since, as an NTP step does) is re-stamped now first, so it waits
        one stable age from here instead of the whole size of the step.
        """
        now = self._clock()
        ahead, latest = self._db.execute(
            "SELECT COUNT(*), MAX(last_instance_at) FROM studies "
            "WHERE state = 'open' AND last_instance_at > ?", [now + CLOCK_TOLERANCE_SECONDS],
        ).fetchone()  # the usual case: none, and no write lock taken
        if ahead:
            with transaction(self._db):
                self._db.execute(
                    "UPDATE studies SET last_instance_at = ? "
                    "WHERE state = 'open' AND last_instance_at > ?", [now, now])
            event(log, "studies_restamped_clock_behind", logging.WARNING,
                  studies=ahead, seconds_behind=round(latest - now, 1))
        cutoff = now - self._stable_age
        return self._complete(
            "state = 'open' AND last_instance_at <= ? ORDER BY last_instance_at, id", [cutoff],
            trigger="stable_age",
        )

    def complete_sent(self, file_ids: Collection[int]) -> list[int] | None:
        """Complete the open studies of files a sender finished sending (the end of a
        DICOM association), without waiting for the stable age.

        Returns the completed ids, or None while any of the files is still being read
        (call again later). Files quarantined or without a study complete nothing.
        """
        if not file_ids:
            return []
        marks = ", ".join("?" * len(file_ids))
        ids = list(file_ids)
        pending = self._db.execute(
            f"SELECT COUNT(*) FROM files WHERE id IN ({marks}) "
            "AND state IN ('received', 'reading', 'moving')", ids
        ).fetchone()[0]
        if pending:
            return None
        return self._complete(
            "state = 'open' AND id IN (SELECT instances.study_id FROM files "
            f"JOIN instances ON instances.id = files.instance_id WHERE files.id IN ({marks})) "
            "ORDER BY last_instance_at, id", ids,
            trigger="association_end",
        )

    def _complete(self, where: str, params: list, *, trigger: str) -> list[int]:
        now = self._clock()
        done = []
        with transaction(self._db):
            rows = self._db.execute(
                "SELECT id, first_seen_at, n_images, round, n_images = 0 AND EXISTS ("
                "SELECT 1 FROM instances WHERE instances.study_id = studies.id "
                f"AND instances.scope_reason IS NOT NULL) FROM studies WHERE {where}", params
            ).fetchall()
            for study_id, first_seen, n_images, round_, out_of_scope in rows:
                if n_images > 0:
                    state = "complete"
                else:
                    state = "out_of_scope" if out_of_scope else "unscoreable"
                self._db.execute(
                    "UPDATE studies SET state = ?, completed_at = ?, round = round + 1 "
                    "WHERE id = ?",
                    [state, now, study_id],
                )
                done.append((study_id, state, round_ + 1, now - first_seen, n_images))
        for study_id, state, round_, waited, n_images in done:
            self._metrics.studies_completed.inc()
            self._metrics.study_assembly_seconds.observe(waited)
            event(log, "study_complete", study_id=study_id, state=state, round=round_,
                  images=n_images, trigger=trigger)
        return [item[0] for item in done]


def store_view_header(db: sqlite_utils.Database, instance_id: int, view: ViewHeader) -> None:
    """Keep what the review view shows of an instance's header in its row (migration 8),
    so that viewing a study reads the store only, whatever its number of slices."""
    window = view.window
    db.execute(
        "UPDATE instances SET view_cached = 1, window_center = ?, window_width = ?, "
        "window_index = ?, window_count = ?, window_explanation = ?, "
        "series_description = ?, study_description = ? WHERE id = ?",
        [
            window.centre if window else None,
            window.width if window else None,
            window.index if window else None,
            window.count if window else None,
            window.explanation if window else None,
            view.series_description,
            view.study_description,
            instance_id,
        ],
    )
