"""Take one complete file from the inbox to exactly one final state, crash-safely.

Each file gets a row in the ``files`` journal, and the row and the file move in this order:

1. ``reading``: row written (path, sha256) before the file is parsed, so a file whose
   decoding kills the process is recognised on restart and, after
   ``ingest.max_read_attempts``, quarantined instead of crashing the daemon forever.
2. ``moving``: the outcome and destination are written before the file is touched.
3. The file is moved (quarantine: the reason sidecar first) or, for a duplicate, deleted.
4. One transaction stores the study, the instance, its preprocessed pixels and the final
   state.

Final states of a file that was read: ``archived`` (a scoreable image), ``unsupported``
(valid DICOM holding no scoreable image), ``out_of_scope`` (an image outside ``scope``,
:mod:`triage.ingest.scope`: archived like the others, its instance stored with
``scoreable`` 0 and the reason as ``note``, never decoded, preprocessed or scored),
``quarantined`` or ``duplicate``.

:meth:`Ingestor.recover` runs at start-up and finishes every row left in ``reading`` or
``moving`` from wherever its file now is, so a crash at any point loses no file and
counts none twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils
import torch

from triage.errors import DicomRejected
from triage.ingest.assembly import store_view_header
from triage.ingest.dicom import DicomInstance, read_instance
from triage.ingest.preprocess import preprocess
from triage.ingest.watcher import ReadyFile
from triage.store.db import transaction
from triage.store.images import to_storage
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger("triage.ingest")

# Final states whose file is kept in the archive with an ``instances`` row.
STORED_STATES = ("archived", "unsupported", "out_of_scope")


@dataclass(frozen=True)
class Outcome:
    """Where a file is going and why."""

    state: str  # archived | unsupported | out_of_scope | quarantined | duplicate
    reason_code: str | None = None
    reason: str | None = None
    detail: str = ""
    instance: DicomInstance | None = None
    tensor: torch.Tensor | None = None
    original_id: int | None = None


def _quarantine(code: str, reason: str, detail: str = "") -> Outcome:
    return Outcome("quarantined", code, reason, detail)


class Ingestor:
    """Ingests ready files one at a time; owns the ``files`` journal."""

    def __init__(
        self,
        settings: Settings,
        db: sqlite_utils.Database,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._db = db
        self._metrics = metrics
        self._clock = clock
        self._home = settings.home
        self._inbox = settings.path("inbox")
        self._received = settings.path("received")
        # the journal rows of this home's inbox and received folder (replicas share the
        # store, each reads only what arrived at it)
        self._replica = settings.replica_name()

    # -- entry points -------------------------------------------------------------------

    def ingest(self, ready: ReadyFile) -> str | None:
        """Ingest one file; return its final state, or None if it vanished unread."""
        started = time.perf_counter()
        path = ready.path
        rel = os.path.relpath(path, self._inbox)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return self._vanished(None)
        if ready.abandoned:
            outcome = _quarantine(
                "abandoned_partial",
                "partial upload abandoned: its temporary name was never renamed "
                f"and it did not change for {self._settings.ingest.abandon_after_seconds:g} s",
            )
            return self._start_without_read(rel, st.st_size, path, outcome, started)
        pre_read = self._check_file(st)
        if pre_read is not None:
            return self._start_without_read(rel, st.st_size, path, pre_read, started)
        with self._metrics.ingest_stage_seconds.labels("read").time():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return self._vanished(None)
            except OSError as exc:
                outcome = _quarantine(
                    "unreadable",
                    f"the daemon cannot read this file ({exc.strerror or type(exc).__name__})",
                )
                return self._start_without_read(rel, st.st_size, path, outcome, started)
            sha = hashlib.sha256(data).hexdigest()
        file_id = self._journal(rel, sha, len(data), "reading")
        return self._process(file_id, path, data, sha, started)

    def ingest_received(self, limit: int = 64, among: list[int] | None = None,
                        until: Callable[[], bool] | None = None) -> int:
        """Ingest up to ``limit`` network arrivals journaled ``received``, oldest first
        (only those with an id in ``among``, when given), stopping after any one of them
        once ``until()`` is true (the first is always read, so a caller that finds 0
        knows none is left); return how many were read. Each is marked ``reading``
        first, so one that kills the reader is counted like an inbox file
        (``ingest.max_read_attempts``)."""
        only, params = "", []
        if among is not None:
            if not among:
                return 0
            only, params = f" AND id IN ({', '.join('?' * len(among))})", list(among)
        rows = self._db.execute(
            f"SELECT id, inbox_path, sha256 FROM files WHERE state = 'received'{only} "
            "AND replica = ? ORDER BY id LIMIT ?", [*params, self._replica, limit]
        ).fetchall()
        read = 0
        for file_id, name, sha in rows:
            if read and until is not None and until():
                break
            read += 1
            started = time.perf_counter()
            self._db.execute("UPDATE files SET state = 'reading' WHERE id = ?", [file_id])
            location = self._received / name
            try:
                data = location.read_bytes()
            except FileNotFoundError:
                self._vanished(file_id)
                continue
            if hashlib.sha256(data).hexdigest() != sha:
                outcome = _quarantine(
                    "corrupt_received",
                    "the stored copy of a received instance no longer matches what was "
                    "received (disk or file-system fault)",
                )
                self._finish(file_id, location, outcome, sha, started)
                continue
            self._process(file_id, location, data, sha, started)
        return read

    def recover(self) -> int:
        """Finish every file left in flight by an earlier run; return how many."""
        rows = list(
            self._db.query("SELECT * FROM files WHERE state IN ('reading', 'moving') "
                           "AND replica = ? ORDER BY id", [self._replica])
        )
        for row in rows:
            self._recover_row(row)
        if rows:
            event(log, "ingest_recovered", files=len(rows))
        return len(rows)

    # -- steps --------------------------------------------------------------------------

    def _check_file(self, st: os.stat_result) -> Outcome | None:
        if stat.S_ISLNK(st.st_mode):
            return _quarantine("not_regular_file", "symbolic links in the inbox are not followed")
        if not stat.S_ISREG(st.st_mode):
            return _quarantine("not_regular_file", "not a regular file (device, pipe or socket)")
        if st.st_size > self._settings.ingest.max_file_bytes:
            return _quarantine(
                "too_large",
                f"file of {st.st_size} bytes is larger than ingest.max_file_bytes "
                f"({self._settings.ingest.max_file_bytes})",
            )
        return None

    def _start_without_read(
        self, rel: str, size: int, path: Path, outcome: Outcome, started: float
    ) -> str:
        file_id = self._journal(rel, None, size, "moving")
        return self._finish(file_id, path, outcome, None, started)

    def _journal(self, rel: str, sha: str | None, size: int, state: str) -> int:
        with transaction(self._db):
            cursor = self._db.execute(
                "INSERT INTO files (inbox_path, sha256, size, state, received_at, replica) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [rel, sha, size, state, self._clock(), self._replica],
            )
        return int(cursor.lastrowid)

    def _process(self, file_id: int, location: Path, data: bytes, sha: str, started: float) -> str:
        outcome = self._classify(data, sha)
        return self._finish(file_id, location, outcome, sha, started)

    def _classify(self, data: bytes, sha: str) -> Outcome:
        try:
            with self._metrics.ingest_stage_seconds.labels("decode").time():
                instance = read_instance(data, self._settings.ingest, self._settings.scope)
        except DicomRejected as exc:
            return _quarantine(exc.code, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - never let one file stop the daemon
            return _quarantine(
                "internal_error",
                "an unexpected error occurred while reading the file",
                type(exc).__name__,
            )
        known = self._db.execute(
            "SELECT id, sha256 FROM instances WHERE sop_uid = ?", [instance.sop_uid]
        ).fetchone()
        if known is not None:
            if known[1] == sha:
                return Outcome("duplicate", instance=instance, original_id=int(known[0]))
            return _quarantine(
                "conflict",
                "an instance with the same SOP Instance UID and different content is already "
                f"stored (instance {known[0]}); both copies are kept",
            )
        if instance.out_of_scope is not None:
            return Outcome("out_of_scope", reason_code=instance.out_of_scope.code,
                           reason=instance.out_of_scope.reason, instance=instance)
        if instance.image is None:
            return Outcome("unsupported", reason=instance.unsupported_reason, instance=instance)
        try:
            with self._metrics.ingest_stage_seconds.labels("preprocess").time():
                tensor = preprocess(
                    instance.image,
                    self._settings.model.input_size,
                    self._settings.ingest.percentile_window,
                )
        except Exception as exc:  # noqa: BLE001
            return _quarantine(
                "invalid_image", "the image could not be preprocessed", type(exc).__name__
            )
        return Outcome("archived", instance=instance, tensor=tensor)

    def _destination(self, file_id: int, outcome: Outcome, sha: str | None) -> str | None:
        if outcome.state == "duplicate":
            return None
        if outcome.state == "quarantined":
            return str(self._settings.paths.quarantine / f"{file_id}-{outcome.reason_code}.dcm")
        assert sha is not None  # archived, unsupported and out-of-scope files were read
        return str(self._settings.paths.archive / sha[:2] / sha[2:4] / f"{sha}.dcm")

    def _finish(
        self, file_id: int, location: Path, outcome: Outcome, sha: str | None, started: float
    ) -> str:
        stored = self._destination(file_id, outcome, sha)
        with transaction(self._db):
            self._db.execute(
                "UPDATE files SET state = 'moving', target_state = ?, reason_code = ?, "
                "reason = ?, stored_path = ? WHERE id = ?",
                [outcome.state, outcome.reason_code, outcome.reason, stored, file_id],
            )
        with self._metrics.ingest_stage_seconds.labels("store").time():
            self._place(file_id, location, outcome, stored)
            self._commit(file_id, outcome)
        self._metrics.ingest_file_seconds.observe(time.perf_counter() - started)
        return outcome.state

    def _place(self, file_id: int, location: Path, outcome: Outcome, stored: str | None) -> None:
        if stored is None:
            location.unlink(missing_ok=True)
            return
        dest = self._home / stored
        if outcome.state == "quarantined":
            self._write_sidecar(file_id, dest.with_suffix(".json"), outcome)
        # A network arrival's bytes were synced before it was acknowledged: only the
        # rename into the archive still needs making durable.
        _move(location, dest, fsync=self._settings.ingest.fsync,
              synced=location.parent == self._received)

    def _write_sidecar(self, file_id: int, path: Path, outcome: Outcome) -> None:
        row = self._db.execute(
            "SELECT inbox_path, sha256, size, received_at FROM files WHERE id = ?", [file_id]
        ).fetchone()
        sidecar = {
            "file_id": file_id,
            "reason_code": outcome.reason_code,
            "reason": outcome.reason,
            "detail": outcome.detail,
            "inbox_path": row[0],
            "sha256": row[1],
            "size": row[2],
            "received_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row[3])),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _commit(self, file_id: int, outcome: Outcome) -> None:
        now = self._clock()
        instance_id = outcome.original_id
        study_id = None
        with transaction(self._db):
            if outcome.state in STORED_STATES:
                instance_id, study_id = self._store_instance(file_id, outcome, now)
            self._db.execute(
                "UPDATE files SET state = ?, instance_id = ?, finished_at = ? WHERE id = ?",
                [outcome.state, instance_id, now, file_id],
            )
        self._metrics.files.labels(outcome.state).inc()
        if outcome.state == "quarantined":
            self._metrics.quarantined.labels(outcome.reason_code).inc()
            event(
                log,
                "file_quarantined",
                logging.WARNING,
                file_id=file_id,
                reason_code=outcome.reason_code,
                reason=outcome.reason,
            )
        elif outcome.state == "out_of_scope":
            instance = outcome.instance
            assert instance is not None
            self._metrics.out_of_scope.labels(outcome.reason_code).inc()
            # modality and body part are coded header values, not identifiers
            event(
                log,
                "file_out_of_scope",
                file_id=file_id,
                instance_id=instance_id,
                study_id=study_id,
                reason_code=outcome.reason_code,
                modality=instance.modality,
                body_part=instance.body_part[:16] if instance.body_part else None,
                photometric=instance.photometric,
                rows=instance.rows,
                cols=instance.cols,
            )
        else:
            event(
                log,
                f"file_{outcome.state}",
                file_id=file_id,
                instance_id=instance_id,
                study_id=study_id,
            )

    def _store_instance(self, file_id: int, outcome: Outcome, now: float) -> tuple[int, int | None]:
        instance = outcome.instance
        assert instance is not None
        frames = int(outcome.tensor.shape[0]) if outcome.tensor is not None else 0
        study_id = (
            self._touch_study(instance.study_uid, frames, now) if instance.study_uid else None
        )
        stored_path = self._db.execute(
            "SELECT stored_path, sha256 FROM files WHERE id = ?", [file_id]
        ).fetchone()
        cursor = self._db.execute(
            "INSERT INTO instances (sop_uid, sha256, study_id, series_uid, sop_class_uid, "
            "modality, photometric, rows, cols, frames, scoreable, note, path, created_at, "
            "series_number, slice_position, instance_number, scope_reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                instance.sop_uid,
                stored_path[1],
                study_id,
                instance.series_uid,
                instance.sop_class_uid,
                instance.modality,
                instance.photometric,
                instance.rows,
                instance.cols,
                frames,
                int(instance.scoreable),
                instance.note,
                stored_path[0],
                now,
                instance.series_number,
                instance.slice_position,
                instance.instance_number,
                instance.out_of_scope.code if instance.out_of_scope is not None else None,
            ],
        )
        instance_id = int(cursor.lastrowid)
        if instance.view is not None:
            store_view_header(self._db, instance_id, instance.view)
        if outcome.tensor is not None:
            self._db.execute(
                "INSERT INTO images (instance_id, size, frames, data) VALUES (?, ?, ?, ?)",
                [instance_id, int(outcome.tensor.shape[-1]), frames, to_storage(outcome.tensor)],
            )
        return instance_id, study_id

    def _touch_study(self, study_uid: str, frames: int, now: float) -> int:
        row = self._db.execute(
            "SELECT id, state FROM studies WHERE study_uid = ?", [study_uid]
        ).fetchone()
        if row is None:
            cursor = self._db.execute(
                "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, "
                "n_instances, n_images) VALUES (?, 'open', ?, ?, 1, ?)",
                [study_uid, now, now, frames],
            )
            study_id = int(cursor.lastrowid)
            event(log, "study_opened", study_id=study_id)
            return study_id
        study_id, state = int(row[0]), row[1]
        # A late instance starts a new round, and a new round a new retry schedule: a
        # study left `error` for an operator is tried again (error_count from 0).
        self._db.execute(
            "UPDATE studies SET state = 'open', last_instance_at = ?, "
            "n_instances = n_instances + 1, n_images = n_images + ?, "
            "error_count = CASE WHEN state = 'open' THEN error_count ELSE 0 END WHERE id = ?",
            [now, frames, study_id],
        )
        if state != "open":
            self._metrics.studies_reopened.inc()
            event(log, "study_reopened", study_id=study_id, previous_state=state)
        return study_id

    def _vanished(self, file_id: int | None) -> None:
        self._metrics.vanished.inc()
        if file_id is not None:
            with transaction(self._db):
                self._db.execute(
                    "UPDATE files SET state = 'vanished', finished_at = ? WHERE id = ?",
                    [self._clock(), file_id],
                )
        event(log, "file_vanished", logging.WARNING, file_id=file_id)
        return None

    # -- recovery -----------------------------------------------------------------------

    def _recover_row(self, row: dict) -> None:
        file_id = int(row["id"])
        base = self._inbox if row.get("origin", "inbox") == "inbox" else self._received
        source = base / row["inbox_path"]
        dest = self._home / row["stored_path"] if row["stored_path"] else None
        started = time.perf_counter()
        if row["state"] == "moving" and row["target_state"] == "duplicate":
            source.unlink(missing_ok=True)
            original = self._db.execute(
                "SELECT id FROM instances WHERE sha256 = ?", [row["sha256"]]
            ).fetchone()
            self._commit(file_id, Outcome("duplicate", original_id=original and original[0]))
            return
        if row["state"] == "moving" and row["target_state"] == "quarantined":
            location = dest if dest is not None and dest.exists() else source
            if not location.exists():
                self._vanished(file_id)
                return
            outcome = _quarantine(row["reason_code"], row["reason"], "recovered after a restart")
            self._finish(file_id, location, outcome, row["sha256"], started)
            return
        location = dest if dest is not None and dest.exists() else source
        try:
            data = location.read_bytes()
        except FileNotFoundError:
            self._vanished(file_id)
            return
        sha = hashlib.sha256(data).hexdigest()
        if row["sha256"] and sha != row["sha256"]:
            # The sender replaced the file meanwhile; the new content is a new arrival.
            self._vanished(file_id)
            return
        if location == dest and source.exists():
            source.unlink()  # a cross-device copy finished; the original was not yet removed
        if row["state"] == "reading":
            attempts = int(row["attempts"]) + 1
            self._db.execute("UPDATE files SET attempts = ? WHERE id = ?", [attempts, file_id])
            if attempts > self._settings.ingest.max_read_attempts:
                outcome = _quarantine(
                    "reader_crashed",
                    f"the daemon stopped {attempts - 1} times while reading this file",
                )
                self._finish(file_id, location, outcome, sha, started)
                return
        self._process(file_id, location, data, sha, started)


def _move(source: Path, dest: Path, *, fsync: bool, synced: bool = False) -> None:
    """Move ``source`` to ``dest`` atomically; across file systems, copy then rename.

    ``synced``: the source's bytes are already on disk (fsync'ed by whoever wrote it).
    """
    if source == dest:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fsync and not synced:
        _fsync_file(source)
    try:
        os.replace(source, dest)
    except OSError as exc:
        if exc.errno != 18:  # EXDEV: inbox and archive on different file systems
            raise
        partial = dest.with_name(dest.name + ".partial")
        shutil.copyfile(source, partial)
        _fsync_file(partial)
        os.replace(partial, dest)
        if fsync:
            _fsync_dir(dest.parent)
        source.unlink()
        return
    if fsync:
        _fsync_dir(dest.parent)


def _fsync_file(path: Path) -> None:
    # Only regular files the daemon can open: opening a pipe would block, and a file
    # quarantined as unreadable cannot be opened at all.
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
