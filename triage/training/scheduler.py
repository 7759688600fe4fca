"""When to retrain, and starting the training process without blocking the caller.

The daemon loop calls :meth:`RetrainScheduler.due` every few seconds and, when it names a
trigger, :meth:`RetrainScheduler.start`. `triage retrain` calls `start("manual")`.
Triggers: `labels` once `retrain.min_new_labels` class labels arrived since the last run
started, `schedule` once `retrain.every_hours` passed since then (with at least one new
label; the first run needs `min_new_labels`), whichever comes first. Nothing is due while
a run is `running`, and a run whose process died is marked failed first.

With `retrain.nproc` > 1 the process started is torch's launcher running the worker in
that many processes (`triage.training.distributed.launch_command`); the scheduler
watches, signals and reaps the launcher as it does the worker otherwise.

Replicas (`triage.store.replicas`): a run records the replica that started it. This
scheduler judges its own runs by their processes, and another replica's by whether that
replica is live (its worker runs on a host this one cannot see). Which replica's
scheduler starts runs is the daemon's `retrain` lease; two cannot run at once anyway
(`create_run` refuses while one is `running`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from triage.store import db as store
from triage.store.replicas import live_names
from triage.telemetry.logs import event
from triage.training.distributed import launch_command
from triage.training.runs import (
    WORKER_MODULE,
    create_run,
    finish_run,
    labels_since_last_run,
    last_label_at,
    last_run,
    reap_dead_runs,
    reject_orphaned_candidates,
    set_pid,
)

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger("triage.retrain")


def due_trigger(new_labels: int, since_last_start: float | None, settings: Settings,
                since_last_label: float | None = None) -> str | None:
    """The rule of `RetrainScheduler.due`, on counts (the lockstep benchmark uses it too).

    Args:
        new_labels: Class labels stored since the last run started.
        since_last_start: Seconds since the last run started; None before the first run.
        settings: `retrain.min_new_labels`, `retrain.idle_minutes` and `retrain.every_hours`.
        since_last_label: Seconds since the newest label was stored; None: unknown.

    Returns:
        `labels` (enough new labels), `idle` (new labels waiting and none came for
        `idle_minutes`: the stream went quiet, its last labels still train the served
        model), `schedule` (`every_hours` passed with a new label) or None.
    """
    retrain = settings.retrain
    if new_labels >= retrain.min_new_labels:
        return "labels"
    if new_labels > 0 and since_last_label is not None \
            and since_last_label >= retrain.idle_minutes * 60:
        return "idle"
    if (since_last_start is not None and new_labels > 0
            and since_last_start >= retrain.every_hours * 3600):
        return "schedule"
    return None


class RetrainScheduler:
    """Decides when a retrain is due and spawns the worker process.

    Args:
        settings: The configuration (its `retrain` section and paths).
        database: The store, as `Settings.database()` gives it (the scheduler opens its
            own connection per call, so it may be used from any one thread).
        clock: Epoch seconds (tests pass a fake one).
    """

    def __init__(self, settings: Settings, database: Path | str,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._database = database
        self._clock = clock
        self._replica = settings.replica_name()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def processes(self) -> dict[int, subprocess.Popen[bytes]]:
        """Worker processes started by this scheduler, by run id (still running or not)."""
        return dict(self._procs)

    def check(self) -> list[int]:
        """Reap finished children, mark runs whose process died and reject the candidates
        they left; return those run ids. The daemon calls it at start-up too."""
        for run_id, proc in list(self._procs.items()):
            if proc.poll() is not None:  # reaped: no zombie keeps a dead pid "alive"
                del self._procs[run_id]
        db = store.connect(self._database)
        try:
            now = self._clock()
            live = live_names(db, now, self._settings.replica.lease_seconds)
            dead = reap_dead_runs(db, now, replica=self._replica, live=live | {self._replica})
            orphans = reject_orphaned_candidates(db)
            ended = {int(run_id) for (run_id,) in db.execute(
                "SELECT id FROM retrain_runs WHERE state != 'running'").fetchall()}
        finally:
            db.close()
        for run_id in dead:
            event(log, "retrain_process_died", logging.ERROR, run_id=run_id,
                  recovered="marked failed")
        for version, run_id in orphans:
            event(log, "retrain_candidate_orphaned", logging.WARNING, version=version,
                  run_id=run_id, recovered="rejected")
        removed = self._remove_leftovers(ended)
        if removed:
            event(log, "retrain_leftovers_removed", logging.WARNING, runs=removed)
        return dead

    def _remove_leftovers(self, ended: set[int]) -> list[int]:
        """Delete what workers killed by SIGKILL left behind, for runs that ended: the
        candidate checkpoint written before registration (`models/.retrain-N.pt`, and
        the `.partial` it is written through) and the settings file
        (`retrain/run-N.json`). A worker that ends by itself removes them, one killed
        cannot (during the re-scoring after a promotion, the run has already ended).
        Returns the runs whose files were removed."""
        models = self._settings.path("models")
        found = [*models.glob(".retrain-*.pt"), *models.glob(".retrain-*.pt.partial"),
                 *(self._settings.home / "retrain").glob("run-*.json")]
        removed: set[int] = set()
        for path in found:
            digits = path.name.removeprefix(".retrain-").removeprefix("run-").split(".")[0]
            if not digits.isdigit() or int(digits) not in ended:
                continue  # a running run's (or not ours)
            try:
                path.unlink()
                removed.add(int(digits))
            except FileNotFoundError:
                pass  # its worker removed it meanwhile
            except OSError as exc:
                event(log, "retrain_leftover_not_removed", logging.WARNING,
                      run_id=int(digits), file=path.name,
                      error=exc.strerror or type(exc).__name__)
        return sorted(removed)

    def due(self, now: float | None = None) -> str | None:
        """The trigger that is due now (`labels`, `idle` or `schedule`), or None.

        None when `retrain.enabled` is false or a run is running (after reaping dead ones).
        """
        if not self._settings.retrain.enabled:
            return None
        self.check()
        now = self._clock() if now is None else now
        db = store.connect(self._database)
        try:
            last = last_run(db)
            if last is not None and last["state"] == "running":
                return None
            names = list(self._settings.model.labels)
            new = labels_since_last_run(db, names)
            newest = last_label_at(db, names) if new else None
        finally:
            db.close()
        since = None if last is None else now - last["started_at"]
        quiet = None if newest is None else now - newest
        return due_trigger(new, since, self._settings, quiet)

    def start(self, trigger: str, *, stderr: Path | None = None) -> int:
        """Insert a `running` row and spawn the worker (under torchrun with
        `retrain.nproc` > 1); return the run id at once.

        Args:
            trigger: `labels`, `idle`, `schedule` or `manual`.
            stderr: Where the worker's output goes (default `<logs>/retrain.log`, appended).

        Raises:
            RetrainBusy: A run is already running.
        """
        self.check()
        db = store.connect(self._database)
        try:
            run_id = create_run(db, trigger, self._clock(), self._replica)
            folder = self._settings.home / "retrain"  # settings files for the worker
            folder.mkdir(parents=True, exist_ok=True)
            settings_file = folder / f"run-{run_id}.json"
            settings_file.write_text(json.dumps(self._settings.model_dump(mode="json")))
            out = stderr or self._settings.path("logs") / "retrain.log"
            out.parent.mkdir(parents=True, exist_ok=True)
            arguments = ["--run-id", str(run_id), "--settings", str(settings_file)]
            nproc, environ = self._settings.retrain.nproc, None
            if nproc > 1:
                command = launch_command(nproc, WORKER_MODULE, arguments)
                # each rank sets `retrain.threads` itself; this keeps torchrun from
                # warning that it chose a thread count
                environ = {**os.environ, "OMP_NUM_THREADS": str(self._settings.retrain.threads)}
            else:
                command = [sys.executable, "-m", WORKER_MODULE, *arguments]
            try:
                with open(out, "ab") as sink:
                    proc = subprocess.Popen(
                        command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
                        cwd=self._settings.home, start_new_session=True, env=environ,
                    )
            except OSError as exc:
                with store.transaction(db):
                    finish_run(db, run_id, "failed", f"cannot start the worker: {exc.strerror}")
                settings_file.unlink(missing_ok=True)
                raise
            self._procs[run_id] = proc
            set_pid(db, run_id, proc.pid)
        finally:
            db.close()
        event(log, "retrain_spawned", run_id=run_id, trigger=trigger, pid=proc.pid)
        return run_id
