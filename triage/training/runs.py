"""The `retrain_runs` table: one row per run, written by the scheduler and the worker.

States: `running` (the worker is training or deciding), then exactly one final state:
`promoted` (the candidate serves now), `rejected` (the candidate lost to the serving
model; the reason is in the message and the model's note), `succeeded` (a candidate was
registered and left for an admin, `retrain.auto_promote: false`) or `failed` (nothing
changed: error, non-finite loss, too few labels, or the process died). At most one row
is `running` at a time; a `running` row whose process is gone is marked `failed` with
the message `process died` by the next :func:`reap_dead_runs`, and a `candidate` model
such a run registered but never decided on is `rejected` by
:func:`reject_orphaned_candidates` (the daemon does both at start-up and on every check).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from triage.errors import TriageError
from triage.store.db import transaction

RUN_STATES = ("running", "succeeded", "failed", "rejected", "promoted")
FINAL_STATES = RUN_STATES[1:]
TRIGGERS = ("labels", "idle", "schedule", "manual")
WORKER_MODULE = "triage.training.worker"
# A worker started before the package was renamed (it runs on after an upgrade) is still ours.
_WORKER_MODULES = (WORKER_MODULE, "triage.retrain.worker")
START_GRACE_SECONDS = 60.0


class RetrainBusy(TriageError):
    """A retrain run is already in progress."""


class RunEnded(TriageError):
    """The run was ended meanwhile (its replica taken for dead, or its process for
    gone): what it would decide now is not recorded."""


def finish_or_abort(db: sqlite_utils.Database, run_id: int, state: str, message: str,
                    metrics: dict[str, Any] | None = None) -> None:
    """`finish_run` inside the transaction that records the run's decision (a promotion
    or rejection), which is rolled back when the row is no longer running.

    Raises:
        RunEnded: The row was ended meanwhile.
    """
    if not finish_run(db, run_id, state, message, metrics):
        raise RunEnded(f"retrain run {run_id} was ended meanwhile; its decision is not "
                       "recorded")


def create_run(db: sqlite_utils.Database, trigger: str, now: float,
               replica: str | None = None) -> int:
    """Insert a `running` row; raise :class:`RetrainBusy` when one is running already."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {TRIGGERS}, got {trigger!r}")
    with transaction(db):
        row = db.execute(
            "SELECT id, progress FROM retrain_runs WHERE state = 'running' LIMIT 1"
        ).fetchone()
        if row is not None:
            raise RetrainBusy(
                f"a retrain is already running (run {row[0]}, {100 * row[1]:.0f}% done)"
            )
        cursor = db.execute(
            "INSERT INTO retrain_runs (trigger, state, started_at, progress, message, "
            "replica) VALUES (?, 'running', ?, 0, 'starting', ?)",
            [trigger, now, replica],
        )
        return int(cursor.lastrowid)


def set_pid(db: sqlite_utils.Database, run_id: int, pid: int) -> None:
    with transaction(db):
        db.execute("UPDATE retrain_runs SET pid = ? WHERE id = ?", [pid, run_id])


def update_progress(db: sqlite_utils.Database, run_id: int, progress: float, message: str,
                    **columns: Any) -> None:
    """Set progress (0..1), message and optional columns (`labels_used`, `candidate_version`)."""
    sets = ["progress = ?", "message = ?"] + [f"{name} = ?" for name in columns]
    with transaction(db):
        db.execute(
            f"UPDATE retrain_runs SET {', '.join(sets)} WHERE id = ? AND state = 'running'",
            [min(max(progress, 0.0), 1.0), message, *columns.values(), run_id],
        )


def finish_run(
    db: sqlite_utils.Database, run_id: int, state: str, message: str,
    metrics: dict[str, Any] | None = None, now: float | None = None,
) -> bool:
    """Move a `running` row to a final state (call inside a transaction or alone).

    Returns:
        False when the row was not running any more (e.g. already marked dead).
    """
    if state not in FINAL_STATES:
        raise ValueError(f"state must be one of {FINAL_STATES}, got {state!r}")
    progress = "1" if state != "failed" else "progress"
    cursor = db.execute(
        f"UPDATE retrain_runs SET state = ?, message = ?, finished_at = ?, progress = {progress}, "
        "metrics = COALESCE(?, metrics) WHERE id = ? AND state = 'running'",
        [state, message, time.time() if now is None else now,
         json.dumps(metrics) if metrics is not None else None, run_id],
    )
    return cursor.rowcount == 1


def pid_alive(pid: int | None) -> bool:
    """Whether `pid` is a live (not zombie) retrain worker process."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc") / str(pid)
    try:
        stat = (proc / "stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
        cmdline = (proc / "cmdline").read_bytes()
        return any(module.encode() in cmdline for module in _WORKER_MODULES)
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def reap_dead_runs(db: sqlite_utils.Database, now: float | None = None, *,
                   replica: str | None = None, live: set[str] | None = None) -> list[int]:
    """Mark `running` rows whose worker is gone as `failed` ('process died'); return their ids.

    A run started by this replica (`replica`, or by no named replica) is judged by its
    process; one started by another replica, whose process this host cannot see, is
    dead once that replica is not among the `live` ones (None: judge every run here).
    """
    now = time.time() if now is None else now
    dead = []
    for run_id, pid, started, owner in db.execute(
        "SELECT id, pid, started_at, replica FROM retrain_runs WHERE state = 'running'"
    ).fetchall():
        if live is not None and owner is not None and owner != replica:
            if owner not in live:
                dead.append(run_id)
            continue
        if pid is None and now - started < START_GRACE_SECONDS:
            continue  # being spawned
        if not pid_alive(pid):
            dead.append(run_id)
    for run_id in dead:
        with transaction(db):
            finish_run(db, run_id, "failed", "process died", now=now)
    return dead


def reject_orphaned_candidates(db: sqlite_utils.Database) -> list[tuple[str, int]]:
    """Reject `candidate` models whose retrain run ended `failed` (or has no row).

    A worker killed between registering its candidate and deciding on it leaves a
    candidate that no promotion rule decided on; left alone it stays a candidate forever
    and looks like one awaiting an admin. Candidates of `running` runs are still being
    decided; those of `succeeded` runs (``retrain.auto_promote: false``) do await an
    admin; imported ones are an admin's. Returns (version, run id) of those rejected.
    """
    rows = db.execute(
        "SELECT m.version, CAST(substr(m.source, 9) AS INTEGER) AS run_id FROM models m "
        "WHERE m.status = 'candidate' AND m.source LIKE 'retrain:%' AND NOT EXISTS ("
        "SELECT 1 FROM retrain_runs r WHERE r.id = CAST(substr(m.source, 9) AS INTEGER) "
        "AND r.state IN ('running', 'succeeded')) ORDER BY m.version"
    ).fetchall()
    orphans = [(str(version), int(run_id)) for version, run_id in rows]
    for version, run_id in orphans:
        with transaction(db):
            db.execute(
                "UPDATE models SET status = 'rejected', note = ? "
                "WHERE version = ? AND status = 'candidate'",
                [f"retrain run {run_id} ended before deciding on it (failed or killed)",
                 version],
            )
    return orphans


def last_run(db: sqlite_utils.Database) -> dict[str, Any] | None:
    """The most recent run row (any state), metrics decoded."""
    rows = list(db.query("SELECT * FROM retrain_runs ORDER BY id DESC LIMIT 1"))
    if not rows:
        return None
    row = rows[0]
    row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else None
    return row


def labels_since_last_run(db: sqlite_utils.Database, class_names: list[str]) -> int:
    """Current class labels (with a split) stored after the last run started."""
    last = last_run(db)
    since = last["started_at"] if last is not None else -1.0
    marks = ",".join("?" * len(class_names))
    return int(db.execute(
        f"SELECT COUNT(*) FROM labels WHERE superseded_by IS NULL AND split IS NOT NULL "
        f"AND label IN ({marks}) AND created_at > ?",
        [*class_names, since],
    ).fetchone()[0])


def last_label_at(db: sqlite_utils.Database, class_names: list[str]) -> float | None:
    """When the newest current class label (with a split) was stored; None without one."""
    marks = ",".join("?" * len(class_names))
    value = db.execute(
        f"SELECT MAX(created_at) FROM labels WHERE superseded_by IS NULL AND split IS NOT NULL "
        f"AND label IN ({marks})", class_names).fetchone()[0]
    return None if value is None else float(value)


def retrain_status(db: sqlite_utils.Database, class_names: list[str] | None = None
                   ) -> dict[str, Any]:
    """What `triage status` shows about retraining (JSON-ready).

    Args:
        db: The store (read-only is enough).
        class_names: `model.labels`, to count new labels (default normal, pneumonia).

    Returns:
        `running` (bool), `run` (the latest run: id, trigger, state, progress, message,
        started_at, finished_at, candidate_version, labels_used) or None,
        `labels_since_last_run` and `serving_version`.
    """
    names = class_names or ["normal", "pneumonia"]
    last = last_run(db)
    run = None
    if last is not None:
        run = {key: last[key] for key in (
            "id", "trigger", "state", "progress", "message", "started_at", "finished_at",
            "candidate_version", "labels_used")}
    serving = db.execute("SELECT version FROM models WHERE status = 'serving'").fetchone()
    return {
        "running": bool(last is not None and last["state"] == "running"),
        "run": run,
        "labels_since_last_run": labels_since_last_run(db, names),
        "serving_version": serving[0] if serving else None,
    }


def record_forgetting(db: sqlite_utils.Database, run_id: int,
                      rows: list[tuple[int, int, bool]]) -> None:  # fmt: skip
    """Store each trained study's (study id, forgetting events, learned) of run `run_id`."""
    with transaction(db):
        for study_id, events, learned in rows:
            db.execute("INSERT INTO forgetting (run_id, study_id, events, learned) "
                       "VALUES (?, ?, ?, ?)", [run_id, study_id, events, int(learned)])


def forgetting_of(db: sqlite_utils.Database, study_id: int) -> dict[str, int] | None:
    """A study's forgetting events over every run that trained on it: `trainings` (runs),
    `events` (their sum) and `never_learned` (runs in which an image of it was never
    classified correctly); None when no run trained on it yet."""
    runs, events, missed = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(events), 0), COALESCE(SUM(1 - learned), 0) "
        "FROM forgetting WHERE study_id = ?", [study_id]).fetchone()
    if not runs:
        return None
    return {"trainings": int(runs), "events": int(events), "never_learned": int(missed)}


def unforgettable_studies(db: sqlite_utils.Database) -> set[int]:
    """Studies every run that trained on them learned and never forgot."""
    return {int(row[0]) for row in db.execute(
        "SELECT study_id FROM forgetting GROUP BY study_id "
        "HAVING SUM(events) = 0 AND MIN(learned) = 1").fetchall()}
