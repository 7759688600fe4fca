"""DicomReceiver in this process with a real ReceivedStore and SQLite file: how it stops
and how it fails to start. (The daemon under SIGTERM does not get that far: see
`triage serve`; these drive stop() directly.)"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, store_environ
from dicomnet_helpers import wait_until
from prometheus_client import CollectorRegistry
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from triage.config import load_settings
from triage.errors import ConfigError, TriageError
from triage.ingest.received import ReceivedStore
from triage.ingest.receiver import DicomReceiver
from triage.replay.dicom_writer import image_dataset
from triage.store import db as store
from triage.telemetry.metrics import build_metrics


@pytest.fixture
def parts(tmp_path: Path):
    def make(**env: str):
        environ = {"TRIAGE__DICOM__PORT": str(free_port()), "TRIAGE__DICOM__HOST": "127.0.0.1",
                   "TRIAGE__INGEST__MIN_FREE_BYTES": "0", **env}
        settings = load_settings(None, home=tmp_path,
                                 environ={**store_environ(tmp_path), **environ})
        store.connect(settings.database()).close()
        settings.path("received").mkdir(parents=True, exist_ok=True)
        registry = CollectorRegistry()
        ended: list[list[int]] = []
        received = ReceivedStore(settings)
        receiver = DicomReceiver(settings.dicom, received, ended.append, build_metrics(registry))
        made.append((receiver, received))
        return settings, receiver, ended, registry

    made: list = []
    yield make
    for receiver, received in made:
        receiver.stop(timeout=5)
        received.close()


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _store_while_the_database_is_held(settings, port: int, study_uid: str):
    """An established association with a C-STORE in flight on a thread, the database's
    write lock held so that the store writes its file and then waits for its row:
    (association, the lock's connection, the answers' statuses, the sending thread)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    blocker = store.connect(settings.database())
    blocker.execute("BEGIN IMMEDIATE")  # on PostgreSQL: the store's write lock
    answers: list[int] = []
    ds = image_dataset(np.zeros((16, 16), np.int16), study_uid=study_uid)
    client = threading.Thread(target=lambda: answers.append(assoc.send_c_store(ds).Status))
    client.start()
    return assoc, blocker, answers, client


def test_stop_lets_a_store_in_flight_answer_then_aborts(parts) -> None:
    settings, receiver, ended, registry = parts()
    receiver.start()
    port = receiver.port
    assert port == settings.dicom.port
    assoc, blocker, answers, client = _store_while_the_database_is_held(settings, port,
                                                                        "2.25.77")
    wait_until(lambda: list(settings.path("received").glob("*.dcm")), 10,
               "the instance written, its row waiting")
    stopper = threading.Thread(target=receiver.stop)
    stopper.start()
    time.sleep(0.5)
    assert stopper.is_alive(), "stop() returned with a C-STORE in flight"
    with pytest.raises(ConnectionRefusedError):  # no new connections meanwhile
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    blocker.execute("COMMIT")
    blocker.close()
    stopper.join(timeout=20)
    client.join(timeout=20)
    assert not stopper.is_alive() and not client.is_alive()
    assert answers == [0x0000]  # answered before the association was aborted
    wait_until(lambda: assoc.is_aborted, 10, "the client to see the abort")
    db = store.connect(settings.database())
    rows = db.execute("SELECT id, state, origin, sender FROM files").fetchall()
    db.close()
    assert rows == [(rows[0][0], "received", "dicom", "MODALITY")]
    assert ended == [[rows[0][0]]]  # handed over once, at the abort
    assert _sample(registry, "triage_dicom_associations_total", result="aborted") == 1
    assert _sample(registry, "triage_dicom_instances_total", status="success") == 1
    assert _sample(registry, "triage_dicom_active_associations") == 0
    assert receiver.port is None


def test_a_slow_answer_is_not_idle_time(parts) -> None:
    """dicom.idle_timeout_seconds counts the peer's silence, not the node's: a C-STORE
    waiting 3 s for the database with a 1 s idle timeout is answered, the association
    goes on; idle from that answer on, it is aborted and counted."""
    settings, receiver, ended, registry = parts(TRIAGE__DICOM__IDLE_TIMEOUT_SECONDS="1")
    receiver.start()
    assoc, blocker, answers, client = _store_while_the_database_is_held(
        settings, receiver.port, "2.25.78")
    time.sleep(3)
    blocker.execute("COMMIT")
    blocker.close()
    client.join(timeout=30)
    answered = time.monotonic()
    assert answers == [0x0000] and assoc.is_established
    assert _sample(registry, "triage_dicom_idle_aborts_total") == 0
    wait_until(lambda: assoc.is_aborted, 20, "the idle association aborted")
    assert time.monotonic() - answered >= 0.5
    assert _sample(registry, "triage_dicom_idle_aborts_total") == 1
    wait_until(lambda: ended, 10, "the association handed over")
    assert len(ended) == 1 and len(ended[0]) == 1  # what it stored, handed over once
    assert _sample(registry, "triage_dicom_associations_total", result="aborted") == 1


def test_start_failures_are_one_line_errors(parts) -> None:
    settings, first, _, _ = parts()
    first.start()
    _, second, _, _ = parts(TRIAGE__DICOM__PORT=str(first.port))
    with pytest.raises(TriageError, match=r"^dicom.host '127.0.0.1', dicom.port \d+: "
                                          r"address already in use$") as raised:
        second.start()
    assert not isinstance(raised.value, ConfigError)
    _, elsewhere, _, _ = parts(TRIAGE__DICOM__HOST="192.0.2.1")  # TEST-NET-1: not ours
    with pytest.raises(ConfigError, match="not an address of this machine"):
        elsewhere.start()
    assert second.port is None and elsewhere.port is None


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_pynetdicom_logs_only_through_triage(parts) -> None:
    """pynetdicom's own lines reach the logs (root's handlers) only as triage events:
    WARNING and up, UIDs masked, no exception text (it can quote dataset values)."""
    parts()
    assert not logging.getLogger("pynetdicom").propagate
    inner = logging.getLogger("pynetdicom.association")
    root, triage_log = logging.getLogger(), logging.getLogger("triage")
    collect, level = _Collect(), triage_log.level
    root.addHandler(collect)
    triage_log.setLevel(logging.DEBUG)
    try:
        inner.info("Received Store Request: PatientName DOE^JANE")
        inner.warning("No supported service class for '1.2.840.10008.5.1.4.1.1.2'")
        try:
            raise ValueError("PatientName DOE^JANE")
        except ValueError as exc:
            inner.exception(exc)
    finally:
        root.removeHandler(collect)
        triage_log.setLevel(level)
    assert [(r.name, r.levelno, r.getMessage(), r.detail, r.source) for r in collect.records] == [
        ("triage.dicomnet", logging.WARNING, "pynetdicom_log",
         "No supported service class for '<uid>'", "pynetdicom.association"),
        ("triage.dicomnet", logging.ERROR, "pynetdicom_log", "exception",
         "pynetdicom.association"),
    ]
    assert collect.records[1].error_type == "ValueError" and not collect.records[1].exc_info


def test_a_quiet_association_polls_slowly_again(parts) -> None:
    """While an association is busy its DUL polls every 0.1 ms (answers leave at once);
    quiet for a second it goes back to pynetdicom's 1 ms (an idle association does not
    keep a core busy), and the next PDU makes it busy again."""
    from triage.ingest import receiver as module

    settings, receiver, ended, registry = parts()
    receiver.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        ours = next(iter(receiver._open))  # the receiver's side of the association
        assert ours.dul._run_loop_delay == module._BUSY_POLL_SECONDS
        wait_until(lambda: ours.dul._run_loop_delay == module._QUIET_POLL_SECONDS, 10,
                   "the quiet association polling slowly")
        assert assoc.send_c_echo().Status == 0x0000
        assert ours.dul._run_loop_delay == module._BUSY_POLL_SECONDS
    finally:
        assoc.release()
