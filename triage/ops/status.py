"""What ``triage status`` reports: files by state, studies by state, inbox backlog.

Reads the store read-only, so it works beside a running daemon and after a crash.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.model.serving_state import read_serving_status
from triage.store import db as store
from triage.store.db import FINAL_FILE_STATES, STUDY_STATES, count_by
from triage.training.runs import retrain_status

if TYPE_CHECKING:
    from triage.config import Settings


def collect_status(settings: Settings) -> dict[str, Any]:
    """Counts from the store and the inbox, as a JSON-ready dict."""
    inbox = settings.path("inbox")
    waiting = sum(len(files) for _, _, files in os.walk(inbox)) if inbox.exists() else 0
    database = settings.database()
    exists = store.is_postgres_url(database) or Path(database).exists()
    files: dict[str, int] = {}
    studies: dict[str, int] = {}
    queue: dict[str, int] = {}
    retrain: dict[str, Any] | None = None
    serving: dict[str, Any] | None = None
    schema = 0
    if exists:
        db = store.connect(database, readonly=True)
        try:
            schema = store.schema_version(db)
            if schema:
                files = count_by(db, "files", "state")
                studies = count_by(db, "studies", "state")
            if schema >= 3:
                queue = count_by(db, "queue_items", "state")
            if schema >= 4:
                retrain = retrain_status(db, settings.model.labels)
            served = read_serving_status(db)
            serving = served.to_json() if served is not None else None
        finally:
            db.close()
    in_flight = sum(files.get(state, 0) for state in ("received", "reading", "moving"))
    return {
        "home": str(settings.home),
        "database": store.describe(database) if exists else None,
        "schema_version": schema,
        "files": {state: files.get(state, 0) for state in FINAL_FILE_STATES}
        | {"in_flight": in_flight, "total": sum(files.values())},
        "studies": {state: studies.get(state, 0) for state in STUDY_STATES}
        | {"total": sum(studies.values())},
        "inbox_waiting": waiting,
        "queue": {state: queue.get(state, 0) for state in ("pending", "claimed", "labeled")},
        "retrain": retrain,
        # what the scorer actually serves and why (None until it first looked)
        "serving": serving,
    }


def format_status(status: dict[str, Any]) -> str:
    """Human-readable rendering of :func:`collect_status`."""
    lines = [f"home: {status['home']}", f"inbox waiting: {status['inbox_waiting']}", "files:"]
    lines += [f"  {state:<13} {count}" for state, count in status["files"].items()]
    lines.append("studies:")
    lines += [f"  {state:<13} {count}" for state, count in status["studies"].items()]
    lines.append("review queue:")
    lines += [f"  {state:<13} {count}" for state, count in status["queue"].items()]
    retrain = status["retrain"]
    if retrain:
        run = retrain.get("run")
        lines.append(f"serving model: {retrain.get('serving_version') or 'none (cold start)'}")
        serving = status.get("serving")
        if serving and not serving["ok"]:
            lines.append(f"DEGRADED: scorer serves {serving['served_version'] or 'nothing'} "
                         f"({serving['reason']}): {serving['detail']}")
        lines.append(f"labels since last retrain: {retrain.get('labels_since_last_run')}")
        if run:
            lines.append(f"last retrain: run {run['id']} {run['state']} "
                         f"({round(100 * (run.get('progress') or 0))}%) {run.get('message') or ''}")
    return "\n".join(lines)
