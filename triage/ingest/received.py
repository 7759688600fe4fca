"""Make an instance that arrived over the network durable before it is acknowledged.

The DICOM receiver (C-STORE) and DICOMweb STOW-RS hand their bytes, and the checks made
before Success, to :meth:`ReceivedStore.accept`. It writes them under ``paths.received``
(a temporary name, ``fdatasync``, rename, fsync of the folder) while the checks run, then
journals a ``files`` row in state ``received``. Only when it returns may the sender be
told Success: from then on the instance survives a SIGKILL or a power cut, and the ingest
loop takes it through the same steps as an inbox file (read, archive or quarantine,
study), in the order received.

The file, complete under its ``<origin>-<uuid>.dcm`` name and synced with its folder, is
what makes the instance durable; the row is committed without a sync of its own (the
store's ``synchronous = NORMAL``). A row lost to a power cut, and a renamed file whose
row was never written (the process died in between), are journaled again from the file
by :meth:`ReceivedStore.adopt_orphans` at the next start, with the origin its name
carries (the sender's AE title is not kept in the name, so it is empty there). Such a
file is complete, though in the second case its sender was never told so and will send
it again: the second copy is a duplicate.

Failures raise :class:`StoreFailed` with a reason in words and nothing half stored: a
temporary file is removed; a refused instance leaves nothing.
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
from concurrent.futures import ThreadPoolExecutor
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
        # The checks of instances being accepted, beside their writes (see accept): one
        # thread per association that can be storing, and as many for STOW-RS.
        self._checker = ThreadPoolExecutor(max_workers=2 * settings.dicom.max_associations,
                                           thread_name_prefix="triage-received-check")

    @property
    def directory(self) -> Path:
        return self._dir

    def _connection(self):  # type: ignore[no-untyped-def]
        if self._db is None:
            self._dir.mkdir(parents=True, exist_ok=True)
            # The store's own synchronous = NORMAL: a commit reaches the disk at the next
            # checkpoint, not before Success. The instance's durability is its file,
            # complete under its name and synced with its folder before the row is
            # written; a row lost with a power cut is written again from the file at the
            # next start (adopt_orphans).
            db = store.connect(self._settings.database())
            timeout_ms = int(self._settings.dicom.store_timeout_seconds * 1000)
            db.execute(f"PRAGMA busy_timeout = {timeout_ms}")
            self._db = db
        return self._db

    def accept(self, data: bytes, *, origin: str, sender: str | None,
               check: Callable[[bytes], object] | None = None) -> int:
        """Store ``data`` durably and journal it ``received``; return the ``files`` id.

        ``check`` (the checks made before Success) runs on another thread while the bytes
        are written and synced. Whatever it raises is raised here once the written bytes
        are removed, before any other failure: an instance it refuses is neither kept nor
        journaled, and its sender learns why rather than to try again.

        Success means: the file is complete under its name in ``paths.received`` and that
        name is on the disk (``fdatasync``, rename, fsync of the folder, with
        ``ingest.fsync``); its row is committed. The row reaches the disk with the store's
        next checkpoint (``synchronous = NORMAL``, as the daemon's other writes): a row a
        power cut takes is written again from the file by :meth:`adopt_orphans`.

        Raises:
            StoreFailed: not stored (too large, disk low or full, database busy or failing).
        """
        if origin not in ORIGINS:
            raise ValueError(f"origin must be one of {ORIGINS}")
        # The hash and the check run on a checker thread while this one writes and syncs:
        # the answer waits for the longer of the two, not their sum (the check is Python
        # holding the interpreter; hashing, writing and syncing let it go).
        checking = self._checker.submit(_hash_and_check, data, check)
        name = f"{origin}-{uuid.uuid4().hex}.dcm"
        path = self._dir / name
        temp = path.with_name(name + _TEMP_SUFFIX)
        try:
            self._make_room(len(data))
            self._write(temp, data)
            sha = checking.result()
            self._publish(temp, path)
        except BaseException as exc:
            temp.unlink(missing_ok=True)
            refused = checking.exception()  # waits for the check
            if refused is not None:  # refused for its bytes: that is the answer, not a retry
                raise refused from None
            if isinstance(exc, OSError):
                # A local fault, whatever it is (full disk, quota, a folder removed, an I/O
                # error): the instance is fine, so the sender is told to try again later.
                full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
                raise StoreFailed(
                    "no space left to store the instance" if full
                    else "the instance could not be written "
                         f"({exc.strerror or type(exc).__name__})",
                    out_of_resources=True,
                ) from None
            raise
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

    def _make_room(self, size: int) -> None:
        limit = self._settings.ingest.max_file_bytes
        if size > limit:
            raise StoreFailed(
                f"instance of {size} bytes is larger than ingest.max_file_bytes ({limit})",
                out_of_resources=False,
            )
        if self._disk_free() < self._settings.ingest.min_free_bytes:
            raise StoreFailed("free disk space is below ingest.min_free_bytes",
                              out_of_resources=True)

    def _write(self, temp: Path, data: bytes) -> None:
        """``data`` into ``temp`` and, with ``ingest.fsync``, on the disk. A failed write
        leaves no temporary file."""
        if not self._dir_ready:
            self._dir.mkdir(parents=True, exist_ok=True)
            self._dir_ready = True
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                if self._settings.ingest.fsync:
                    handle.flush()
                    os.fdatasync(handle.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def _publish(self, temp: Path, path: Path) -> None:
        """Rename a complete ``temp`` to its name and, with ``ingest.fsync``, sync the
        folder so that the name survives a power cut: from here the file is complete
        under its name (see :meth:`adopt_orphans`)."""
        os.replace(temp, path)
        if self._settings.ingest.fsync:
            fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def adopt_orphans(self) -> int:
        """Start-up: journal complete files left without a row, remove temporary ones.

        A file renamed into place whose row was never committed, or whose row a power cut
        took, is complete: it is journaled ``received`` with the origin its name carries
        (``dicom`` for names from before the origin was in them) and read like any other.
        Temporary files were never acknowledged and are removed.
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
                origin = path.name.split("-", 1)[0]
                with transaction(db):
                    db.execute(
                        "INSERT INTO files (inbox_path, sha256, size, state, received_at, "
                        "origin, sender, replica) VALUES (?, ?, ?, 'received', ?, ?, NULL, ?)",
                        [path.name, hashlib.sha256(data).hexdigest(), len(data), time.time(),
                         origin if origin in ORIGINS else "dicom", self._replica],
                    )
                adopted += 1
        if adopted or removed:
            event(log, "received_orphans_recovered", adopted=adopted, removed_partial=removed)
        return adopted

    def close(self) -> None:
        self._checker.shutdown(wait=True)
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _hash_and_check(data: bytes, check: Callable[[bytes], object] | None) -> str:
    """``data``'s SHA-256, once ``check`` (if any) passed it."""
    sha = hashlib.sha256(data).hexdigest()
    if check is not None:
        check(data)
    return sha
