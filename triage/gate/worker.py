"""Hand completed studies to the scorer one at a time, in completion order.

The scorer is anything with ``score(study) -> ScoreResult`` and ``commit(result)``
(the daemon's is :class:`triage.gate.scorer.GateScorer`). "Ask, then commit": the
worker stores the result and the gate's decision in one transaction, and only then
tells the scorer to commit, so the gate's state never runs ahead of the store.

A buffered budget manager (`gate.budget_manager: batch`) decides later: the scorer's
result then carries a `gate_buffer` row instead of a decision, the worker stores it and
leaves the study ``batched`` in the same transaction, and the scorer's ``flush_due()``
(asked before each study and after each buffered one) decides the batch when it is
full or its oldest study has waited long enough, storing each result and decision
with `store_decided` as the worker does.

Replicas (`triage.store.replicas`): a study is claimed for scoring by this worker's
replica (`studies.claimed_by`). If its replica was taken for dead meanwhile (no
heartbeat for `replica.lease_seconds`) the study went back to `complete` and another
replica may score it: the result is then dropped (event `scoring_claim_lost`), so no
study gets two decisions. The scorer's ``settle(result)``, called in the storing
transaction, lets it decide again from what other replicas stored meanwhile.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import sqlite_utils
import torch

from triage.model.serving import ModelUnavailable
from triage.review.queue import enqueue
from triage.store.db import transaction
from triage.store.images import load_study_images
from triage.store.replicas import release_dead_claims
from triage.store.settings import StudySettings
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

log = logging.getLogger("triage.scoring")


@dataclass(frozen=True)
class StudyToScore:
    """A complete study. ``images`` is [n_images, 1, S, S], values in [0, 1]."""

    study_id: int
    round: int
    images: torch.Tensor


@dataclass(frozen=True)
class ScoreResult:
    """What the scorer concluded.

    Attributes:
        status: ``routed``, ``not_routed`` or ``error``.
        model_version: The model that scored the study, None without one.
        detail: Short JSON summary stored with the result.
        decision_row: Columns of the ``decisions`` row, when the gate decided.
        pending: Scorer-private state handed back to :meth:`Scorer.commit`.
        buffer_row: Columns of the ``gate_buffer`` row, when the study waits for a batch
            (status ``batched``; no result or decision is stored until then).
    """

    status: str
    model_version: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    decision_row: dict[str, Any] | None = None
    pending: Any = None
    buffer_row: dict[str, Any] | None = None


def store_decided(db: sqlite_utils.Database, study_id: int, round_: int, result: ScoreResult,
                  now: float) -> None:  # fmt: skip
    """Store a study's result and, when the gate decided, its decision, queueing it when
    routed; call inside a transaction. The study's state is the caller's."""
    cursor = db.execute(
        "INSERT INTO study_results (study_id, round, status, model_version, detail, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?)",
        [study_id, round_, result.status, result.model_version,
         json.dumps(result.detail), now],
    )
    if result.decision_row is None:
        return
    row = {"result_id": int(cursor.lastrowid), "study_id": study_id, "round": round_,
           "created_at": now, **result.decision_row}
    decision = db.execute(
        f"INSERT INTO decisions ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
        list(row.values()),
    )
    if row["needs_label"]:
        enqueue(db, study_id=study_id, decision_id=int(decision.lastrowid),
                reason=row["reason"], combined=row["combined"], now=now)


class Scorer(Protocol):
    """``score`` may raise :class:`ModelUnavailable`; a scorer may also have ``ready()``
    (False: no model loads now), asked before each study so a waiting study is not
    loaded for nothing, and ``flush_due()`` (decide a waiting batch that is due)."""

    def score(self, study: StudyToScore) -> ScoreResult: ...

    def commit(self, result: ScoreResult) -> None: ...


class ScoringWorker:
    """Takes the oldest complete study, scores it, stores the result."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        scorer: Scorer,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        error_retry_seconds: Sequence[float] | None = None,
        replica: str = "local",
        lease_seconds: float = 30.0,
    ) -> None:
        self._db = db
        self._replica = replica
        self._lease = lease_seconds
        self._scorer = scorer
        self._metrics = metrics
        self._clock = clock
        # waits before each new try of a study whose images could not be read; None: the
        # `studies.error_retry_seconds` default
        if error_retry_seconds is None:
            error_retry_seconds = StudySettings().error_retry_seconds
        self._retry_waits = tuple(error_retry_seconds)

    def requeue_interrupted(self) -> int:
        """Studies left ``scoring`` by a crash of this replica (or held by a replica that
        is not live) go back to ``complete``, to be scored again; those another live
        replica is scoring stay its own.

        Call at start-up, before the first :meth:`run_once`; the ids go to the log so an
        operator can follow each recovered study (ids only: no UIDs or patient data).
        """
        released = self._release()
        ids = released["scoring"] + released["batched"]
        if ids:
            event(log, "scoring_interrupted_requeued", logging.WARNING, studies=len(ids),
                  study_ids=ids)
        return len(ids)

    def take_over_dead(self) -> int:
        """Studies that replicas no longer live were scoring, or held in their batches,
        go back to ``complete`` (event `replica_claims_taken_over`); so does a study this
        replica left ``scoring`` when a try failed to store its result (the store went
        away mid-transaction; event `scoring_interrupted_requeued`). Call every few
        seconds, between studies. Returns how many."""
        released = self._release()
        own = released["own"]
        others = [i for i in released["scoring"] + released["batched"] if i not in own]
        if own:
            event(log, "scoring_interrupted_requeued", logging.WARNING, studies=len(own),
                  study_ids=own)
        if others:
            event(log, "replica_claims_taken_over", logging.WARNING, studies=len(others),
                  study_ids=others)
        return len(own) + len(others)

    def _release(self) -> dict[str, list[int]]:
        return release_dead_claims(self._db, self._replica, self._clock(), self._lease)

    def run_once(self) -> int | None:
        """Score the next complete study; return its id, or None when there is none.

        The study leaves ``scoring`` in every case: ``scored`` with a result (an ``error``
        result when the scorer failed), ``error`` with a reason when its stored images
        cannot be read (tried again after a backoff, :meth:`_retry_errors`),
        ``waiting_model`` when models exist but none loads (neither
        scored nor routed; all waiting studies go back to ``complete``, oldest first,
        once one loads), or ``open`` when a late instance reopened it meanwhile.
        """
        ready = self._scorer_ready()
        if ready:
            self._release_waiting()
        self._retry_errors()
        self._flush_due()
        with transaction(self._db):
            row = self._db.execute(
                "SELECT id, round FROM studies WHERE state = 'complete' "
                "ORDER BY completed_at, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            study_id, round_ = int(row[0]), int(row[1])
            self._db.execute("UPDATE studies SET state = 'scoring', claimed_by = ? WHERE id = ?",
                             [self._replica, study_id])
        if not ready:
            self._wait_for_model(study_id, round_)
            return study_id
        try:
            images = load_study_images(self._db, study_id)
        except Exception as exc:  # noqa: BLE001 - a corrupt stored image must not stick
            self._unreadable(study_id, round_, exc)
            return study_id
        try:
            result = self._scorer.score(StudyToScore(study_id, round_, images))
        except ModelUnavailable:
            self._wait_for_model(study_id, round_)
            return study_id
        except Exception as exc:  # noqa: BLE001 - one bad study must not stop the stream
            event(log, "scoring_failed", logging.ERROR, study_id=study_id,
                  error_type=type(exc).__name__)
            result = ScoreResult("error", None, {"error_type": type(exc).__name__})
        now = self._clock()
        with transaction(self._db):
            if not self._still_claimed(study_id):
                return study_id
            settle = getattr(self._scorer, "settle", None)
            if settle is not None and result.decision_row is not None:
                result = settle(result)
            if result.buffer_row is not None:  # decided with its batch (module doc)
                row = {"study_id": study_id, "round": round_, **result.buffer_row}
                self._db.execute(
                    f"INSERT INTO gate_buffer ({', '.join(row)}) "
                    f"VALUES ({', '.join('?' for _ in row)})",
                    list(row.values()),
                )
            else:
                store_decided(self._db, study_id, round_, result, now)
            # A late instance may have reopened the study meanwhile: leave it open then.
            self._db.execute(
                "UPDATE studies SET state = ? WHERE id = ? AND state = 'scoring'",
                ["batched" if result.buffer_row is not None else "scored", study_id],
            )
        if result.decision_row is not None or result.buffer_row is not None:
            self._scorer.commit(result)
        self._metrics.scored.labels(result.status).inc()
        flagged = {"ood_flag": result.detail["ood_flag"]} if "ood_flag" in result.detail else {}
        event(log, "study_scored", study_id=study_id, round=round_, status=result.status,
              images=int(images.shape[0]), **flagged)
        if result.buffer_row is not None:
            self._flush_due()  # the batch may be full now
        return study_id

    def _still_claimed(self, study_id: int) -> bool:
        """Inside the storing transaction: whether this replica still holds the study
        (it went back to `complete` if this replica was taken for dead meanwhile)."""
        row = self._db.execute("SELECT claimed_by, state FROM studies WHERE id = ?",
                               [study_id]).fetchone()
        if row is not None and row[0] == self._replica:
            return True
        event(log, "scoring_claim_lost", logging.WARNING, study_id=study_id,
              state=None if row is None else row[1])
        self._metrics.scored.labels("claim_lost").inc()
        return False

    def _flush_due(self) -> None:
        flush_due = getattr(self._scorer, "flush_due", None)
        if flush_due is not None:
            flush_due()

    def _scorer_ready(self) -> bool:
        ready = getattr(self._scorer, "ready", None)
        return True if ready is None else bool(ready())

    def _wait_for_model(self, study_id: int, round_: int) -> None:
        """Park a study while no model loads: no result, no decision, nothing routed."""
        with transaction(self._db):
            self._db.execute(
                "UPDATE studies SET state = 'waiting_model' WHERE id = ? AND state = 'scoring' "
                "AND claimed_by = ?", [study_id, self._replica],
            )
        self._metrics.scored.labels("waiting_model").inc()
        event(log, "study_waiting_for_model", logging.WARNING, study_id=study_id, round=round_)

    def _release_waiting(self) -> int:
        """A model loads again: waiting studies go back to ``complete`` (they keep their
        completion time, so they are scored first)."""
        if self._db.execute(
            "SELECT 1 FROM studies WHERE state = 'waiting_model' LIMIT 1"
        ).fetchone() is None:
            return 0  # the usual case: no write lock taken
        with transaction(self._db):
            released = self._db.execute(
                "UPDATE studies SET state = 'complete' WHERE state = 'waiting_model'"
            ).rowcount
        if released:
            event(log, "studies_released_model_available", studies=released)
        return released

    def _unreadable(self, study_id: int, round_: int, exc: Exception) -> None:
        """End a study whose stored images cannot be read in ``error``, with the reason.

        The gate never sees it (no decision, nothing routed), so the window and budget
        are untouched. The reason names the error type only: messages can quote stored
        values. It is tried again after a backoff that grows with ``error_count``
        (``studies.error_retry_seconds``); once those are spent it stays ``error`` for an
        operator (``study_error_left_for_operator``). A late instance reopens it anyway.
        """
        reason = f"stored images could not be read ({type(exc).__name__})"
        result = ScoreResult("error", None, {"error": "images_unreadable",
                                             "error_type": type(exc).__name__})
        with transaction(self._db):
            if not self._still_claimed(study_id):
                return
            store_decided(self._db, study_id, round_, result, self._clock())
            self._db.execute(
                "UPDATE studies SET state = 'error', error_reason = ?, "
                "error_count = error_count + 1 WHERE id = ? AND state = 'scoring'",
                [reason, study_id],
            )
            count = int(self._db.execute(
                "SELECT error_count FROM studies WHERE id = ?", [study_id]).fetchone()[0])
        self._metrics.scored.labels("error").inc()
        retry_in = self._retry_wait(count)
        event(log, "study_images_unreadable", logging.ERROR, study_id=study_id, round=round_,
              error_type=type(exc).__name__, error_count=count, retry_in_seconds=retry_in)
        if retry_in is None:
            event(log, "study_error_left_for_operator", logging.ERROR, study_id=study_id,
                  attempts=count, error_type=type(exc).__name__)

    def _retry_wait(self, error_count: int) -> float | None:
        """How long a study that failed ``error_count`` times waits before its next try;
        None when the tries are spent (it is left for an operator)."""
        if not 1 <= error_count <= len(self._retry_waits):
            return None
        return self._retry_waits[error_count - 1]

    def _retry_errors(self) -> int:
        """``error`` studies whose backoff has passed go back to ``complete``.

        The wait is counted from the study's last result (the failed try, stored with it;
        the last written, not the latest stamped, as the wall clock may step back),
        so no column is needed and a restart keeps the schedule. A study keeps its
        completion time, so it is tried before newer ones; its ``round`` is unchanged
        (the same instances are tried again).
        """
        rows = self._db.execute(
            "SELECT id, error_count, (SELECT created_at FROM study_results "
            "WHERE study_results.study_id = studies.id ORDER BY id DESC LIMIT 1) FROM studies "
            "WHERE state = 'error' AND error_count BETWEEN 1 AND ?",
            [len(self._retry_waits)],
        ).fetchall()  # the usual case: none, and no write lock taken
        now = self._clock()
        # a study waits while now lies in [failed try, failed try + wait); a failed try
        # stamped in the future (the wall clock stepped back since) is not waited out
        due = [(int(study_id), int(count)) for study_id, count, failed_at in rows
               if failed_at is None
               or not failed_at <= now < failed_at + self._retry_waits[count - 1]]
        if not due:
            return 0
        retried = []
        with transaction(self._db):
            for study_id, count in due:
                if self._db.execute(
                    "UPDATE studies SET state = 'complete' WHERE id = ? AND state = 'error' "
                    "AND error_count = ?", [study_id, count],
                ).rowcount:
                    retried.append((study_id, count))
        for study_id, count in retried:
            event(log, "study_error_retry", logging.WARNING, study_id=study_id,
                  attempt=count + 1, of=len(self._retry_waits) + 1)
        return len(retried)
