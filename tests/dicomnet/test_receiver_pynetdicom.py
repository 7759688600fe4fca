"""The DICOM node against pynetdicom senders: refusals, an abort, a burst of concurrent
associations, a store that cannot be made durable, instances refused before Success,
shutdown and a port in use.

Real daemons (`triage serve`) on loopback; the study stable age is 60 s, so a study
decided within seconds was completed by the end of its association.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PHI, PHI_STRINGS, REPO
from dicomnet_helpers import (
    DicomDaemon,
    assert_final,
    events,
    files_settled,
    metric,
    wait_until,
)
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from triage.replay.dicom_writer import image_dataset

STABLE_AGE = "60"
BURST = 50
MAX_ASSOCIATIONS = 8


def ct(study_uid: str, number: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    pixels = rng.normal(40, 200, (32, 32)).astype(np.int16)
    return image_dataset(pixels, modality="CT", study_uid=study_uid, instance_number=number,
                         patient_name=PHI["name"], patient_id=PHI["id"],
                         accession=PHI["accession"])


def sender(title: str, *contexts: str) -> AE:
    ae = AE(ae_title=title)
    for context in contexts or (CTImageStorage,):
        ae.add_requested_context(context, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae


def rejection(assoc) -> tuple[int, int, int]:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ the peer sent."""
    assert assoc.is_rejected and not assoc.is_established
    rsp = assoc.acceptor.primitive
    return rsp.result, rsp.result_source, rsp.diagnostic


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("dicom_pynetdicom") / "home"
    proc = DicomDaemon(home, {
        "TRIAGE__STUDIES__STABLE_AGE_SECONDS": STABLE_AGE,
        "TRIAGE__DICOM__ALLOWED_CALLING_AE_TITLES": '["GOODSCU", "BURST", "ECHOSCU", "CHECKSCU"]',
        "TRIAGE__DICOM__MAX_ASSOCIATIONS": str(MAX_ASSOCIATIONS),
    }).start()
    yield proc
    proc.stop(signal.SIGKILL)


def test_unknown_called_and_disallowed_calling_ae_titles_are_rejected(node) -> None:
    before = node.metrics()
    wrong_called = sender("GOODSCU").associate("127.0.0.1", node.dicom_port, ae_title="PACS")
    assert rejection(wrong_called) == (1, 1, 7)  # permanent, user, called AE title
    stranger = sender("STRANGER").associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE")
    assert rejection(stranger) == (1, 1, 3)  # permanent, user, calling AE title
    echo = sender("ECHOSCU", Verification).associate("127.0.0.1", node.dicom_port,
                                                     ae_title="TRIAGE")
    assert echo.is_established and echo.send_c_echo().Status == 0x0000
    echo.release()
    after = node.metrics()
    for result in ("rejected_called_ae", "rejected_calling_ae"):
        assert (metric(after, "triage_dicom_associations_total", result=result)
                - metric(before, "triage_dicom_associations_total", result=result)) == 1
    refused = {e["calling_ae"]: e for e in events(node, "dicom_association_rejected")}
    assert refused["STRANGER"]["result"] == "rejected_calling_ae"
    assert refused["STRANGER"]["peer"] == "127.0.0.1"
    assert refused["GOODSCU"]["called_ae"] == "PACS"


def test_a_non_storage_context_is_rejected_and_cannot_be_used(node) -> None:
    ae = sender("GOODSCU", CTImageStorage, StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [CTImageStorage]
    assert [cx.abstract_syntax for cx in assoc.rejected_contexts] == [
        StudyRootQueryRetrieveInformationModelFind]
    query = image_dataset(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="No presentation context"):
        next(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assert assoc.is_established  # the refusal is local: the association carries on
    assoc.release()


def test_an_aborted_association_completes_what_it_stored(node) -> None:
    study = "2.25.271828182845904523536028747135266249775"
    before = node.metrics()
    assoc = sender("GOODSCU").associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    for number in (1, 2, 3):
        assert assoc.send_c_store(ct(study, number, seed=number)).Status == 0x0000
    aborted = time.time()
    assoc.abort()

    def decided():
        rows = node.query("SELECT studies.state, studies.n_images, decisions.created_at "
                          "FROM studies JOIN decisions ON decisions.study_id = studies.id "
                          "WHERE study_uid = ?", [study])
        return rows[0] if rows else None

    state, n_images, decided_at = wait_until(decided, 20, "the aborted study's decision")
    assert state == "scored" and n_images == 3
    assert decided_at - aborted < 10  # not the 60 s stable age
    after = node.metrics()
    assert (metric(after, "triage_dicom_associations_total", result="aborted")
            - metric(before, "triage_dicom_associations_total", result="aborted")) == 1
    assert metric(after, "triage_dicom_active_associations") == 0
    ended = [e for e in events(node, "dicom_association_aborted") if e["calling_ae"] == "GOODSCU"]
    assert [e["stored"] for e in ended] == [3]


@pytest.mark.serial
def test_a_burst_of_concurrent_associations(node) -> None:
    """50 senders at once against 8 associations at most: the others are refused as
    busy (transient) and retry, as modalities do; every instance is stored once, and
    never more than 8 associations are open at once (test_receiver_limits.py: exactly 8
    are admitted).

    A request can also go unanswered within the ACSE timeout (2 to 14 of 50 here on
    2026-12-03, alone on the machine: pynetdicom's accept path under a burst, issue 23's
    association limits); a modality retries that too, and so do these senders."""
    before = node.metrics()
    statuses: dict[int, int] = {}
    busy: list[int] = []
    unanswered: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(BURST)
    open_now = [0, 0]  # established and not yet released, the most seen at once
    count = threading.Lock()

    def send(i: int) -> None:
        try:
            ds = ct(f"2.25.{9_000_000 + i}", seed=100 + i)
            ae = sender("BURST")
            ae.acse_timeout = 5  # an unanswered request is retried after 5 s, not 30
            start.wait(timeout=30)
            for attempt in range(200):
                assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE")
                if assoc.is_established:
                    with count:
                        open_now[0] += 1
                        open_now[1] = max(open_now)
                    statuses[i] = assoc.send_c_store(ds).Status
                    with count:
                        open_now[0] -= 1
                    assoc.release()
                    return
                if not assoc.is_rejected:  # no answer in time: retry, as modalities do
                    unanswered.append(i)
                    continue
                assert rejection(assoc) == (2, 3, 2), "only busy refusals expected"
                busy.append(i)
                time.sleep(0.05 + 0.002 * (attempt % 10))
            raise AssertionError(f"sender {i} never got an association")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(BURST)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[:3]
    # not bounded here: 2 to 14 of 50 went unanswered for 30 s in runs on 2026-12-03, a
    # latency problem of the receiver's accept path under a burst (issue 23), not a loss
    print(f"\n{len(unanswered)} association requests unanswered within the ACSE timeout")
    assert statuses == dict.fromkeys(range(BURST), 0x0000)
    # seen from the senders (a slot is held until the connection closes, a little later)
    assert 0 < open_now[1] <= MAX_ASSOCIATIONS
    wait_until(lambda: files_settled(node, "BURST", BURST), 60, "the burst's files read")
    assert assert_final(node, "BURST") == {"archived": BURST}
    wait_until(lambda: metric(node.metrics(), "triage_dicom_active_associations") == 0, 10,
               "no association left open")
    after = node.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("triage_dicom_associations_total", result="released") == BURST
    # a request the sender gave up on may still have reached the node: accepted late (the
    # sender had gone, so it ends aborted, storing nothing) or refused as busy; each
    # unanswered request is at most one of these
    late = delta("triage_dicom_associations_total", result="accepted") - BURST
    refused = delta("triage_dicom_associations_total", result="rejected_busy") - len(busy)
    assert late >= 0 and refused >= 0 and late + refused <= len(unanswered)
    assert delta("triage_dicom_instances_total", status="success") == BURST
    assert delta("triage_dicom_store_seconds_count") == BURST
    assert 0 < delta("triage_dicom_store_seconds_sum") < BURST * 5
    # the studies complete at association end, well before the stable age
    decided = node.query("SELECT COUNT(*) FROM studies WHERE study_uid LIKE '2.25.9%' "
                         "AND state = 'scored'")[0][0]
    assert decided == BURST or wait_until(lambda: node.query(
        "SELECT COUNT(*) FROM studies WHERE study_uid LIKE '2.25.9%' AND state = 'scored'"
    )[0][0] == BURST, 30, "the burst's studies decided")
    logs = node.logs()
    for secret in PHI_STRINGS:
        assert secret not in logs, secret


def test_what_would_not_be_archived_is_refused_before_success(node, tmp_path: Path) -> None:
    """Short pixel data, a missing SOP Instance UID, a data set that is not the instance
    the request names, a header cut short: each is answered with a failure status and
    the reason in the Error Comment instead of Success, so the modality keeps it and can
    resend; none is stored, journaled or quarantined. A good instance in the same
    association is stored as usual."""
    study = "2.25.5772156649015328606065120900824024310"
    before = node.metrics()
    cut = ct(study, 1, seed=1)
    cut.PixelData = cut.PixelData[:1024]  # 32 x 32 x 16 bits declared: 2048 bytes

    def file_of(ds, name: str) -> Path:
        """``ds`` as a file, sent as its bytes are (pynetdicom's chunked mode: the UIDs
        of the request from the file meta, the data set not re-encoded); the file meta
        written as it is, not made to agree with the data set."""
        ds.preamble = b"\0" * 128
        ds.save_as(tmp_path / name, enforce_file_format=False)
        return tmp_path / name

    no_uid = ct(study, 2, seed=2)
    no_uid.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the request names it...
    del no_uid.SOPInstanceUID  # ...the data set does not
    other_class = ct(study, 3, seed=3)
    other_class.SOPClassUID = MRImageStorage  # the request (file meta) says CT
    header_cut = file_of(ct(study, 4, seed=4), "cut.dcm")
    header_cut.write_bytes(header_cut.read_bytes()[:-100])  # inside the Pixel Data value
    good = ct(study, 5, seed=5)
    paths = [file_of(no_uid, "no_uid.dcm"), file_of(other_class, "other_class.dcm")]
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    assoc = sender("CHECKSCU").associate("127.0.0.1", node.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        answers = [assoc.send_c_store(cut)]
        _config.STORE_SEND_CHUNKED_DATASET = True
        answers += [assoc.send_c_store(path) for path in (*paths, header_cut)]
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        answers.append(assoc.send_c_store(good))
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    assert [(a.Status, a.get("ErrorComment")) for a in answers] == [
        (0xA900, "pixel data holds 1024 of the 2048 bytes declared"),
        (0xA900, "not a usable DICOM instance: it has no SOP Instance UID"),
        (0xA900, "the data set's SOP Class UID is not the one the request names"),
        (0xC000, "data element (7FE0,0010) declares 2048 bytes but the file..."),
        (0x0000, None),
    ]
    wait_until(lambda: files_settled(node, "CHECKSCU", 1), 20, "the good instance read")
    assert assert_final(node, "CHECKSCU") == {"archived": 1}  # nothing else journaled
    archived = {uid for (uid,) in node.query(
        "SELECT sop_uid FROM instances JOIN studies ON studies.id = instances.study_id "
        "WHERE study_uid = ?", [study])}
    assert archived == {good.SOPInstanceUID}
    assert list((node.home / "received").glob("*.dcm")) == []  # read, nothing left over
    quarantine = node.home / "quarantine"
    assert not quarantine.exists() or list(quarantine.iterdir()) == []
    after = node.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("triage_dicom_instances_total", status="failed") == 4
    assert delta("triage_dicom_instances_total", status="success") == 1
    for reason, count in (("truncated", 2), ("missing_uid", 1), ("sop_mismatch", 1),
                          ("invalid_image", 0)):
        assert delta("triage_received_invalid_instances_total", origin="dicom",
                     reason=reason) == count, reason
    refused = [e for e in events(node, "dicom_store_refused") if e["calling_ae"] == "CHECKSCU"]
    assert [(e["status"], e["reason_code"]) for e in refused] == [
        ("0xA900", "truncated"), ("0xA900", "missing_uid"), ("0xA900", "sop_mismatch"),
        ("0xC000", "truncated")]
    assert refused[3]["reason"] == ("data element (7FE0,0010) declares 2048 bytes but the "
                                    "file ends 1948 bytes after its start")
    [ended] = [e for e in events(node, "dicom_association_released")
               if e["calling_ae"] == "CHECKSCU"]
    assert (ended["stored"], ended["failed"]) == (1, 4)
    logs = node.logs()
    for secret in PHI_STRINGS:
        assert secret not in logs, secret


def test_a_disallowed_host_is_rejected(tmp_path: Path) -> None:
    proc = DicomDaemon(tmp_path / "home",
                       {"TRIAGE__DICOM__ALLOWED_HOSTS": '["10.9.9.9", "192.168.0.0/16"]'}).start()
    try:
        assoc = sender("GOODSCU").associate("127.0.0.1", proc.dicom_port, ae_title="TRIAGE")
        assert rejection(assoc) == (1, 1, 1)  # permanent, user, no reason given
        text = proc.metrics()
        assert metric(text, "triage_dicom_associations_total", result="rejected_host") == 1
        assert metric(text, "triage_dicom_associations_total", result="accepted") == 0
        [refused] = events(proc, "dicom_association_rejected")
        assert refused["result"] == "rejected_host" and refused["peer"] == "127.0.0.1"
    finally:
        proc.stop(signal.SIGKILL)


def test_a_store_that_cannot_be_made_durable_is_refused(tmp_path: Path) -> None:
    """Free space below ingest.min_free_bytes: 0xA700 (out of resources, the sender
    retries later) with the reason, never Success, and nothing journaled."""
    proc = DicomDaemon(tmp_path / "home", {
        "TRIAGE__INGEST__MIN_FREE_BYTES": str(2**62),
        "TRIAGE__DICOM__ALLOWED_HOSTS": '["10.0.0.0/8", "127.0.0.0/8"]',
    }).start()
    try:
        assoc = sender("GOODSCU").associate("127.0.0.1", proc.dicom_port, ae_title="TRIAGE")
        assert assoc.is_established  # 127.0.0.1 is inside 127.0.0.0/8
        status = assoc.send_c_store(ct("2.25.424242"))
        assert status.Status == 0xA700
        assert "min_free_bytes" in status.ErrorComment
        assoc.release()
        assert proc.query("SELECT COUNT(*) FROM files")[0][0] == 0
        assert list((proc.home / "received").iterdir()) == []
        text = proc.metrics()
        assert metric(text, "triage_dicom_instances_total", status="out_of_resources") == 1
        assert metric(text, "triage_dicom_instances_total", status="success") == 0
        [refused] = events(proc, "dicom_store_refused")
        assert refused["status"] == "0xA700" and refused["calling_ae"] == "GOODSCU"
    finally:
        proc.stop(signal.SIGKILL)


def test_a_dicom_port_in_use_stops_serve_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "triage", "serve", "--config", str(REPO / "config.yaml"),
             "--port", "0"],
            env={**os.environ, "TRIAGE_HOME": str(tmp_path / "home"),
                 "TRIAGE__DICOM__PORT": str(port), "TRIAGE__DICOM__HOST": "127.0.0.1"},
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"triage: dicom.host '127.0.0.1', dicom.port {port}: address already in use"
    assert "Traceback" not in result.stderr


def test_reading_waits_while_a_sender_sends_but_never_longer_than_the_bound(
    tmp_path: Path,
) -> None:
    """dicom.defer_reading_seconds: instances of an association still sending stay
    `received` (the sender is not slowed by reading), but a sender that keeps sending
    does not hold them back for longer than the bound; the end of the association has
    them read and the study decided at once."""
    proc = DicomDaemon(tmp_path / "home", {"TRIAGE__STUDIES__STABLE_AGE_SECONDS": STABLE_AGE,
                                           "TRIAGE__DICOM__DEFER_READING_SECONDS": "2"}).start()
    try:
        study = "2.25.1618033988749894848204586834365638117"
        assoc = sender("GOODSCU").associate("127.0.0.1", proc.dicom_port, ae_title="TRIAGE")
        assert assoc.is_established
        started, number, states_early = time.monotonic(), 0, None
        while time.monotonic() - started < 5:
            number += 1
            assert assoc.send_c_store(ct(study, number, seed=number)).Status == 0x0000
            if states_early is None and time.monotonic() - started > 1:
                states_early = {row[0] for row in proc.query("SELECT state FROM files")}
            time.sleep(0.05)
        read_while_sending = proc.query(
            "SELECT COUNT(*) FROM files WHERE state = 'archived'")[0][0]
        assoc.release()
        released = time.time()
        assert states_early == {"received"}  # nothing read in the first second of sending
        assert read_while_sending > 0  # ...but not held back for the whole association
        decided_at = wait_until(lambda: proc.query(
            "SELECT MIN(decisions.created_at) FROM decisions JOIN studies "
            "ON studies.id = decisions.study_id WHERE study_uid = ?", [study])[0][0],
            20, "the study's decision")
        assert decided_at - released < 10
        assert proc.query("SELECT COUNT(*) FROM files WHERE state = 'archived'"
                          )[0][0] == number
    finally:
        proc.stop(signal.SIGKILL)


def test_a_finished_association_is_read_at_once_while_another_sender_sends(
    tmp_path: Path,
) -> None:
    """Deferred reading holds back only the instances of associations still sending: a
    second modality's study, stored and released while a long series keeps arriving, is
    read and decided at once, and the long series' instances stay unread meanwhile."""
    proc = DicomDaemon(tmp_path / "home", {"TRIAGE__STUDIES__STABLE_AGE_SECONDS": STABLE_AGE,
                                           "TRIAGE__DICOM__DEFER_READING_SECONDS": "60"}).start()
    try:
        long_study, short_study = generate_uid(), generate_uid()
        long_series = sender("GOODSCU").associate("127.0.0.1", proc.dicom_port,
                                                  ae_title="TRIAGE")
        assert long_series.is_established
        for number in range(1, 4):
            assert long_series.send_c_store(ct(long_study, number, seed=number)).Status == 0
        other = sender("GOODSCU").associate("127.0.0.1", proc.dicom_port, ae_title="TRIAGE")
        assert other.send_c_store(ct(short_study, 1, seed=99)).Status == 0
        other.release()
        released = time.time()
        decided = None
        number = 3
        while decided is None and time.time() - released < 15:
            number += 1  # the long series keeps sending
            assert long_series.send_c_store(ct(long_study, number, seed=number)).Status == 0
            decided = proc.query(
                "SELECT MIN(decisions.created_at) FROM decisions JOIN studies "
                "ON studies.id = decisions.study_id WHERE study_uid = ?", [short_study])[0][0]
            time.sleep(0.1)
        assert decided is not None and decided - released < 15
        states = proc.query(
            "SELECT files.state, COUNT(*) FROM files JOIN instances "
            "ON files.instance_id = instances.id JOIN studies ON studies.id = instances.study_id "
            "WHERE study_uid = ? GROUP BY files.state", [short_study])
        assert states == [("archived", 1)]
        # the series still sending is deferred: nothing of it was read
        assert proc.query("SELECT COUNT(*) FROM files WHERE state != 'received'")[0][0] == 1
        long_series.release()
        wait_until(lambda: proc.query(
            "SELECT COUNT(*) FROM decisions JOIN studies ON studies.id = decisions.study_id "
            "WHERE study_uid = ?", [long_study])[0][0], 20, "the long series' decision")
    finally:
        proc.stop(signal.SIGKILL)
