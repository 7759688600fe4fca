"""The radiologist review queue: routed studies, leases, labels.

One queue item per routed study. A reader claims an item with a lease; only the holder
of a live lease can label it; an expired lease returns the item to the queue. Exactly one
current label per study: a second label is refused, an admin correction supersedes the
current one and keeps the history. Every action writes its audit row in the same
transaction.

Order: highest gate priority first (the combined quantile score; cold-start items by
age), with ``audit`` items interleaved every ``review.audit_every`` claims so the
unbiased accuracy estimate is not starved by high-priority work.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from triage.errors import TriageError
from triage.review import audit
from triage.review.auth import Principal
from triage.store.db import transaction
from triage.telemetry.logs import event

log = logging.getLogger("triage.queue")

NON_CLASS_LABELS = ("skip", "not-diagnostic")
_AUDIT_PRIORITY = -1.0


class QueueError(TriageError):
    """A queue action that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class StoredLabel:
    label_id: int
    turnaround_seconds: float  # from routing to this label


@dataclass(frozen=True)
class Claim:
    study_id: int
    lease_expires_at: float


def enqueue(db: sqlite_utils.Database, *, study_id: int, decision_id: int,
            reason: str, combined: float | None, now: float) -> None:
    """Add (or refresh) a routed study; call inside the decision's transaction.

    A study already in the queue keeps its state and the reason it was first routed for:
    the reason decides the split of its label (an audit label validates), so an audit
    item that a later round routes for uncertainty must stay an audit, or the unbiased
    validation set and live-accuracy estimate would lose it. A pending item takes the
    new decision and, when neither it nor the new decision is an audit, the new priority
    (audit items keep the audit priority: they are claimed by interleaving, not rank).
    """
    priority = _AUDIT_PRIORITY if reason == "audit" else (combined if combined is not None else 0.0)
    db.execute(
        "INSERT INTO queue_items (study_id, decision_id, reason, priority, state, routed_at) "
        "VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT(study_id) DO UPDATE SET "
        "decision_id = excluded.decision_id, priority = CASE WHEN queue_items.reason = "
        "'audit' OR excluded.reason = 'audit' THEN queue_items.priority "
        "ELSE excluded.priority END WHERE queue_items.state = 'pending'",
        [study_id, decision_id, reason, priority, now],
    )


def release_expired_leases(db: sqlite_utils.Database, now: float,
                           lease_seconds: float | None = None) -> list[int]:
    """Return items whose lease ran out by ``now`` to the queue, each audited
    (``lease_expired``); the ids of their studies.

    With ``lease_seconds`` (the configured lease), a lease that ends later than a full
    lease from ``now`` is first cut to end then (event ``queue_leases_shortened``): it was
    granted before the wall clock stepped back, and would otherwise hold a reader's
    study, perhaps a dead session's, for the whole step on top of the lease.
    """
    horizon = now + lease_seconds if lease_seconds is not None else float("inf")
    due = db.execute(
        "SELECT 1 FROM queue_items WHERE state = 'claimed' AND (lease_expires_at <= ? "
        "OR lease_expires_at > ?) LIMIT 1",
        [now, horizon],
    ).fetchone()
    if due is None:
        return []  # the common case: no write lock taken just to look
    with transaction(db):
        if lease_seconds is not None:
            _shorten_leases(db, now, horizon)
        rows = db.execute(
            "SELECT queue_items.id, study_id, tokens.name, tokens.role FROM queue_items "
            "LEFT JOIN tokens ON tokens.id = claimed_by "
            "WHERE state = 'claimed' AND lease_expires_at <= ?", [now],
        ).fetchall()
        for item_id, study_id, name, role in rows:
            db.execute(
                "UPDATE queue_items SET state = 'pending', claimed_by = NULL, "
                "claimed_at = NULL, lease_expires_at = NULL WHERE id = ?", [item_id],
            )
            audit.record(db, actor=name or "?", role=role, action="lease_expired",
                         study_id=study_id)
    return [int(row[1]) for row in rows]


def _shorten_leases(db: sqlite_utils.Database, now: float, horizon: float) -> None:
    """Cut leases ending after ``horizon`` to end there (inside the caller's transaction;
    logged, as the reader keeps the claim); a claim time in the future becomes ``now``,
    so time spent is never negative."""
    rows = db.execute(
        "SELECT id, study_id, lease_expires_at FROM queue_items "
        "WHERE state = 'claimed' AND lease_expires_at > ?", [horizon],
    ).fetchall()
    for item_id, _, _ in rows:
        db.execute(
            "UPDATE queue_items SET lease_expires_at = ?, claimed_at = CASE WHEN "
            "claimed_at IS NULL OR claimed_at < ? THEN claimed_at ELSE ? END WHERE id = ?",
            [horizon, now, now, item_id],
        )
    if rows:
        event(log, "queue_leases_shortened", logging.WARNING, items=len(rows),
              study_ids=[int(row[1]) for row in rows],
              by_seconds=round(max(row[2] for row in rows) - horizon, 1),
              why="wall clock went back")


def recover_leases(db: sqlite_utils.Database, now: float, lease_seconds: float) -> int:
    """Start-up: claims whose lease ran out while the daemon was down (a reader who
    closed the browser mid-study, a crash between claim and label) go back to the queue
    at once, with an event, instead of waiting for the next queue request to notice.
    Live leases are kept: their reader may still label. A lease ending later than
    ``lease_seconds`` from now (granted before the wall clock stepped back) is cut to
    that first, as :func:`release_expired_leases` does."""
    study_ids = release_expired_leases(db, now, lease_seconds)
    if study_ids:
        event(log, "queue_leases_recovered", logging.WARNING, items=len(study_ids),
              study_ids=study_ids)
    return len(study_ids)


class ReviewQueue:
    """Queue actions for one request (one connection)."""

    def __init__(self, db: sqlite_utils.Database, *, lease_seconds: float, audit_every: int,
                 labels: list[str], clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._lease = lease_seconds
        self._audit_every = audit_every
        self._labels = labels
        self._clock = clock

    def expire_leases(self) -> int:
        """Return items whose lease ran out to the queue; audit each. A lease longer than
        a full one from now (the clock went back) is cut first."""
        return len(release_expired_leases(self._db, self._clock(), self._lease))

    def list(self, *, state: str | None = None, reason: str | None = None,
             limit: int = 200) -> list[dict[str, Any]]:
        self.expire_leases()
        clauses, params = [], []
        if state:
            clauses.append("state = ?")
            params.append(state)
        if reason:
            clauses.append("reason = ?")
            params.append(reason)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        return list(self._db.query(
            "SELECT study_id, state, reason, priority, routed_at, claimed_at, lease_expires_at, "
            f"labeled_at, tokens.name AS claimed_by FROM queue_items "
            f"LEFT JOIN tokens ON tokens.id = claimed_by {where} "
            "ORDER BY state, priority DESC, routed_at LIMIT ?", [*params, limit],
        ))

    def claim_next(self, who: Principal, address: str | None) -> Claim | None:
        """Claim the next study for ``who`` (their own live claim first); None if empty."""
        self.expire_leases()
        now = self._clock()
        with transaction(self._db):
            mine = self._db.execute(
                "SELECT study_id, lease_expires_at FROM queue_items WHERE state = 'claimed' "
                "AND claimed_by = ? ORDER BY claimed_at LIMIT 1", [who.token_id],
            ).fetchone()
            if mine is not None:
                return Claim(int(mine[0]), float(mine[1]))
            study_id = self._pick(now)
            if study_id is None:
                return None
            return self._take(study_id, who, address, now)

    def claim(self, study_id: int, who: Principal, address: str | None) -> Claim:
        """Claim a given study; refused if someone else holds a live lease."""
        self.expire_leases()
        now = self._clock()
        with transaction(self._db):
            item = self._item(study_id)
            if item["state"] == "claimed" and item["claimed_by"] == who.token_id:
                return self._take(study_id, who, address, now)  # renew the lease
            if item["state"] != "pending":
                raise QueueError(f"study {study_id} is {item['state']}, it cannot be claimed")
            return self._take(study_id, who, address, now)

    def release(self, study_id: int, who: Principal, address: str | None) -> None:
        with transaction(self._db):
            item = self._item(study_id)
            self._require_lease(item, who)
            self._db.execute(
                "UPDATE queue_items SET state = 'pending', claimed_by = NULL, claimed_at = NULL, "
                "lease_expires_at = NULL WHERE study_id = ?", [study_id],
            )
            audit.record(self._db, actor=who.name, role=who.role, action="release",
                         study_id=study_id, address=address)

    def label(self, study_id: int, who: Principal, value: str, comment: str | None,
              address: str | None,
              split_for: Callable[[sqlite_utils.Database, int, str, str], str | None]
              | None = None) -> StoredLabel:
        """Store the one label of a routed study; return the label id."""
        self._check_value(value)
        now = self._clock()
        with transaction(self._db):
            item = self._item(study_id)
            if item["state"] == "labeled":
                raise QueueError(f"study {study_id} is already labeled; an admin can correct it")
            self._require_lease(item, who)
            if item["lease_expires_at"] <= now:
                raise QueueError(f"your lease on study {study_id} expired; claim it again")
            version = self._model_version(item["decision_id"])
            split = None
            if split_for is not None and value not in NON_CLASS_LABELS:
                split = split_for(self._db, study_id, value, item["reason"])
            cursor = self._db.execute(
                "INSERT INTO labels (study_id, item_id, label, comment, token_id, role, "
                "created_at, seconds_spent, model_version, split) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [study_id, item["id"], value, comment, who.token_id, who.role, now,
                 now - item["claimed_at"], version, split],
            )
            self._db.execute(
                "UPDATE queue_items SET state = 'labeled', labeled_at = ?, "
                "lease_expires_at = NULL WHERE id = ?", [now, item["id"]],
            )
            audit.record(self._db, actor=who.name, role=who.role, action="label",
                         study_id=study_id, address=address, model_version=version,
                         detail={"label": value, "reason": item["reason"]})
        return StoredLabel(int(cursor.lastrowid), now - item["routed_at"])

    def correct(self, study_id: int, who: Principal, value: str, comment: str | None,
                address: str | None) -> int:
        """Admin correction: a new current label; the old one is kept, superseded."""
        self._check_value(value)
        now = self._clock()
        with transaction(self._db):
            current = self._db.execute(
                "SELECT id, label, item_id, split FROM labels "
                "WHERE study_id = ? AND superseded_by IS NULL", [study_id],
            ).fetchone()
            if current is None:
                raise QueueError(f"study {study_id} has no label to correct", status=404)
            # Free the unique slot for the current label, then point the old one at the new.
            self._db.execute("UPDATE labels SET superseded_by = -1 WHERE id = ?", [current[0]])
            cursor = self._db.execute(
                "INSERT INTO labels (study_id, item_id, label, comment, token_id, role, "
                "created_at, is_correction, split) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                [study_id, current[2], value, comment, who.token_id, who.role, now, current[3]],
            )
            self._db.execute("UPDATE labels SET superseded_by = ? WHERE id = ?",
                             [cursor.lastrowid, current[0]])
            audit.record(self._db, actor=who.name, role=who.role, action="correct",
                         study_id=study_id, address=address,
                         detail={"from": current[1], "to": value})
        return int(cursor.lastrowid)

    def history(self, study_id: int) -> list[dict[str, Any]]:
        return list(self._db.query(
            "SELECT labels.id, label, comment, is_correction, superseded_by, labels.created_at, "
            "tokens.name AS reader, labels.role FROM labels "
            "JOIN tokens ON tokens.id = token_id WHERE study_id = ? ORDER BY labels.id",
            [study_id],
        ))

    def tally(self, who: Principal, day_start: float) -> dict[str, Any]:
        """The reader's labels since ``day_start`` and their median seconds per study."""
        spent = sorted(row[0] for row in self._db.execute(
            "SELECT seconds_spent FROM labels WHERE token_id = ? AND created_at >= ? "
            "AND is_correction = 0", [who.token_id, day_start],
        ).fetchall() if row[0] is not None)
        median = None
        if spent:
            mid = len(spent) // 2
            median = spent[mid] if len(spent) % 2 else (spent[mid - 1] + spent[mid]) / 2
        return {"labeled_today": len(spent), "median_seconds": median}

    # -- internals ----------------------------------------------------------------------

    def _pick(self, now: float) -> int | None:
        claims = self._db.execute(
            "SELECT COUNT(*) FROM queue_items WHERE claimed_at IS NOT NULL OR state = 'labeled'"
        ).fetchone()[0]
        if (claims + 1) % self._audit_every == 0:
            row = self._db.execute(
                "SELECT study_id FROM queue_items WHERE state = 'pending' AND reason = 'audit' "
                "ORDER BY routed_at LIMIT 1"
            ).fetchone()
            if row is not None:
                return int(row[0])
        row = self._db.execute(
            "SELECT study_id FROM queue_items WHERE state = 'pending' "
            "ORDER BY priority DESC, routed_at, id LIMIT 1"
        ).fetchone()
        return int(row[0]) if row is not None else None

    def _take(self, study_id: int, who: Principal, address: str | None, now: float) -> Claim:
        expires = now + self._lease
        self._db.execute(
            "UPDATE queue_items SET state = 'claimed', claimed_by = ?, claimed_at = "
            "COALESCE(CASE WHEN claimed_by = ? THEN claimed_at END, ?), lease_expires_at = ? "
            "WHERE study_id = ?", [who.token_id, who.token_id, now, expires, study_id],
        )
        audit.record(self._db, actor=who.name, role=who.role, action="claim",
                     study_id=study_id, address=address)
        return Claim(study_id, expires)

    def _item(self, study_id: int) -> dict[str, Any]:
        rows = list(self._db.query("SELECT * FROM queue_items WHERE study_id = ?", [study_id]))
        if not rows:
            raise QueueError(f"study {study_id} is not in the review queue", status=404)
        return rows[0]

    def _require_lease(self, item: dict[str, Any], who: Principal) -> None:
        if item["state"] != "claimed":
            raise QueueError(f"study {item['study_id']} is not claimed; claim it first")
        if item["claimed_by"] != who.token_id:
            raise QueueError(f"study {item['study_id']} is claimed by another reader",
                             status=403)

    def _check_value(self, value: str) -> None:
        allowed = [*self._labels, *NON_CLASS_LABELS]
        if value not in allowed:
            raise QueueError(f"label must be one of {', '.join(allowed)}; got {value!r}",
                             status=422)

    def _model_version(self, decision_id: int) -> str | None:
        row = self._db.execute("SELECT model_version FROM decisions WHERE id = ?",
                               [decision_id]).fetchone()
        return row[0] if row else None


def explain(db: sqlite_utils.Database, study_id: int) -> dict[str, Any]:
    """Why a study was routed: the stored decision, in words and numbers."""
    row = next(iter(db.query(
        "SELECT decisions.*, queue_items.reason AS routed_for FROM queue_items "
        "JOIN decisions ON decisions.id = decision_id WHERE queue_items.study_id = ?",
        [study_id])), None)
    if row is None:
        raise QueueError(f"study {study_id} is not in the review queue", status=404)
    words = {
        "uncertainty": "the model was unsure (MC-dropout uncertainty above the threshold)",
        "predicted_loss": "the loss predictor expected the model to be wrong",
        "both": "the model was unsure and the loss predictor expected an error",
        "audit": "picked at random to measure the model's live accuracy (audit)",
        "cold_start": "no model yet: studies are routed up to the daily cap",
        "warmup": "the gate is warming up: routed at random at the label rate",
        "random": "random routing at the label rate (baseline strategy)",
        "coverage": "unlike anything labeled so far (core-set coverage query)",
        "badge": "its label would move the model's last layer most (BADGE gradient norm)",
        "batch": "picked for a batch of uncertain studies unlike each other (BADGE k-means++)",
        "emoc": "its label would change the model's outputs most (expected output change)",
        "alfa_mix": "a small mix toward a labeled class flips its prediction (ALFA-Mix)",
        "dal": "it looks least like the studies labeled so far (discriminative AL)",
    }
    reason = row["routed_for"]  # `coverage` items keep the study's last gate decision
    expert = json.loads(row["decision"]).get("expert") if row["decision"] else None
    explanation = words.get(reason, reason)
    if expert is not None and reason != "coverage":
        explanation += f"; ranked by {expert}, drawn from the gate's auto mix"
    return {
        "reason": reason,
        "explanation": explanation,
        "expert": expert,
        "model_version": row["model_version"],
        "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["created_at"])),
        "strategy": row["strategy"],
        "scores": json.loads(row["scores"]) if row["scores"] else None,
        "quantiles": json.loads(row["quantiles"]) if row["quantiles"] else None,
        "combined": row["combined"],
        "threshold": row["threshold"],
    }
