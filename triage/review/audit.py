"""The audit trail: who did what to which study, when, from where, under which model.

Append-only: the table has triggers that refuse UPDATE and DELETE. Rows are written in
the same transaction as the action they record, so an action without its audit row
cannot exist.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlite_utils

ACTIONS = (
    "view", "claim", "release", "lease_expired", "label", "correct",
    "token_create", "token_revoke", "model_import", "model_promote",
    "dicomweb_search", "dicomweb_retrieve", "dicomweb_store",
)  # fmt: skip


def record(
    db: sqlite_utils.Database,
    *,
    actor: str,
    action: str,
    role: str | None = None,
    study_id: int | None = None,
    address: str | None = None,
    model_version: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit row (call inside the action's transaction)."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
    db.execute(
        "INSERT INTO audit (at, actor, role, action, study_id, address, model_version, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [time.time(), actor, role, action, study_id, address, model_version,
         json.dumps(detail) if detail else None],
    )


def since(db: sqlite_utils.Database, start: float) -> list[dict[str, Any]]:
    """Audit rows at or after ``start`` (epoch seconds), oldest first."""
    rows = db.query("SELECT * FROM audit WHERE at >= ? ORDER BY id", [start])
    return [
        {**row, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["at"])),
         "detail": json.loads(row["detail"]) if row["detail"] else None}
        for row in rows
    ]
