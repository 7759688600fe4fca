"""Make an instance that arrived over the network durable before it is acknowledged.

The DICOM receiver (C-STORE) and DICOMweb STOW-RS hand their bytes to
:meth:`ReceivedStore.accept`. It writes them under ``paths.received`` (a temporary name,
fsync, rename, fsync of the folder) and then journals a ``files`` row in state
``received`` in a transaction committed with ``synchronous = FULL``. Only when it returns
may the sender be told Success: from then on the instance survives a SIGKILL or a power
cut, and the ingest loop takes it through the same steps as an inbox file (read, archive
or quarantine, study), in the order received.

Failures raise :class:`StoreFailed` with a reason in words and nothing half stored: a
temporary file is removed, and a renamed file whose row was never committed is adopted
by :meth:`ReceivedStore.adopt_orphans` at the next start (it is complete, though its
sender was never told so and will send it again: the second copy is a duplicate).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from triage.errors import TriageError
from triage.store import db as store
from triage.store.db import transaction
from triage.telemetry.logs import event

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger("triage.ingest")

ORIGINS = ("dicom", "stow")
_TEMP_SUFFIX = ".partial"


class StoreFailed(TriageError):
    """The instance was not stored; ``reason`` says why, in words (no patient data).

    ``out_of_resources`` is True when the cause is lack of space or a database held
    too long (the sender should retry later), False for a fault in this instance.
    """

    def __init__(self, reason: str, *, out_of_resources: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.out_of_resources = out_of_resources


class ReceivedStore:
    """Thread-safe: association threads and HTTP workers share one instance.

    Args:
        settings: The daemon's settings (``paths.received``, ``ingest.fsync``,
            ``ingest.max_file_bytes``, ``ingest.min_free_bytes``,
            ``dicom.store_timeout_seconds``).
        notify: Called after each accepted instance (wakes the ingest loop).
        disk_free: Free bytes in the state directory (injectable for tests).
    """

    def __init__(
        self,
        settings: Settings,
        notify: Callable[[], None] = lambda: None,
        disk_free: Callable[[], int] | None = None,
    ) -> None:
        self._settings = settings
        self._dir = settings.path("received")
        self._replica = settings.replica_name()  # its rows: this home's received folder
        self._notify = notify
        self._disk_free = disk_free or (lambda: shutil.disk_usage(settings.home).free)
        self._lock = threading.Lock()
        self._db = None
        self._dir_ready = False

    @property
    def directory(self) -> Path:
        return self._dir

    def _connection(self):  # type: ignore[no-untyped-def]
        if self._db is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            db = store.connect(self._settings.database())
            # An acknowledged instance must survive a power cut, not only a crash: in WAL
            # mode NORMAL syncs at checkpoints only, FULL at every commit.
            if self._settings.ingest.fsync:
                db.execute("PRAGMA synchronous = FULL")
            timeout_ms = int(self._settings.dicom.store_timeout_seconds * 1000)
            db.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            self._db = db
        return self._db

    def accept(self, data: bytes, *, origin: str, sender: str | None) -> int:
        """Store ``data`` durably and journal it ``received``; return the ``files`` id.

        Raises:
            StoreFailed: not stored (too large, disk low or full, database busy or failing).
        """
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}")
        limit = self._settings.ingest.max_file_bytes
        if len(data) > limit:
            raise StoreFailed(
                f"instance of {len(data)} bytes is larger than ingest.max_file_bytes ({limit})",
                out_of_resources=False,
            )
        if self._disk_free() < self._settings.ingest.min_free_bytes:
            raise StoreFailed("free disk space is below ingest.min_free_bytes",
                              out_of_resources=True)
        sha = hashlib.sha256(data).hexdigest()
        name = f"{uuid.uuid4().hex}.dcm"
        path = self._dir / name
        try:
            self._write(path, data)
        except OSError as exc:
            # A local fault, whatever it is (full disk, quota, a folder removed, an I/O
            # error): the instance is fine, so the sender is told to try again later.
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise StoreFailed(
                "no space left to store the instance" if full
                else f"the instance could not be written ({exc.strerror or type(exc).__name__})",
                out_of_resources=True,
            ) from None
        try:
            with self._lock:
                db = self._connection()
                with transaction(db):
                    cursor = db.execute(
                        "INSERT INTO files (inbox_path, sha256, size, state, received_at, "
                        "origin, sender, replica) VALUES (?, ?, ?, 'received', ?, ?, ?, ?)",
                        [name, sha, len(data), time.time(), origin, sender, self._replica],
                    )
                file_id = int(cursor.lastrowid)
        except store.DATABASE_ERRORS as exc:
            path.unlink(missing_ok=True)
            busy = any(word in str(exc) for word in ("locked", "busy", "lock timeout"))
            raise StoreFailed(
                "the database was busy for longer than dicom.store_timeout_seconds" if busy
                else f"the database could not record the instance ({type(exc).__name__})",
                out_of_resources=True,
            ) from None
        self._notify()
        return file_id

    def _write(self, path: Path, data: bytes) -> None:
        if not self._dir_ready:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dir_ready = True
        temp = path.with_name(path.name + _TEMP_SUFFIX)
        fsync = self._settings.ingest.fsync
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                if fsync:
                    handle.flush()
                    os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if fsync:
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def adopt_orphans(self) -> int:
        """Start-up: journal complete files left without a row, remove temporary ones.

        A file renamed into place whose row was never committed (the process died in
        between) is complete: it is journaled ``received`` with origin ``dicom`` and read
        like any other. Temporary files were never acknowledged and are removed.
        """
        if not self._dir.is_dir():
            return 0
        db = self._connection()
        adopted = removed = 0
        with self._lock:
            known = {row[0] for row in db.execute(
                "SELECT inbox_path FROM files WHERE origin != 'inbox' AND replica = ?",
                [self._replica]).fetchall()}
            for path in sorted(self._dir.iterdir()):
                if path.name.endswith(_TEMP_SUFFIX):
                    path.unlink(missing_ok=True)
                    removed += 1
                    continue
                if path.name in known or not path.is_file():
                    continue
                data = path.read_bytes()
                with transaction(db):
                    db.execute(
                        "INSERT INTO files (inbox_path, sha256, size, state, received_at, "
                        "origin, sender, replica) VALUES (?, ?, ?, 'received', ?, 'dicom', "
                        "NULL, ?)",
                        [path.name, hashlib.sha256(data).hexdigest(), len(data), time.time(),
                         self._replica],
                    )
                adopted += 1
        if adopted or removed:
            event(log, "received_orphans_recovered", adopted=adopted, removed_partial=removed)
        return adopted

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
