"""Disk back-pressure: below the free-space floor files wait; ingestion resumes by itself."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import make_image, store_environ

from triage.config import load_settings
from triage.daemon import Daemon
from triage.store import db as store


def test_low_disk_pauses_ingestion_without_deleting_and_resumes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings(None, home=home, environ={**store_environ(home),
        "TRIAGE__INGEST__SETTLE_SECONDS": "0.3", "TRIAGE__INGEST__MIN_FREE_BYTES": "1000000",
    })
    free = {"bytes": 10}
    daemon = Daemon(settings, disk_free=lambda: free["bytes"])
    daemon.start()
    try:
        path = make_image(settings.path("inbox") / "waiting.dcm", seed=1)
        time.sleep(2.0)
        assert path.exists(), "no file is taken while the disk is low"
        assert daemon.registry.get_sample_value("triage_ingest_paused") == 1
        assert daemon.health()["ok"]
        free["bytes"] = 1_050_000  # above the floor but within the 10 % hysteresis
        time.sleep(1.5)
        assert path.exists()
        free["bytes"] = 2_000_000
        deadline = time.monotonic() + 15
        while path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not path.exists()
        assert daemon.registry.get_sample_value("triage_ingest_paused") == 0
    finally:
        daemon.stop()
    db = store.connect(settings.database(), readonly=True)
    assert db.execute("SELECT state FROM files").fetchall() == [("archived",)]
    db.close()
