"""Shared fixtures: pydicom's bundled test files, DICOM factories, a real running daemon."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store
from triage.store.settings import StoreSettings

REPO = Path(__file__).resolve().parents[1]
# `TRIAGE_TEST_STORE=postgresql`: every test gets its own database on a private
# PostgreSQL server (tests/pg_server.py) through TRIAGE__STORE__URL, which the daemons
# and settings it starts inherit, and `database` names it. `make test` runs the store-
# and daemon-level tests this way after the whole suite on SQLite.
ON_POSTGRES = os.environ.get("TRIAGE_TEST_STORE", "sqlite") == "postgresql"
PHI = {"name": "DOE^JANE", "id": "PID-99731", "accession": "ACC-55120"}
PHI_STRINGS = ("DOE", "JANE", "PID-99731", "ACC-55120")


@pytest.fixture(scope="session")
def pydicom_files() -> Path:
    """The folder of pydicom's bundled test files, read directly (no network)."""
    return Path(pydicom.__file__).parent / "data" / "test_files"


def make_image(
    path: Path, *, study_uid: str | None = None, seed: int = 0, size: int = 64,
    modality: str = "DX", body_part: str | None = "CHEST", **kwargs: object,
) -> Path:
    """Write a small radiograph-like instance carrying the test PHI.

    A chest DX (Digital X-Ray Image Storage, MONOCHROME2) by default, inside the default
    ``scope``; ``modality="CT"`` (or ``body_part="HAND"``...) writes one outside it.
    ``body_part=None`` leaves BodyPartExamined out.
    """
    rng = np.random.default_rng(seed)
    pixels = rng.normal(40, 200, (size, size)).astype(np.int16)
    ds = image_dataset(
        pixels, study_uid=study_uid, patient_name=PHI["name"], patient_id=PHI["id"],
        accession=PHI["accession"], modality=modality, **kwargs,
    )
    if body_part is not None:
        ds.BodyPartExamined = body_part
    return write_dataset(ds, path)


_server = None
_urls: dict[Path, str] = {}


def _postgres():  # type: ignore[no-untyped-def]
    """This test process's private PostgreSQL server, started on first use."""
    global _server
    if _server is None:
        from pg_server import PostgresServer, missing_reason

        reason = missing_reason()
        if reason is not None:
            pytest.skip(reason)
        _server = PostgresServer().start()
    return _server


# The slowest files (wall seconds in `make test` on a 2-core machine, 2026-12-04),
# slowest first. `make test` hands whole files to two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`); starting these first, longest processing
# time first, keeps one worker from starting a long file while the other runs out of
# work. The rest follow in their usual order. A stale list costs time, never a result.
SLOWEST_FILES = (
    "tests/test_faults_bench.py",  # 85
    "tests/test_lockstep.py",  # 63
    "tests/test_replay.py",  # 60
    "tests/training/test_cli_end_to_end.py",  # 48 (at 400 studies; now 240)
    "tests/test_operating_point.py",  # 45
    "tests/test_ingest_daemon.py",  # 40
    "tests/test_fault_harness.py",  # 38
    "tests/test_learning_loop.py",  # 33
    "tests/dicomnet/test_receiver_pynetdicom.py",  # 31
    "tests/dicomnet/test_node_status.py",  # 30
    "tests/test_store_postgres.py",  # 31 on PostgreSQL
    "tests/test_studies.py",  # 28
    "tests/test_replica_daemons.py",  # 22: two replicas on PostgreSQL
    "tests/training/test_pipeline.py",  # 28
    "tests/gate/test_scorer.py",  # 25
    "tests/training/test_torchrun_retrain.py",  # 25: two two-process runs (three in full)
    "tests/test_review_web.py",  # 24
    "tests/test_review_api.py",  # 23 on PostgreSQL
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:  # fmt: skip
    """Run the `SLOWEST_FILES` first (a stable sort: order within a file is kept)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}

    def key(item: pytest.Item) -> int:
        return rank.get(item.nodeid.split("::", 1)[0], len(rank))

    items.sort(key=key)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop this process's PostgreSQL server (each xdist worker runs this hook; an atexit
    handler does not run in a worker, and left the servers behind)."""
    global _server
    if _server is not None:
        _server.stop()
        _server = None


@pytest.fixture(scope="session")
def postgres_server():
    """The private PostgreSQL server of this test process (Debian's `postgresql`)."""
    return _postgres()


def store_url(home: Path) -> str:
    """The PostgreSQL database of the state directory ``home``: one per home, as a home
    has one SQLite file, so a restart in the same home finds its store again."""
    key = Path(home).resolve()
    if key not in _urls:
        _urls[key] = _postgres().new_database()
    return _urls[key]


@pytest.fixture(autouse=True)
def _store_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What a test starts without naming a store (a CLI, load_settings from the
    # environment) gets the store of the conventional home, tmp_path / "home".
    if ON_POSTGRES:
        monkeypatch.setenv("TRIAGE__STORE__URL", store_url(tmp_path / "home"))


def store_settings(home: Path) -> StoreSettings:
    """The `store:` section for settings a test builds itself (``Settings(home=...)``)."""
    return StoreSettings(url=store_url(home)) if ON_POSTGRES else StoreSettings()


def store_environ(home: Path) -> dict[str, str]:
    """The store's override for ``load_settings(..., home=home, environ=...)``."""
    return {"TRIAGE__STORE__URL": store_url(home)} if ON_POSTGRES else {}


def store_target(home: Path) -> Path | str:
    """The store of the state directory ``home``: its SQLite file, or its PostgreSQL
    database."""
    return store_url(home) if ON_POSTGRES else home / "triage.db"


def store_rows(home: Path, sql: str, params: list | tuple = (), *, dicts: bool = False) -> list:
    """Rows of ``sql`` in the store of a daemon under test, opened read-only beside it:
    tuples, or dicts by column name."""
    db = store.connect(store_target(home), readonly=True)
    try:
        return list(db.query(sql, params)) if dicts else db.execute(sql, params).fetchall()
    finally:
        db.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DaemonProcess:
    """``triage serve`` as a subprocess on a private state directory and port."""

    def __init__(self, home: Path, env: dict[str, str], prefix: list[str]) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The shipped config turns the DICOM receiver on at a fixed port; daemons under
        # test run without it unless a test sets TRIAGE__DICOM__PORT itself.
        self.env = {**os.environ, "TRIAGE_HOME": str(home), "TRIAGE__DICOM__PORT": "null",
                    **store_environ(home), **env}
        self.prefix = prefix
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "stderr.log"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    def start(self) -> DaemonProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [*self.prefix, sys.executable, "-m", "triage", "serve",
                   "--config", str(REPO / "config.yaml"), "--port", str(self.port)]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(command, env=self.env, stdout=err, stderr=err)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("daemon did not become healthy in 60 s")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``triage ARGS --config config.yaml`` against this daemon's home; must succeed."""
        return subprocess.run(
            [sys.executable, "-m", "triage", *args, "--config", str(REPO / "config.yaml")],
            env=self.env, capture_output=True, text=True, check=True,
        )

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "condition") -> dict:
        deadline = time.monotonic() + timeout
        status = self.status()
        while time.monotonic() < deadline:
            if predicate(status):
                return status
            time.sleep(0.3)
            status = self.status()
        raise AssertionError(f"timed out waiting for {what}; last status {status}")


FAST_ENV = {
    "TRIAGE__INGEST__SETTLE_SECONDS": "1.0",
    "TRIAGE__INGEST__CLOSED_SETTLE_SECONDS": "0.2",
    "TRIAGE__INGEST__RESCAN_SECONDS": "2",
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "2",
    "TRIAGE__STUDIES__CHECK_SECONDS": "0.2",
}


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A started daemon with short settle and study timeouts."""
    proc = DaemonProcess(tmp_path / "home", FAST_ENV, []).start()
    yield proc
    proc.stop(signal.SIGKILL)


def drop_without_root_read() -> list[str]:
    """Command prefix that removes root's power to read any file (for permission tests)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"]
