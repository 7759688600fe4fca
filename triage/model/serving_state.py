"""The scorer's serving status as the store keeps it (table `serving_state`), readable
without the model code: `triage status` and the ops summary read it, the scorer's
`ServingLoader` (`triage.model.serving`) writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import sqlite_utils

from triage.store.db import schema_version

_SERVING_STATE_SCHEMA = 7


@dataclass(frozen=True)
class ServingStatus:
    """What the scorer serves, against what the registry says.

    Attributes:
        registry_version: The registry's ``serving`` version (None: none).
        served_version: The version the scorer uses (None: cold start or none loads).
        ok: The scorer serves the registry's version (or there is none yet: cold start).
        reason: Why not: the load-failure reason of the registry's version (or of the
            last version tried when none loads); None when ok.
        detail: One line for operators, e.g. "v0003 cannot be loaded (corrupt,
            ValueError); serving v0002"; None when ok.
        since: When this status began (Unix seconds).
    """

    registry_version: str | None
    served_version: str | None
    ok: bool
    reason: str | None = None
    detail: str | None = None
    since: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"registry_version": self.registry_version,
                "served_version": self.served_version, "ok": self.ok,
                "reason": self.reason, "detail": self.detail, "since": self.since}

    def same(self, other: ServingStatus | None) -> bool:
        """Same situation (``since`` aside)."""
        return other is not None and replace(self, since=0.0) == replace(other, since=0.0)


def read_serving_status(db: sqlite_utils.Database) -> ServingStatus | None:
    """The stored status, or None before the scorer wrote one (or on an older store)."""
    if schema_version(db) < _SERVING_STATE_SCHEMA:
        return None
    row = db.execute(
        "SELECT registry_version, served_version, ok, reason, detail, since "
        "FROM serving_state WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    return ServingStatus(row[0], row[1], bool(row[2]), row[3], row[4], float(row[5]))
