"""The DICOM node under pressure (issue 23): exactly ``dicom.max_associations`` admitted
from a burst, a slot held until its connection closes; a silent peer's slot freed after
``dicom.idle_timeout_seconds``; a C-STORE on a presentation context it was not
negotiated for answered or aborted.

Real daemons (`triage serve`) on loopback; pynetdicom senders, and a bare-socket peer
(raw_dicom.py) for what pynetdicom's requestor will not do.
"""

from __future__ import annotations

import signal
import struct
import threading
import time

import numpy as np
import pytest
from dicomnet_helpers import DicomDaemon, assert_final, events, files_settled, metric, wait_until
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)
from raw_dicom import A_ABORT, A_ASSOCIATE_AC, A_RELEASE_RP, P_DATA_TF, RawPeer

from triage.replay.dicom_writer import image_dataset

MAX_ASSOCIATIONS = 16
BURST = 20
IDLE = 2.0  # dicom.idle_timeout_seconds of the idle node
# Under load (2 cores, a benchmark beside) the node's watch runs late: how much later than
# the idle timeout a slot may be freed and still pass. The timeout itself is checked from
# below: nothing is aborted before it.
SLACK = 15.0


def ct(study_uid: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    return image_dataset(rng.normal(40, 200, (16, 16)).astype(np.int16), modality="CT",
                         study_uid=study_uid)


def sender(title: str, *contexts: str) -> AE:
    ae = AE(ae_title=title)
    for context in contexts or (CTImageStorage,):
        ae.add_requested_context(context, ExplicitVRLittleEndian)
    # the sender's own timers must outlast every wait below (an idle pynetdicom requestor
    # aborts after its network_timeout)
    ae.acse_timeout = 60
    ae.dimse_timeout = ae.network_timeout = 300
    return ae


def associate(ae: AE, port: int):
    return ae.associate("127.0.0.1", port, ae_title="TRIAGE")


def rejection(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected and not assoc.is_established
    rsp = assoc.acceptor.primitive
    return rsp.result, rsp.result_source, rsp.diagnostic


def admitted_again(port: int, title: str, timeout: float) -> tuple[object, int]:
    """Associate until admitted (a freed slot); the association and the busy refusals
    met on the way."""
    busy = 0
    deadline = time.monotonic() + timeout
    while True:
        assoc = associate(sender(title), port)
        if assoc.is_established:
            return assoc, busy
        assert rejection(assoc) == (2, 3, 2)
        busy += 1
        if time.monotonic() > deadline:
            raise AssertionError(f"no slot freed within {timeout} s")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    """16 associations at most; idle associations kept (a burst held open for a while)."""
    proc = DicomDaemon(tmp_path_factory.mktemp("dicom_limits") / "home", {
        "TRIAGE__DICOM__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
        "TRIAGE__DICOM__IDLE_TIMEOUT_SECONDS": "600",
        "TRIAGE__DICOM__NETWORK_TIMEOUT_SECONDS": "900",
    }).start()
    yield proc
    proc.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def idle_node(tmp_path_factory: pytest.TempPathFactory):
    """One association at most, aborted after 2 s without a PDU."""
    proc = DicomDaemon(tmp_path_factory.mktemp("dicom_idle") / "home", {
        "TRIAGE__DICOM__MAX_ASSOCIATIONS": "1",
        "TRIAGE__DICOM__IDLE_TIMEOUT_SECONDS": str(IDLE),
    }).start()
    yield proc
    proc.stop(signal.SIGKILL)


@pytest.mark.serial
def test_exactly_max_associations_are_admitted_and_held_until_closed(node) -> None:
    """20 requests at once, each held open once admitted: 16 established, 4 refused as
    transient / local limit exceeded. pynetdicom's own check (acceptor threads alive >
    maximum_associations) admitted 13 to 15 of 16 here: this fails if it comes back."""
    before = node.metrics()
    start = threading.Barrier(BURST)
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def open_one(i: int) -> None:
        try:
            ae = sender(f"HOLD{i:02d}")
            start.wait(timeout=60)
            results[i] = associate(ae, node.dicom_port)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    held: list = []
    try:
        for thread in threads:
            thread.join(timeout=180)
        assert not errors, errors[:3]
        assert len(results) == BURST
        held = [a for a in results.values() if a.is_established]
        refused = [a for a in results.values() if not a.is_established]
        assert len(held) == MAX_ASSOCIATIONS, [
            rejection(a) if a.is_rejected else "no answer" for a in refused]
        assert [rejection(a) for a in refused] == [(2, 3, 2)] * (BURST - MAX_ASSOCIATIONS)
        wait_until(lambda: metric(node.metrics(), "triage_dicom_active_associations")
                   == MAX_ASSOCIATIONS, 30, "16 associations open")
        # still full: one more is refused
        assert rejection(associate(sender("LATE"), node.dicom_port)) == (2, 3, 2)
        # one released: its connection closes and its slot goes to the next request
        held.pop(0).release()
        again, busy = admitted_again(node.dicom_port, "AGAIN", timeout=30)
        held.append(again)  # (busy: refused while the released connection was closing)
        assert rejection(associate(sender("LATE"), node.dicom_port)) == (2, 3, 2)
        after = node.metrics()
    finally:
        for assoc in held:
            assoc.release()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("triage_dicom_associations_total", result="accepted") == MAX_ASSOCIATIONS + 1
    assert delta("triage_dicom_associations_total", result="rejected_busy") == (
        BURST - MAX_ASSOCIATIONS + 2 + busy)
    assert delta("triage_dicom_associations_total", result="released") == 1
    busy_events = [e for e in events(node, "dicom_association_rejected")
                   if e["result"] == "rejected_busy"]
    assert len(busy_events) == BURST - MAX_ASSOCIATIONS + 2 + busy
    assert {e["max_associations"] for e in busy_events} == {MAX_ASSOCIATIONS}
    wait_until(lambda: metric(node.metrics(), "triage_dicom_active_associations") == 0, 30,
               "every association closed")


def test_a_silent_peer_loses_its_slot_after_the_idle_timeout(idle_node) -> None:
    """A peer that associates and then sends nothing, without closing (a sender that
    died, its TCP connection still open): A-ABORT after 2 s, the connection closed by
    the node, the slot free for the next sender; counted and logged once."""
    port = idle_node.dicom_port
    before = idle_node.metrics()
    peer = RawPeer(port)
    try:
        kind, _ = peer.associate("SILENT", "TRIAGE", [(1, CTImageStorage)])
        opened = time.monotonic()
        assert kind == A_ASSOCIATE_AC and peer.accepted == {1: True}
        # the only slot is the silent peer's
        assert rejection(associate(sender("WAITING"), port)) == (2, 3, 2)
        peer.sock.settimeout(IDLE + SLACK)
        kind, body = peer.read_pdu()
        aborted_after = time.monotonic() - opened
        assert kind == A_ABORT and body[2] == 0  # A-ABORT, source: service user
        # (from below, the node's own count is exact: idle_seconds in its event)
        assert IDLE - 1 <= aborted_after <= IDLE + SLACK
        assert peer.read_pdu() == (0, b"")  # and the connection closed by the node
    finally:
        peer.close()
    assoc, _ = admitted_again(port, "WAITING", timeout=SLACK)
    assoc.release()
    after = idle_node.metrics()
    assert (metric(after, "triage_dicom_idle_aborts_total")
            - metric(before, "triage_dicom_idle_aborts_total")) == 1
    assert (metric(after, "triage_dicom_associations_total", result="aborted")
            - metric(before, "triage_dicom_associations_total", result="aborted")) == 1
    [idle] = [e for e in events(idle_node, "dicom_association_idle_aborted")
              if e["calling_ae"] == "SILENT"]
    assert idle["idle_timeout"] == IDLE and idle["peer"] == "127.0.0.1"
    assert IDLE <= idle["idle_seconds"] <= IDLE + SLACK
    assert set(idle) <= {"ts", "level", "logger", "event", "calling_ae", "peer",
                         "idle_seconds", "idle_timeout"}


def test_a_peer_stopped_inside_a_pdu_loses_its_slot(idle_node) -> None:
    """A peer that stops in the middle of a P-DATA-TF PDU: the node's reader waits for
    the rest forever (pynetdicom's sockets have no timeout); the idle abort shuts the
    connection under it and frees the slot."""
    port = idle_node.dicom_port
    before = idle_node.metrics()
    peer = RawPeer(port)
    try:
        kind, _ = peer.associate("HALFPDU", "TRIAGE", [(1, CTImageStorage)])
        assert kind == A_ASSOCIATE_AC
        opened = time.monotonic()
        peer.sock.sendall(struct.pack(">BBI", P_DATA_TF, 0, 1000) + bytes(10))
        peer.sock.settimeout(IDLE + SLACK)
        assert peer.read_pdu() == (0, b"")  # closed; the A-ABORT cannot pass the half PDU
        assert time.monotonic() - opened >= IDLE - 1
        assoc, _ = admitted_again(port, "WAITING", timeout=SLACK)
        assoc.release()
    finally:
        peer.close()
    after = idle_node.metrics()
    assert (metric(after, "triage_dicom_idle_aborts_total")
            - metric(before, "triage_dicom_idle_aborts_total")) == 1
    assert "Traceback" not in idle_node.logs()


def test_an_idle_pynetdicom_association_is_aborted_and_an_active_one_is_not(
    idle_node,
) -> None:
    """A live sender that keeps its association open unused is aborted like a dead one;
    one that sends every second (more often than the idle timeout) is not."""
    port = idle_node.dicom_port
    busy = associate(sender("ECHOING", Verification), port)
    assert busy.is_established
    started = time.monotonic()
    while time.monotonic() - started < 3 * IDLE:
        assert busy.send_c_echo().Status == 0x0000
        time.sleep(IDLE / 2)
    assert busy.is_established
    busy.release()
    unused, _ = admitted_again(port, "UNUSED", timeout=SLACK)
    wait_until(lambda: unused.is_aborted, IDLE + SLACK, "the unused association aborted")
    assoc, _ = admitted_again(port, "WAITING", timeout=SLACK)
    assoc.release()
    aborted = [e["calling_ae"] for e in events(idle_node, "dicom_association_idle_aborted")]
    assert "UNUSED" in aborted and "ECHOING" not in aborted


def test_a_store_on_a_context_not_negotiated_for_it(node) -> None:
    """A C-STORE naming MR Image Storage on the CT context is answered 0x0122 (Refused:
    SOP Class Not Supported) and the association goes on; a C-STORE on a context the
    node rejected, on one never proposed, or naming the Verification SOP Class is
    aborted (see receiver._check_context for why those cannot be answered)."""
    port = node.dicom_port
    before = node.metrics()
    peer = RawPeer(port)
    study = "2.25.314159265358979323846264338327950288"
    try:
        kind, _ = peer.associate("RAWSCU", "TRIAGE", [
            (1, CTImageStorage), (3, StudyRootQueryRetrieveInformationModelFind)])
        assert kind == A_ASSOCIATE_AC and peer.accepted == {1: True, 3: False}
        mr = ct(study, seed=1)
        mr.SOPClassUID = MRImageStorage
        mr.Modality = "MR"
        peer.c_store(1, MRImageStorage, mr.SOPInstanceUID, mr, message_id=7)
        context_id, answer = peer.response()
        assert context_id == 1 and answer is not None
        assert (answer.CommandField, answer.MessageIDBeingRespondedTo, answer.Status) == (
            0x8001, 7, 0x0122)
        assert answer.ErrorComment == (
            "the request's SOP Class UID is not its presentation context's")
        assert answer.AffectedSOPClassUID == MRImageStorage
        good = ct(study, seed=2)
        peer.c_store(1, CTImageStorage, good.SOPInstanceUID, good, message_id=8)
        context_id, answer = peer.response()
        assert (context_id, answer.MessageIDBeingRespondedTo, answer.Status) == (1, 8, 0x0000)
        # the rejected query context: no transfer syntax to read it by, none to answer on
        other = ct(study, seed=3)
        peer.c_store(3, CTImageStorage, other.SOPInstanceUID, other, message_id=9)
        assert peer.response() == (A_ABORT, None)
    finally:
        peer.close()
    for context_id, sop_class in ((5, CTImageStorage), (1, Verification)):
        peer = RawPeer(port)
        try:
            kind, _ = peer.associate("RAWSCU", "TRIAGE", [(1, CTImageStorage)])
            assert kind == A_ASSOCIATE_AC
            ds = ct(study, seed=context_id)
            peer.c_store(context_id, sop_class, ds.SOPInstanceUID, ds)
            assert peer.response() == (A_ABORT, None), (context_id, sop_class)
        finally:
            peer.close()
    # one that works still does, and a release is answered
    peer = RawPeer(port)
    try:
        assert peer.associate("RAWSCU", "TRIAGE", [(1, CTImageStorage)])[0] == A_ASSOCIATE_AC
        ds = ct(study, seed=4)
        peer.c_store(1, CTImageStorage, ds.SOPInstanceUID, ds)
        assert peer.response()[1].Status == 0x0000
        assert peer.release() == A_RELEASE_RP
    finally:
        peer.close()
    wait_until(lambda: files_settled(node, "RAWSCU", 2), 30, "the two instances read")
    assert assert_final(node, "RAWSCU") == {"archived": 2}  # the MR was never stored
    after = node.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("triage_dicom_instances_total", status="success") == 2
    assert delta("triage_dicom_instances_total", status="failed") == 2  # 0x0122, Verification
    assert delta("triage_dicom_associations_total", result="aborted") == 3
    assert delta("triage_dicom_associations_total", result="released") == 1
    refused = [(e["status"], e["reason_code"]) for e in events(node, "dicom_store_refused")
               if e["calling_ae"] == "RAWSCU"]
    assert refused == [("0x0122", "sop_class_not_negotiated"),
                       ("abort", "sop_class_not_storage")]
