"""The model registry: versioned checkpoints under ``paths.models``, their status in SQLite.

A version is a folder ``<models>/<version>/`` holding ``checkpoint.pt``; its row in the
``models`` table says where it came from and whether it is ``serving``, a ``candidate``,
``retired`` or ``rejected``. Exactly one version serves at a time; promotion flips the
rows in one transaction, so the scorer, which reads the serving version before each
study, swaps atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from triage.db import transaction
from triage.errors import TriageError
from triage.model.checkpoint import Checkpoint, load_checkpoint
from triage.model.settings import ModelSettings

CHECKPOINT_NAME = "checkpoint.pt"


class ModelError(TriageError):
    """A model version is unknown, unreadable or does not fit this configuration."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    status: str
    path: Path
    parent: str | None
    source: str
    created_at: float
    promoted_at: float | None
    metrics: dict[str, Any] | None
    note: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version, "status": self.status, "path": str(self.path),
            "parent": self.parent, "source": self.source,
            "created_at": _iso(self.created_at),
            "promoted_at": _iso(self.promoted_at) if self.promoted_at else None,
            "metrics": self.metrics, "note": self.note,
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class ModelRegistry:
    """Model versions of one state directory."""

    def __init__(self, db: sqlite_utils.Database, root: Path, settings: ModelSettings) -> None:
        self._db = db
        self._root = root
        self._settings = settings

    def list(self) -> list[ModelVersion]:
        rows = self._db.query("SELECT * FROM models ORDER BY created_at, version")
        return [self._row(row) for row in rows]

    def get(self, version: str) -> ModelVersion:
        rows = list(self._db.query("SELECT * FROM models WHERE version = ?", [version]))
        if not rows:
            raise ModelError(f"no model version {version!r}; `triage models list` shows them")
        return self._row(rows[0])

    def serving(self) -> ModelVersion | None:
        rows = list(self._db.query("SELECT * FROM models WHERE status = 'serving'"))
        return self._row(rows[0]) if rows else None

    def load(self, version: str) -> Checkpoint:
        """Load a version's checkpoint, checked against the configured model settings."""
        entry = self.get(version)
        try:
            return load_checkpoint(entry.path, expected=self._settings)
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(f"model {version} cannot be used: {exc}") from None

    def add(
        self,
        checkpoint_file: Path,
        *,
        source: str,
        parent: str | None = None,
        metrics: dict[str, Any] | None = None,
        data_summary: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Copy a checkpoint into the store as a new ``candidate`` version.

        The file is loaded first: one that does not fit the configuration (classes,
        input size, architecture) is refused with the reason.
        """
        try:
            load_checkpoint(checkpoint_file, expected=self._settings)
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(str(exc)) from None
        version = self._next_version()
        folder = self._root / version
        folder.mkdir(parents=True, exist_ok=False)
        partial = folder / (CHECKPOINT_NAME + ".partial")
        shutil.copyfile(checkpoint_file, partial)
        partial.replace(folder / CHECKPOINT_NAME)
        with transaction(self._db):
            self._db.execute(
                "INSERT INTO models (version, status, path, parent, source, created_at, "
                "metrics, data_summary) VALUES (?, 'candidate', ?, ?, ?, ?, ?, ?)",
                [version, str(folder / CHECKPOINT_NAME), parent, source, time.time(),
                 json.dumps(metrics) if metrics is not None else None,
                 json.dumps(data_summary) if data_summary is not None else None],
            )
        return self.get(version)

    def promote(self, version: str, note: str | None = None) -> ModelVersion:
        """Make ``version`` the serving model; the previous one becomes ``retired``."""
        self.load(version)  # refuse a checkpoint that would fail in the scorer
        with transaction(self._db):
            self._db.execute("UPDATE models SET status = 'retired' WHERE status = 'serving'")
            self._db.execute(
                "UPDATE models SET status = 'serving', promoted_at = ?, note = COALESCE(?, note) "
                "WHERE version = ?",
                [time.time(), note, version],
            )
        return self.get(version)

    def _next_version(self) -> str:
        count = self._db.execute("SELECT COUNT(*) FROM models").fetchone()[0]
        number = int(count) + 1
        while (self._root / f"v{number:04d}").exists():
            number += 1
        return f"v{number:04d}"

    @staticmethod
    def _row(row: dict[str, Any]) -> ModelVersion:
        return ModelVersion(
            version=row["version"], status=row["status"], path=Path(row["path"]),
            parent=row["parent"], source=row["source"], created_at=row["created_at"],
            promoted_at=row["promoted_at"],
            metrics=json.loads(row["metrics"]) if row["metrics"] else None,
            note=row["note"],
        )
