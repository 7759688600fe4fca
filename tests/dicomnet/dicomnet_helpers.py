"""Shared pieces of the DICOM receiver tests: a real daemon with its DICOM node on a free
port, read-only looks at its SQLite file, metrics from /metrics.

(Not a conftest.py: a second ``conftest`` module would shadow ``tests/conftest.py`` for
the test modules collected after this folder.)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import FAST_ENV, DaemonProcess, free_port, store_rows
from prometheus_client.parser import text_string_to_metric_families

from triage.store.db import FINAL_FILE_STATES

# Scope routing admits CR/DX chest images by default; these tests send CT and MR.
OPEN_SCOPE = {
    "TRIAGE__SCOPE__MODALITIES": "[]",
    "TRIAGE__SCOPE__BODY_PARTS": "[]",
    "TRIAGE__SCOPE__PHOTOMETRIC": "[]",
}
IN_FLIGHT = ("received", "reading", "moving")


def needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} not found (make system-deps installs the Debian package dcmtk)")
    return path


class DicomDaemon(DaemonProcess):
    """``triage serve`` with its DICOM node on loopback at a free port."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.dicom_port = free_port()
        super().__init__(home, {
            **FAST_ENV, **OPEN_SCOPE,
            "TRIAGE__DICOM__PORT": str(self.dicom_port),
            "TRIAGE__DICOM__HOST": "127.0.0.1",
            "TRIAGE__RETRAIN__ENABLED": "false",
            **env,
        }, [])

    def query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """Rows from the daemon's database, opened read-only beside it."""
        return store_rows(self.home, sql, params)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def logs(self) -> str:
        """Everything the daemon logged (stderr and its log file)."""
        text = self.log.read_text(errors="replace")
        log_file = self.home / "logs" / "triage.log"
        return text + (log_file.read_text(errors="replace") if log_file.exists() else "")


def events(proc: DaemonProcess, name: str) -> list[dict]:
    """The daemon's structured log events called ``name`` (from its stderr)."""
    found = []
    for line in proc.log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when the labelled child is absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def files_settled(proc: DicomDaemon, sender: str, expected: int) -> bool:
    """All ``expected`` files from ``sender`` arrived and reached a final state."""
    rows = proc.query("SELECT state FROM files WHERE origin = 'dicom' AND sender = ?", [sender])
    return len(rows) == expected and all(state not in IN_FLIGHT for (state,) in rows)


def assert_final(proc: DicomDaemon, sender: str) -> dict[str, int]:
    """States of the files ``sender`` stored, each final; returns the counts by state."""
    rows = proc.query("SELECT state, COUNT(*) FROM files WHERE origin = 'dicom' AND sender = ? "
                      "GROUP BY state", [sender])
    states = dict(rows)
    assert set(states) <= set(FINAL_FILE_STATES), states
    return states
