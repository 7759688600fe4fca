"""The model registry: versioned checkpoints under ``paths.models``, their status in SQLite.

A version is a folder ``<models>/<version>/`` holding ``checkpoint.pt``; its row in the
``models`` table says where it came from and whether it is ``serving``, a ``candidate``,
``retired`` or ``rejected``. Exactly one version serves at a time; promotion flips the
rows in one transaction, so the scorer, which reads the serving version before each
study, swaps atomically.

Life of a version: ``candidate`` (registered by import or a retrain run) -> ``serving``
(promoted) -> ``retired`` (another version was promoted). A candidate that loses to the
serving model becomes ``rejected`` with the reason in ``note``; a serving version that is
rolled back becomes ``rejected`` too (so a second rollback goes further back, never
forth), and the most recently promoted ``retired`` version serves again.
:func:`promotion_decision` is the rule a retrain run applies.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
import torch

from triage.errors import TriageError
from triage.model.calibration import OperatingPoint
from triage.model.checkpoint import FORMAT, Checkpoint, load_checkpoint
from triage.model.settings import ModelSettings
from triage.store.db import transaction

CHECKPOINT_NAME = "checkpoint.pt"
DIGEST_SUFFIX = ".sha256"
"""``<checkpoint>.sha256``: the file's SHA-256 when it was added, checked at every load
(torch reads a checkpoint with a flipped byte in its weights without complaint)."""


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
    data_summary: dict[str, Any] | None = None

    def to_json(self, *, full: bool = False) -> dict[str, Any]:
        """JSON-ready fields; ``full`` adds the data summary (label ids used)."""
        out = {
            "version": self.version, "status": self.status, "path": str(self.path),
            "parent": self.parent, "source": self.source,
            "created_at": _iso(self.created_at),
            "promoted_at": _iso(self.promoted_at) if self.promoted_at else None,
            "metrics": self.metrics, "note": self.note,
        }
        if full:
            out["data_summary"] = self.data_summary
        return out


PROMOTION_METRICS = ("auroc", "accuracy", "sensitivity", "specificity", "ece")


def promotion_decision(
    candidate: Mapping[str, Any] | None,
    champion: Mapping[str, Any] | None,
    tolerance: float,
    noise: float = 0.0,
) -> tuple[bool, str]:
    """Whether a candidate may replace the serving model, and why (one line).

    Rule: every metric of :data:`PROMOTION_METRICS` of the candidate is finite, and its
    validation AUROC is at least the champion's minus ``tolerance``, both measured on the
    same (current) validation set. Without a champion (the first model) finite metrics
    on a validation set holding every class (AUROC finite) suffice. A champion whose own
    AUROC is not finite on today's set is replaced by any finite candidate.

    Args:
        candidate: The candidate's validation metrics (`auroc`, ...), or None.
        champion: The serving model's metrics on the same set, or None if none serves.
        tolerance: Allowed AUROC drop, >= 0.
        noise: Further allowed drop for the validation set's sampling noise (e.g. 1.645
            DeLong standard errors of the paired difference), >= 0.
    """
    if not (isinstance(tolerance, int | float) and math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not candidate:
        return False, "the candidate has no validation metrics"
    bad = [k for k in PROMOTION_METRICS if not _finite(candidate.get(k))]
    if bad:
        return False, f"candidate metrics not finite: {', '.join(bad)}"
    auroc = float(candidate["auroc"])
    if champion is None:
        return True, f"first model: validation AUROC {auroc:.4f}"
    best = champion.get("auroc")
    if not _finite(best):
        return True, f"the serving model has no finite AUROC; candidate {auroc:.4f}"
    if not (_finite(noise) and noise >= 0):
        noise = 0.0
    slack = f"- tolerance {tolerance:g}" + (f" - noise {noise:.4f}" if noise else "")
    if auroc >= float(best) - tolerance - noise:
        return True, f"validation AUROC {auroc:.4f} >= serving {float(best):.4f} {slack}"
    return False, f"validation AUROC {auroc:.4f} < serving {float(best):.4f} {slack}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify_digest(version: str, path: Path) -> None:
    """Refuse a checkpoint whose bytes changed since it was added (versions added before
    digests were kept have none and are not checked; a missing file is left to the
    loader, which names it)."""
    try:
        expected = path.with_name(path.name + DIGEST_SUFFIX).read_text().strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ModelError(f"model {version} cannot be used: its checksum file cannot be "
                         f"read ({exc.strerror or type(exc).__name__})") from None
    try:
        actual = _sha256(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ModelError(f"model {version} cannot be used: checkpoint cannot be read "
                         f"({exc.strerror or type(exc).__name__})") from None
    if actual != expected:
        raise ModelError(f"model {version} cannot be used: checkpoint is corrupt or "
                         "unreadable (its SHA-256 differs from the one recorded when it "
                         "was added)")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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

    def show(self, version: str) -> dict[str, Any]:
        """Everything stored about a version (metrics, data summary, note), JSON-ready.

        ``operating_point`` is the temperature and threshold stored in its checkpoint, or
        None when it has none (then it predicts at T = 1 by argmax) or cannot be read.
        """
        entry = self.get(version)
        out = entry.to_json(full=True)
        try:
            point = read_operating_point(entry.path)
        except ModelError:
            point = None
        out["operating_point"] = point.to_json() if point is not None else None
        return out

    def operating_point(self, version: str) -> OperatingPoint | None:
        """The operating point stored in a version's checkpoint; None when it has none.

        Raises:
            ModelError: ``version`` is unknown or its checkpoint cannot be read.
        """
        return read_operating_point(self.get(version).path)

    def serving(self) -> ModelVersion | None:
        rows = list(self._db.query("SELECT * FROM models WHERE status = 'serving'"))
        return self._row(rows[0]) if rows else None

    def load(self, version: str) -> Checkpoint:
        """Load a version's checkpoint, checked against the configured model settings and
        against the SHA-256 recorded when it was added (:data:`DIGEST_SUFFIX`)."""
        entry = self.get(version)
        try:
            checkpoint = load_checkpoint(entry.path, expected=self._settings)
            checkpoint.operating_point  # noqa: B018 - a bad one would fail every study
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(f"model {version} cannot be used: {exc}") from None
        _verify_digest(version, entry.path)  # what loads may still have damaged weights
        return checkpoint

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
            load_checkpoint(checkpoint_file, expected=self._settings).operating_point  # noqa: B018
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(str(exc)) from None
        version = self._next_version()
        folder = self._root / version
        folder.mkdir(parents=True, exist_ok=False)
        partial = folder / (CHECKPOINT_NAME + ".partial")
        shutil.copyfile(checkpoint_file, partial)
        digest = folder / (CHECKPOINT_NAME + DIGEST_SUFFIX + ".partial")
        digest.write_text(_sha256(partial) + "\n")
        digest.replace(folder / (CHECKPOINT_NAME + DIGEST_SUFFIX))
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

    def promote(
        self,
        version: str,
        note: str | None = None,
        *,
        also: Callable[[sqlite_utils.Database], None] | None = None,
    ) -> ModelVersion:
        """Make ``version`` the serving model; the previous one becomes ``retired``.

        Args:
            version: The version to serve.
            note: Replaces the version's note when given.
            also: Optional callable run inside the same transaction (e.g. to finish a
                retrain run's row), so both changes happen or neither does.
        """
        self.load(version)  # refuse a checkpoint that would fail in the scorer
        with transaction(self._db):
            self._db.execute(
                "UPDATE models SET status = 'retired' WHERE status = 'serving' AND version != ?",
                [version],
            )
            self._db.execute(
                "UPDATE models SET status = 'serving', promoted_at = ?, note = COALESCE(?, note) "
                "WHERE version = ?",
                [time.time(), note, version],
            )
            if also is not None:
                also(self._db)
        return self.get(version)

    def reject(
        self,
        version: str,
        note: str,
        *,
        also: Callable[[sqlite_utils.Database], None] | None = None,
    ) -> ModelVersion:
        """Mark a candidate ``rejected`` with the reason in ``note``.

        Raises:
            ModelError: ``version`` is unknown or is the serving model (roll back instead).
        """
        if self.get(version).status == "serving":
            raise ModelError(f"{version} is serving: use `triage models rollback`")
        with transaction(self._db):
            self._db.execute(
                "UPDATE models SET status = 'rejected', note = ? WHERE version = ?",
                [note, version],
            )
            if also is not None:
                also(self._db)
        return self.get(version)

    def previous(self) -> ModelVersion | None:
        """The version a rollback would serve: the most recently promoted ``retired`` one."""
        rows = list(self._db.query(
            "SELECT * FROM models WHERE status = 'retired' AND promoted_at IS NOT NULL "
            "ORDER BY promoted_at DESC, version DESC LIMIT 1"
        ))
        return self._row(rows[0]) if rows else None

    def rollback(self, note: str | None = None) -> ModelVersion:
        """Serve the previous version again; the serving one becomes ``rejected``.

        Returns:
            The version now serving.

        Raises:
            ModelError: Nothing serves, no earlier version was ever promoted, or its
                checkpoint cannot be loaded; nothing is changed then.
        """
        current = self.serving()
        if current is None:
            raise ModelError("no model is serving: nothing to roll back")
        target = self.previous()
        if target is None:
            raise ModelError(
                f"{current.version} is the only version ever promoted: nothing to roll back to"
            )
        self.load(target.version)
        with transaction(self._db):
            self._db.execute(
                "UPDATE models SET status = 'rejected', note = ? WHERE version = ?",
                [note or f"rolled back to {target.version}", current.version],
            )
            self._db.execute(
                "UPDATE models SET status = 'serving', promoted_at = ? WHERE version = ?",
                [time.time(), target.version],
            )
        return self.get(target.version)

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
            data_summary=json.loads(row["data_summary"]) if row["data_summary"] else None,
        )


def model_operating_point(db: sqlite_utils.Database, version: str | None) -> OperatingPoint | None:
    """The operating point a model version scores at (what ``Checkpoint.operating_point``
    gives the scorer): the stored one, or the identity (T = 1, argmax) for a checkpoint
    saved without one. None when ``version`` is None (cold start), unknown, or its
    checkpoint cannot be read. Cheap after the first call per file (see
    :func:`read_operating_point`), so it can be used on the request path.
    """
    if version is None:
        return None
    row = db.execute("SELECT path FROM models WHERE version = ?", [version]).fetchone()
    if row is None:
        return None
    try:
        point = read_operating_point(Path(row[0]))
    except ModelError:
        return None
    return point if point is not None else OperatingPoint.from_json(None)


def read_operating_point(path: Path) -> OperatingPoint | None:
    """The operating point in a checkpoint file's metadata; None when it has none.

    Only the metadata is read (the weights are memory-mapped, not loaded), and the result
    is cached per file (path, modification time and size): a version's file never changes.

    Raises:
        ModelError: The file is missing or unreadable, or its operating point is invalid.
    """
    try:
        stat = Path(path).stat()
    except OSError as exc:
        raise ModelError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from None
    return _file_operating_point(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _file_operating_point(path: str, mtime_ns: int, size: int) -> OperatingPoint | None:
    try:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip-format file: mmap is not possible
            payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        stored = json.loads(payload["metadata"]).get("operating_point")
        return OperatingPoint.from_json(stored) if stored else None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise ModelError(f"checkpoint {path}: cannot read its operating point: {exc}") from None
