"""Watch the inbox and say which files are complete and may be read.

watchdog (inotify on Linux) reports created, moved-in and closed-after-write files,
recursively. Events only nominate candidates; whether a candidate is complete is decided
by polling its size and mtime:

* closed after writing and unchanged for ``closed_settle_seconds``, or
* unchanged for ``settle_seconds`` (senders that keep the file open, network shares).

Names matching ``partial_patterns`` (``.name``, ``*.part``, ``*.tmp``) are uploads in
progress: they wait for the sender's rename, and are handed on as abandoned only after
``abandon_after_seconds`` without change. A start-up scan and a periodic rescan add any
file the events missed (queue overflow, network shares, files that arrived while down).
"""

from __future__ import annotations

import fnmatch
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from triage.ingest.settings import IngestSettings


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    changed_at: float
    closed_at: float | None = None


@dataclass(frozen=True)
class ReadyFile:
    """A file that is complete, or an abandoned partial upload."""

    path: Path
    abandoned: bool = False


class _Handler(FileSystemEventHandler):
    def __init__(self, nominate: Callable[[str, bool], None]) -> None:
        self._nominate = nominate

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self._nominate("", False)  # a directory arrived whole: rescan soon
            return
        if isinstance(event, FileMovedEvent):
            # A rename is atomic: the sender finished writing before it moved the file in.
            self._nominate(os.fsdecode(event.dest_path), True)
        elif isinstance(event, FileClosedEvent):
            self._nominate(os.fsdecode(event.src_path), True)
        elif isinstance(event, FileCreatedEvent):
            self._nominate(os.fsdecode(event.src_path), False)


class InboxWatcher:
    """Candidates from events and scans; :meth:`poll` returns those that are ready.

    :meth:`poll` is called from one thread (the ingest loop); events arrive on watchdog's
    thread and are handed over under a lock.
    """

    def __init__(
        self,
        inbox: Path,
        settings: IngestSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inbox = inbox
        self._settings = settings
        self._clock = clock
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self._nominated: dict[Path, bool] = {}
        self._rescan_due = 0.0
        self._wake = threading.Event()
        self._observer: Observer | None = None

    @property
    def pending(self) -> int:
        """Files seen and not yet handed on."""
        return len(self._candidates)

    def start(self) -> None:
        """Start watching; the first :meth:`poll` scans the whole inbox."""
        self._inbox.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        observer.schedule(_Handler(self._nominate), str(self._inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None
        self._wake.set()

    def wait(self, timeout: float) -> None:
        """Sleep until an event arrives or ``timeout`` seconds pass."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        """End a :meth:`wait` now (other work arrived, e.g. over the network)."""
        self._wake.set()

    def forget(self, path: Path) -> None:
        """Drop a candidate (it was handed on and dealt with)."""
        self._candidates.pop(path, None)

    def _nominate(self, path: str, closed: bool) -> None:
        with self._lock:
            if path:
                key = Path(path)
                self._nominated[key] = self._nominated.get(key, False) or closed
            else:
                self._rescan_due = 0.0
        self._wake.set()

    def poll(self) -> list[ReadyFile]:
        """Update candidates and return the files ready to read, oldest change first."""
        now = self._clock()
        with self._lock:
            nominated, self._nominated = self._nominated, {}
            rescan = now >= self._rescan_due
            if rescan:
                self._rescan_due = now + self._settings.rescan_seconds
        if rescan:
            for path in self._scan():
                nominated.setdefault(path, False)
        for path, closed in nominated.items():
            self._observe(path, now, closed)
        ready: list[tuple[float, ReadyFile]] = []
        for path, candidate in list(self._candidates.items()):
            state = self._check(path, candidate, now)
            if state is not None:
                ready.append((candidate.changed_at, state))
        ready.sort(key=lambda item: item[0])
        return [item for _, item in ready]

    def _scan(self) -> list[Path]:
        found = []
        for root, _dirs, files in os.walk(self._inbox):
            found.extend(Path(root) / name for name in files)
        return found

    def _observe(self, path: Path, now: float, closed: bool) -> None:
        try:
            st = os.lstat(path)
        except OSError:
            self._candidates.pop(path, None)
            return
        candidate = self._candidates.get(path)
        if candidate is None:
            # A file last modified long ago (it arrived while the daemon was down) has
            # already been quiet for its age; it need not wait a full settle interval.
            age = max(0.0, time.time() - st.st_mtime_ns / 1e9)
            candidate = _Candidate(st.st_size, st.st_mtime_ns, now - age)
            self._candidates[path] = candidate
        if closed:
            candidate.closed_at = now

    def _check(self, path: Path, candidate: _Candidate, now: float) -> ReadyFile | None:
        try:
            st = os.lstat(path)
        except OSError:
            # Gone (moved on, or deleted by its sender): nothing to account for.
            self._candidates.pop(path, None)
            return None
        if (st.st_size, st.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
            candidate.size, candidate.mtime_ns = st.st_size, st.st_mtime_ns
            candidate.changed_at = now
            if candidate.closed_at is not None and candidate.closed_at < now:
                candidate.closed_at = None  # written to again after the close we saw
            return None
        quiet = now - candidate.changed_at
        if self._is_partial(path):
            if quiet >= self._settings.abandon_after_seconds:
                return ReadyFile(path, abandoned=True)
            return None
        if candidate.closed_at is not None and quiet >= self._settings.closed_settle_seconds:
            return ReadyFile(path)
        if quiet >= self._settings.settle_seconds:
            return ReadyFile(path)
        return None

    def _is_partial(self, path: Path) -> bool:
        name = path.name
        return any(fnmatch.fnmatch(name, pattern) for pattern in self._settings.partial_patterns)
