"""Replicas as a site runs them: real daemons sharing one PostgreSQL database and the
archive, models and quarantine folders, each with its own home; and a daemon that runs
only some roles (`replica.roles`, `triage serve --roles`).

The two-replica test needs Debian's `postgresql` (a private server, tests/pg_server.py)
and DCMTK's storescu; it runs in the main pass of `make test`, on its own database.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import FAST_ENV, REPO, DaemonProcess, free_port, make_image
from dicomnet.dicomnet_helpers import DicomDaemon, needs, wait_until

from triage.store import db as store

STUDIES = 20


def _rows(url: str, sql: str, params: list | tuple = ()) -> list[tuple]:
    db = store.connect(url, readonly=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def test_two_replicas_on_one_postgres_split_twenty_studies_one_decision_each(
    tmp_path: Path, postgres_server
) -> None:
    storescu = needs("storescu")
    url = postgres_server.new_database()
    shared = tmp_path / "shared"
    env = {"TRIAGE__STORE__URL": url,
           **{f"TRIAGE__PATHS__{name.upper()}": str(shared / name)
              for name in ("archive", "models", "quarantine")},
           "TRIAGE__SCOPE__MODALITIES": "[DX]"}
    nodes = [DicomDaemon(tmp_path / f"home{i}", {**env, "TRIAGE__REPLICA__NAME": f"site-{i}"})
             for i in (1, 2)]
    started: list[DicomDaemon] = []
    try:
        for node in nodes:  # all roles, the default
            started.append(node.start())
        files = [make_image(tmp_path / "send" / f"{k:02d}.dcm", study_uid=f"2.25.77{k:02d}",
                            seed=k) for k in range(STUDIES)]
        halves = (files[: STUDIES // 2], files[STUDIES // 2:])
        for node, half in zip(nodes, halves, strict=True):
            sent = subprocess.run(
                [storescu, "-aet", "MODALITY", "-aec", "TRIAGE", "127.0.0.1",
                 str(node.dicom_port), *map(str, half)],
                capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stderr[-2000:]

        def decided() -> bool:
            return _rows(url, "SELECT COUNT(*) FROM decisions")[0][0] >= STUDIES and not _rows(
                url, "SELECT 1 FROM studies WHERE state IN ('open', 'complete', 'scoring')")

        wait_until(decided, 90, f"{STUDIES} studies decided")
        per_study = _rows(url, "SELECT s.study_uid, COUNT(d.id) FROM studies s LEFT JOIN "
                               "decisions d ON d.study_id = s.id GROUP BY s.study_uid")
        assert sorted(per_study) == [(f"2.25.77{k:02d}", 1) for k in range(STUDIES)]
        assert _rows(url, "SELECT state, COUNT(*) FROM studies GROUP BY state") == [
            ("scored", STUDIES)]
        # one gate: one series of sequence numbers across both replicas
        sequences = sorted(s for (s,) in _rows(url, "SELECT sequence FROM decisions"))
        assert sequences == list(range(STUDIES))
        # each replica journaled what it received; every study was claimed by one of them
        received = dict(_rows(url, "SELECT replica, COUNT(*) FROM files "
                                   "WHERE state = 'archived' GROUP BY replica"))
        assert received == {"site-1": STUDIES // 2, "site-2": STUDIES // 2}
        claimers = {c for (c,) in _rows(url, "SELECT DISTINCT claimed_by FROM studies")}
        assert claimers <= {"site-1", "site-2"} and claimers
        # both are members, live; one holds the retrain lease
        members = _rows(url, "SELECT name, roles, stopped_at FROM replicas ORDER BY name")
        roles = "ingest,receiver,retrain,review,score"
        assert members == [("site-1", roles, None), ("site-2", roles, None)]
        assert _rows(url, "SELECT holder FROM leases WHERE name = 'retrain'")[0][0] in {
            "site-1", "site-2"}
        assert httpx.get(f"{nodes[1].url}/healthz", timeout=5).json()["replica"] == "site-2"
        # the archive is shared: each instance once, under the shared folder
        assert len(list((shared / "archive").rglob("*.dcm"))) == STUDIES
    finally:
        for node in started:
            node.stop()
    # a clean stop is recorded: the others need not wait out its lease
    assert all(stopped is not None for (stopped,) in _rows(
        url, "SELECT stopped_at FROM replicas"))


def test_a_daemon_runs_only_its_roles(tmp_path: Path) -> None:
    """`ingest,score`: the inbox is read and studies decided, but no DICOM node listens,
    the review API and STOW-RS are not served, and no retrain scheduler runs."""
    dicom_port = free_port()
    proc = DaemonProcess(tmp_path / "home", {
        **FAST_ENV, "TRIAGE__REPLICA__ROLES": "[ingest, score]",
        "TRIAGE__DICOM__PORT": str(dicom_port), "TRIAGE__DICOM__HOST": "127.0.0.1"}, [])
    proc.start()
    try:
        health = httpx.get(f"{proc.url}/healthz", timeout=5).json()
        assert health["roles"] == ["ingest", "score"]
        assert set(health["loops"]) == {"replica", "ingest", "scoring"}
        make_image(proc.inbox / "a.dcm", study_uid="2.25.4242", seed=1)
        proc.wait_for(lambda s: s["studies"]["scored"] == 1, 40, "the study scored")
        assert httpx.get(f"{proc.url}/api/queue", timeout=5).status_code == 404
        stow = httpx.post(f"{proc.url}/dicomweb/studies", content=b"x", timeout=5,
                          headers={"Content-Type": "multipart/related; boundary=b"})
        assert stow.status_code == 404
        with pytest.raises(ConnectionRefusedError), socket.create_connection(
                ("127.0.0.1", dicom_port), timeout=2):
            pass
        assert httpx.get(f"{proc.url}/metrics", timeout=5).status_code == 200
    finally:
        proc.stop(signal.SIGKILL)


def test_a_receiver_without_ingest_is_refused_naming_the_key(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "triage", "serve", "--roles", "receiver,score",
         "--home", str(tmp_path / "home"), "--config", str(REPO / "config.yaml")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "replica" in result.stderr and "a receiver must also ingest" in result.stderr
    assert "Traceback" not in result.stderr
