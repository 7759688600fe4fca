"""The inbox watcher on a real folder with real inotify events."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from triage.config import IngestSettings
from triage.ingest.watcher import InboxWatcher

SETTINGS = IngestSettings(settle_seconds=1.0, closed_settle_seconds=0.1, rescan_seconds=0.5,
                          abandon_after_seconds=1.5)


def _poll_until(watcher: InboxWatcher, seconds: float) -> list:
    deadline = time.monotonic() + seconds
    found = []
    while time.monotonic() < deadline:
        found += watcher.poll()
        for item in found:
            item.path.unlink(missing_ok=True)  # as ingestion moves it away
            watcher.forget(item.path)
        time.sleep(0.05)
    return found


@pytest.fixture
def watcher(tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    before = inbox / "before.dcm"  # arrived while the daemon was down, an hour ago
    before.write_bytes(b"x" * 10)
    os.utime(before, (time.time() - 3600, time.time() - 3600))
    w = InboxWatcher(inbox, SETTINGS)
    w.start()
    yield w, inbox
    w.stop()


def test_startup_scan_and_closed_files(watcher) -> None:
    w, inbox = watcher
    started = time.monotonic()
    found = _poll_until(w, 0.3)
    assert [item.path.name for item in found] == ["before.dcm"], "old files need no settling"
    (inbox / "closed.dcm").write_bytes(b"y" * 10)  # written and closed: ready after 0.1 s
    found = _poll_until(w, 0.5)
    assert [item.path.name for item in found] == ["closed.dcm"]
    assert time.monotonic() - started < SETTINGS.settle_seconds


def test_files_in_new_subfolders_are_found(watcher) -> None:
    w, inbox = watcher
    _poll_until(w, 0.3)
    (inbox / "sub" / "deeper").mkdir(parents=True)
    (inbox / "sub" / "deeper" / "new.dcm").write_bytes(b"y" * 10)
    # the close event may race the new folder's watch; the rescan finds the file anyway
    found = _poll_until(w, SETTINGS.settle_seconds + 0.8)
    assert [item.path.name for item in found] == ["new.dcm"]


def test_open_file_is_not_ready_while_it_grows(watcher) -> None:
    w, inbox = watcher
    _poll_until(w, 0.3)
    target = inbox / "growing.dcm"
    with open(target, "wb") as out:
        for _ in range(8):
            out.write(b"z" * 100)
            out.flush()
            assert not [i for i in w.poll() if i.path == target]
            time.sleep(0.2)
    found = _poll_until(w, 1.0)
    assert [item.path for item in found] == [target]


def test_partial_upload_waits_for_rename_or_is_abandoned(watcher) -> None:
    w, inbox = watcher
    _poll_until(w, 0.3)
    (inbox / "upload.dcm.part").write_bytes(b"a" * 10)
    (inbox / ".hidden").write_bytes(b"b" * 10)
    assert _poll_until(w, 0.6) == []
    (inbox / "upload.dcm.part").rename(inbox / "upload.dcm")
    found = _poll_until(w, 0.6)
    assert [(i.path.name, i.abandoned) for i in found] == [("upload.dcm", False)]
    found = _poll_until(w, 1.5)
    assert [(i.path.name, i.abandoned) for i in found] == [(".hidden", True)]
