"""SIGKILL of the daemon while DCMTK's storescu sends: nothing acknowledged is lost.

storescu sends N instances in one association to the built-in receiver; once a third of
them are journaled, the daemon is killed with SIGKILL. storescu's verbose log says which
files got a Success response. After a restart, every one of those is archived (its file
in the content-addressed archive, its bytes identical to what was sent), nothing is left
`received`/`reading`/`moving`, no SOP Instance UID is stored twice, and nothing arrives
that storescu did not send. CI sends 150 small instances; ``TRIAGE_FULL_SCALE=1`` sends
the issue's 500 instances of 512x512 CT.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import FAST_ENV, DaemonProcess, free_port

from triage.replay.dicom_writer import image_dataset, write_dataset

FULL_SCALE = os.environ.get("TRIAGE_FULL_SCALE") == "1"
# Final states of a file kept in the archive (CT is outside the default model scope).
STORED = ("archived", "out_of_scope")
N, SIZE = (500, 512) if FULL_SCALE else (150, 128)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("storescu") is None,
                       reason="storescu not installed (Debian package dcmtk; make system-deps)"),
]


def _write_study(folder: Path) -> dict[str, tuple[str, str]]:
    """N CT slices of one study; file name -> (SOP Instance UID, SHA-256 of its pixels)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    study = f"2.25.{rng.integers(1, 2**62)}"
    sent = {}
    for i in range(N):
        pixels = rng.normal(40, 300, (SIZE, SIZE)).astype(np.int16)
        ds = image_dataset(pixels, modality="CT", study_uid=study, instance_number=i + 1)
        path = write_dataset(ds, folder / f"{i:04d}.dcm")
        sent[path.name] = (str(ds.SOPInstanceUID), hashlib.sha256(ds.PixelData).hexdigest())
    return sent


def _acknowledged(log: str) -> list[str]:
    """File names storescu reported sent with a Success response, in order."""
    sent, current = [], None
    for line in log.splitlines():
        if "Sending file:" in line:
            current = Path(line.split("Sending file:", 1)[1].strip()).name
        elif "Received Store Response (Success)" in line and current is not None:
            sent.append(current)
            current = None
    return sent


def _journaled(home: Path) -> int:
    try:
        with sqlite3.connect(f"file:{home / 'triage.db'}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM files").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_sigkill_during_send_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    files = tmp_path / "send"
    sent = _write_study(files)
    port = free_port()
    env = {**FAST_ENV, "TRIAGE__DICOM__PORT": str(port)}
    daemon = DaemonProcess(tmp_path / "home", env, []).start()
    sender = subprocess.Popen(
        ["storescu", "-v", "-aet", "MODALITY", "-aec", "TRIAGE", "+sd", "127.0.0.1",
         str(port), str(files)],
        env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 120
    while _journaled(daemon.home) < N // 3 and time.monotonic() < deadline:
        assert sender.poll() is None, "storescu finished before the kill"
        time.sleep(0.01)
    daemon.stop(signal.SIGKILL)
    log, _ = sender.communicate(timeout=120)
    acknowledged = _acknowledged(log)
    # Success follows the journal's commit: the instance journaled last before the kill
    # may not have been answered yet (one association, so at most one in flight)
    assert N // 3 - 1 <= len(acknowledged) < N, log[-2000:]

    daemon.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with sqlite3.connect(daemon.home / "triage.db") as db:
                busy = db.execute("SELECT COUNT(*) FROM files WHERE state IN "
                                  "('received', 'reading', 'moving')").fetchone()[0]
            if busy == 0:
                break
            time.sleep(0.2)
        with sqlite3.connect(daemon.home / "triage.db") as db:
            rows = db.execute("SELECT state, origin FROM files").fetchall()
            stored = {sop: (state, path) for sop, state, path in db.execute(
                "SELECT instances.sop_uid, files.state, instances.path FROM instances "
                "JOIN files ON files.instance_id = instances.id")}
            stored_twice = db.execute(
                "SELECT COUNT(*) - COUNT(DISTINCT sop_uid) FROM instances").fetchone()[0]
    finally:
        daemon.stop(signal.SIGKILL)

    # The receiver stores the dataset as sent, with its own file meta: compare by SOP
    # Instance UID and pixel data, not by file bytes.
    missing = [name for name in acknowledged if stored.get(sent[name][0], ("",))[0] not in STORED]
    print(f"storescu acknowledged {len(acknowledged)} of {N}; journaled {len(rows)}; "
          f"acknowledged but not archived: {len(missing)}")
    assert not missing, f"acknowledged but not archived after restart: {missing[:5]}"
    for name in acknowledged:
        sop, pixels = sent[name]
        archived = pydicom.dcmread(daemon.home / stored[sop][1])
        assert hashlib.sha256(archived.PixelData).hexdigest() == pixels
    assert all(origin == "dicom" for _state, origin in rows)
    assert all(state not in ("received", "reading", "moving") for state, _origin in rows)
    assert stored_twice == 0
    # Nothing arrives that was not sent; at most the one in flight at the kill is extra.
    assert set(stored) <= {sop for sop, _ in sent.values()}
    assert len(rows) <= len(acknowledged) + 1
