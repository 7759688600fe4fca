"""Which model the scorer actually serves, and why: degraded serving, loud and safe.

The registry names the serving version; its checkpoint may still fail to load (a
damaged or missing file, a file that no longer fits the configuration). Falling back
to cold start then would route random studies up to the daily cap, so instead:

* the scorer serves the most recently promoted version that does load: the serving
  one, else the ``retired`` ones by promotion time (rolled-back versions are
  ``rejected`` and never come back by themselves);
* when none loads, :class:`ModelUnavailable` is raised and the study waits
  (``waiting_model``), neither scored nor routed, until one loads again;
* cold start is only for a registry where no version was ever promoted.

A version that failed is tried again after :data:`RETRY_SECONDS`, or at once when the
registry changes (promotion, rollback), so a restored file is picked up by itself.
Every failed load increments ``triage_serving_model_load_failures_total{reason}`` and
logs ``model_load_failed``; ``triage_serving_model_ok`` is 0 while the scorer serves
anything but the registry's serving version. The state is kept in the ``serving_state``
row (written only when it changes), so ``triage status`` and the status page, other
connections and processes, show which version serves and why. Log events and the row
carry version ids, reason codes and error types: no paths, no patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import sqlite_utils

from triage.errors import TriageError
from triage.model.checkpoint import Checkpoint
from triage.model.registry import ModelError, ModelRegistry
from triage.model.serving_state import ServingStatus, read_serving_status
from triage.store.db import transaction
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

log = logging.getLogger("triage.serving")

RETRY_SECONDS = 60.0
LOAD_FAILURE_REASONS = ("missing", "corrupt", "incompatible", "error")
"""``reason`` label values of the load-failure counter (a closed set)."""


class ModelUnavailable(TriageError):
    """Models were promoted but none loads now: the study must wait, not be cold-started
    (that would route random studies up to the daily cap)."""


def failure_reason(exc: BaseException) -> str:
    """The closed reason code of a failed load, from the registry's message."""
    message = str(exc)
    if isinstance(exc, FileNotFoundError) or "does not exist" in message:
        return "missing"
    if "corrupt or unreadable" in message or "is not a" in message or "cannot be read" in message:
        return "corrupt"
    if isinstance(exc, ModelError):
        return "incompatible"  # settings, format version, weights or operating point
    return "error"


def _promoted(db: sqlite_utils.Database) -> list[tuple[str, str]]:
    """(version, status) of the versions the scorer may serve, best first: the serving
    one, then the retired ones, most recently promoted first."""
    return [(str(v), str(s)) for v, s in db.execute(
        "SELECT version, status FROM models WHERE status = 'serving' "
        "OR (status = 'retired' AND promoted_at IS NOT NULL) "
        "ORDER BY status = 'serving' DESC, promoted_at DESC, version DESC"
    ).fetchall()]


class ServingLoader:
    """Resolves the model to serve before each study (cheap while nothing changes).

    Args:
        db: The scoring thread's connection (the status row is written through it).
        registry: The model registry.
        metrics: ``serving_model_ok`` and ``serving_model_load_failures`` are updated.
        clock: Unix seconds (tests pass a fake one).
    """

    def __init__(self, db: sqlite_utils.Database, registry: ModelRegistry, metrics: Metrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._db = db
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._model: tuple[str, Checkpoint] | None = None
        self._failed: dict[str, tuple[float, str, str]] = {}  # version: retry at, reason, type
        self._status: ServingStatus | None = read_serving_status(db)
        for reason in LOAD_FAILURE_REASONS:  # each exported at 0 from the start
            metrics.serving_model_load_failures.labels(reason)

    @property
    def status(self) -> ServingStatus | None:
        """The last resolved status (None before the first :meth:`resolve`)."""
        return self._status

    def resolve(self) -> tuple[str, Checkpoint] | None:
        """The (version, checkpoint) to score with; None during cold start.

        Raises:
            ModelUnavailable: Versions were promoted but none of them loads now.
        """
        versions = _promoted(self._db)
        wanted = versions[0][0] if versions and versions[0][1] == "serving" else None
        for gone in set(self._failed) - {version for version, _ in versions}:
            del self._failed[gone]  # rejected or rolled back meanwhile: no longer a cause
        if not versions:
            self._set(ServingStatus(None, None, True))
            return None
        for version, _ in versions:
            checkpoint = self._load(version)
            if checkpoint is not None:
                self._set(self._describe(wanted, version))
                return version, checkpoint
        self._set(self._describe(wanted, None))
        raise ModelUnavailable(
            f"none of the {len(versions)} promoted model versions loads; studies wait"
        )

    def _load(self, version: str) -> Checkpoint | None:
        """The version's checkpoint, cached; None while it failed within RETRY_SECONDS."""
        if self._model is not None and self._model[0] == version:
            return self._model[1]
        failed = self._failed.get(version)
        now = self._clock()
        # wait out RETRY_SECONDS, but not a backward step of the wall clock on top
        if failed is not None and now < failed[0] <= now + RETRY_SECONDS:
            return None
        try:
            checkpoint = self._registry.load(version)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
            reason = failure_reason(exc)
            self._failed[version] = (now + RETRY_SECONDS, reason, type(exc).__name__)
            self._metrics.serving_model_load_failures.labels(reason).inc()
            # ERROR once per version; the retries each minute only at DEBUG
            level = logging.DEBUG if failed is not None else logging.ERROR
            event(log, "model_load_failed", level, version=version, reason=reason,
                  error_type=type(exc).__name__, retry_seconds=RETRY_SECONDS)
            return None
        self._failed.pop(version, None)
        self._model = (version, checkpoint)  # one checkpoint in memory at a time
        event(log, "model_loaded", version=version)
        return checkpoint

    def _describe(self, wanted: str | None, served: str | None) -> ServingStatus:
        """The status, with every version that failed and why, for operators."""
        if served is not None and served == wanted:
            return ServingStatus(wanted, served, True)
        failures = [f"{v} cannot be loaded ({reason}, {kind})"
                    for v, (_, reason, kind) in self._failed.items()]
        if wanted is None:
            failures.insert(0, "no version has status serving")
        blamed = self._failed.get(wanted) if wanted else None
        reason = blamed[1] if blamed else (next(iter(self._failed.values()))[1]
                                           if self._failed else "no_serving_version")
        tail = f"serving {served} instead" if served else "no model loads: studies wait"
        return ServingStatus(wanted, served, False, reason, "; ".join([*failures, tail]))

    def _set(self, status: ServingStatus) -> None:
        """Update the gauge; store and log the status when the situation changed."""
        self._metrics.serving_model_ok.set(1 if status.ok else 0)
        if status.same(self._status):
            return
        now = self._clock()
        status = replace(status, since=now)
        with transaction(self._db):
            self._db.execute(
                "INSERT INTO serving_state (id, registry_version, served_version, ok, reason, "
                "detail, since, updated_at) VALUES (1, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) "
                "DO UPDATE SET registry_version = excluded.registry_version, served_version "
                "= excluded.served_version, ok = excluded.ok, reason = excluded.reason, "
                "detail = excluded.detail, since = excluded.since, "
                "updated_at = excluded.updated_at",
                [status.registry_version, status.served_version, int(status.ok),
                 status.reason, status.detail, now, now],
            )
        previous, self._status = self._status, status
        self._log_change(previous, status)

    @staticmethod
    def _log_change(previous: ServingStatus | None, status: ServingStatus) -> None:
        fields = {"registry_version": status.registry_version,
                  "served_version": status.served_version, "reason": status.reason}
        if status.ok:
            if previous is not None and not previous.ok:
                event(log, "serving_restored", **fields)
        elif status.served_version is not None:
            event(log, "serving_degraded", logging.WARNING, **fields)
        else:
            event(log, "serving_unavailable", logging.ERROR, **fields)
