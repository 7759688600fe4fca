"""The DICOM node against DCMTK's echoscu and storescu, with the real daemon behind it.

One daemon for the module, with a study stable age of 60 s: a study decided within
seconds of storescu's exit was completed by the end of its association, not by age.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from conftest import PHI, PHI_STRINGS, make_image
from dicomnet_helpers import (
    DicomDaemon,
    assert_final,
    events,
    files_settled,
    metric,
    needs,
    wait_until,
)

from triage.config import IngestSettings
from triage.errors import DicomRejected
from triage.ingest.dicom import InstanceRefused, check_received, read_instance

STABLE_AGE = 60.0
CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):
    needs("storescu")
    home = tmp_path_factory.mktemp("dicom_dcmtk") / "home"
    proc = DicomDaemon(home, {"TRIAGE__STUDIES__STABLE_AGE_SECONDS": str(STABLE_AGE)}).start()
    yield proc
    proc.stop(signal.SIGKILL)


def _dcmtk(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    # DCMTK 3.6.7 as packaged keeps Nagle's algorithm on unless TCP_NODELAY=1.
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_echo_and_a_wrong_called_ae_title(node: DicomDaemon) -> None:
    before = node.metrics()
    ok = _dcmtk("echoscu", "-aec", "TRIAGE", "127.0.0.1", str(node.dicom_port))
    assert ok.returncode == 0, ok.stderr
    refused = _dcmtk("echoscu", "-aec", "PACS", "127.0.0.1", str(node.dicom_port))
    assert refused.returncode != 0
    assert "Association Rejected" in refused.stderr
    assert "Called AE Title Not Recognized" in refused.stderr, refused.stderr
    after = node.metrics()
    for name, labels, delta in (
        ("triage_dicom_instances_total", {"status": "echo"}, 1),
        ("triage_dicom_associations_total", {"result": "rejected_called_ae"}, 1),
        ("triage_dicom_associations_total", {"result": "accepted"}, 1),
        ("triage_dicom_associations_total", {"result": "released"}, 1),
    ):
        assert metric(after, name, **labels) - metric(before, name, **labels) == delta, name
    rejected = events(node, "dicom_association_rejected")
    assert any(e["result"] == "rejected_called_ae" and e["called_ae"] == "PACS"
               and e["calling_ae"] == "ECHOSCU" and e["peer"] == "127.0.0.1" for e in rejected)


def _corpus_profile(path: Path) -> Path:
    """A storescu association profile proposing, for each SOP class in pydicom's test
    files, its files' own transfer syntaxes (one context each: sent as they are, no
    conversion; storescu itself has no JPEG 2000, JPEG-LS or RLE codec) and the
    uncompressed ones."""
    pairs: set[tuple[str, str]] = set()
    for file in sorted(CORPUS.iterdir()):
        if not file.is_file():
            continue
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
            sop_class = str(ds.SOPClassUID)
        except Exception:  # noqa: BLE001 - not DICOM, or no SOP class: storescu skips it
            continue
        meta = getattr(ds, "file_meta", None)
        syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        pairs.update((sop_class, ts) for ts in UNCOMPRESSED)
        if syntax:
            pairs.add((sop_class, syntax))
    syntaxes = sorted({ts for _, ts in pairs})
    names = {ts: f"TS{i}" for i, ts in enumerate(syntaxes)}
    lines = ["[[TransferSyntaxes]]"]
    for ts, name in names.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Corpus]"]
    assert len(pairs) <= 128, "more presentation contexts than one association carries"
    for i, (sop_class, ts) in enumerate(sorted(pairs), 1):
        lines.append(f"PresentationContext{i} = {sop_class}\\{names[ts]}")
    lines += ["[[Profiles]]", "[Corpus]", "PresentationContexts = Corpus"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sent(output: str) -> tuple[list[str], list[str]]:
    """Files storescu reported stored (a Success response) and those it did not."""
    sent, other, current = [], [], None
    for line in output.splitlines():
        if match := re.match(r"I: Sending file: (.+)$", line):
            if current is not None:
                other.append(current)
            current = match[1]
        elif line.startswith("I: Received Store Response") and current is not None:
            (sent if "(Success)" in line else other).append(current)
            current = None
    if current is not None:
        other.append(current)
    return sent, other


def _refused(output: str) -> dict[str, str]:
    """Files storescu got a failure response for, with the status it printed."""
    refused, current = {}, None
    for line in output.splitlines():
        if match := re.match(r"I: Sending file: (.+)$", line):
            current = match[1]
        elif (match := re.match(r"I: Received Store Response \((.+)\)$", line)) and (
                match[1] != "Success" and current is not None):
            refused[current] = match[1]
    return refused


def test_storescu_sends_pydicoms_test_files(node: DicomDaemon, tmp_path: Path) -> None:
    """Every file storescu reports stored is journaled once (origin dicom, the calling AE
    title as sender) and reaches a final state; nothing else appears. Compressed files
    travel in their own transfer syntax. The few refused are files the reader would not
    have archived either (images without a Study Instance UID): refused before Success,
    with a failure status, not quarantined after it."""
    profile = _corpus_profile(tmp_path / "corpus.cfg")
    result = _dcmtk("storescu", "-v", "-nh", "+sd", "-xf", str(profile), "Corpus",
                    "-aet", "CORPUS", "-aec", "TRIAGE", "127.0.0.1", str(node.dicom_port),
                    str(CORPUS), timeout=120)
    output = result.stdout + result.stderr
    sent, not_sent = _sent(output)
    assert len(sent) >= 50, output[-3000:]
    refused = _refused(output)
    assert set(refused.values()) == {"Error: DataSetDoesNotMatchSOPClass"}, refused
    for name in refused:
        data = Path(name).read_bytes()
        with pytest.raises(InstanceRefused):
            check_received(data)
        with pytest.raises(DicomRejected):
            read_instance(data, IngestSettings())
    assert {Path(name).name for name in refused} == {
        "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
        "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"}
    conversions = re.findall(r"Converting transfer syntax: (.+?) -> (.+)$", output, re.M)
    assert conversions and all(a == b for a, b in conversions), conversions
    compressed = {a for a, _ in conversions if re.search(r"JPEG|RLE|Deflated", a)}
    assert len(compressed) >= 8, compressed  # JPEG (4 kinds), JPEG-LS, J2K, RLE, deflated
    wait_until(lambda: files_settled(node, "CORPUS", len(sent)), 90,
               f"{len(sent)} corpus files read")
    states = assert_final(node, "CORPUS")
    assert sum(states.values()) == len(sent), (states, not_sent)
    assert states.get("archived", 0) >= 20 and states.get("unsupported", 0) >= 5, states
    # What was stored is what was sent: same transfer syntax, same pixel data bytes.
    by_uid: dict[str, list[pydicom.Dataset]] = {}
    for name in sent:
        ds = pydicom.dcmread(name, force=True)
        by_uid.setdefault(str(ds.SOPInstanceUID), []).append(ds)
    compared = 0
    for (stored,) in node.query("SELECT stored_path FROM files WHERE sender = 'CORPUS' "
                                "AND stored_path IS NOT NULL"):
        got = pydicom.dcmread(node.home / stored, force=True)
        originals = by_uid.get(str(got.SOPInstanceUID), [])
        if len(originals) != 1:
            continue  # variants of one instance in several files: compared by count only
        original = originals[0]
        syntax = original.file_meta.get("TransferSyntaxUID")  # some files have no meta
        assert syntax is None or got.file_meta.TransferSyntaxUID == syntax, stored
        assert got.get("PixelData") == original.get("PixelData"), stored
        compared += 1
    assert compared >= 25, compared


def test_multi_series_study_is_decided_when_the_association_ends(
        node: DicomDaemon, tmp_path: Path) -> None:
    study_uid = "2.25.3141592653589793238462643383279502884"
    folder = tmp_path / "ct"
    for series in range(2):
        for slice_ in range(10):
            make_image(folder / f"s{series}_{slice_:02d}.dcm", study_uid=study_uid,
                       seed=series * 10 + slice_, modality="CT",
                       series_uid=f"2.25.{series + 1}{study_uid[5:20]}",
                       instance_number=slice_ + 1)
    result = _dcmtk("storescu", "-v", "+sd", "-aet", "CTSCAN", "-aec", "TRIAGE",
                    "127.0.0.1", str(node.dicom_port), str(folder))
    ended = time.time()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-2000:]
    assert output.count("Received Store Response (Success)") == 20
    assert output.count("Requesting Association") == 1  # one association

    def decided():
        rows = node.query(
            "SELECT studies.state, studies.completed_at, decisions.created_at, "
            "studies.n_images FROM studies JOIN decisions ON decisions.study_id = studies.id "
            "WHERE study_uid = ?", [study_uid])
        return rows[0] if rows else None

    state, completed_at, decided_at, n_images = wait_until(decided, 20, "the decision")
    assert state == "scored" and n_images == 20
    # completed by the end of the association, not by the 60 s stable age
    assert decided_at - ended < 10, decided_at - ended
    assert completed_at - ended < STABLE_AGE / 2
    assert files_settled(node, "CTSCAN", 20)
    assert assert_final(node, "CTSCAN") == {"archived": 20}
    released = [e for e in events(node, "dicom_association_released")
                if e["calling_ae"] == "CTSCAN"]
    assert [e["stored"] for e in released] == [20]
    logs = node.logs()
    for secret in PHI_STRINGS:
        assert secret not in logs, secret


def test_storescu_is_told_a_truncated_instance_was_not_stored(
        node: DicomDaemon, tmp_path: Path) -> None:
    """pydicom's CT_small.dcm with its Pixel Data cut short, then a good MR: the CT is
    answered 0xA900 with the reason in the Error Comment, so storescu reports it failed
    and stops there (its default: a modality keeps the instance and resends it) instead
    of Success followed by a quarantine nobody hears of. Sent again with ``-nh`` (go on
    after a failure), the MR is stored in the same association. The CT is never stored,
    journaled, archived or quarantined."""
    study = "2.25.1414213562373095048801688724209698078"
    folder = tmp_path / "send"
    folder.mkdir()
    cut = pydicom.dcmread(CORPUS / "CT_small.dcm")
    good = pydicom.dcmread(CORPUS / "MR_small.dcm")
    for ds in (cut, good):  # a new instance of a new study, carrying the test PHI
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PatientName, ds.PatientID = PHI["name"], PHI["id"]
        ds.AccessionNumber = PHI["accession"]
    cut.PixelData = cut.PixelData[:-1000]  # 128 x 128 x 16 bits declared: 32768 bytes
    pydicom.dcmwrite(folder / "1_cut.dcm", cut)
    pydicom.dcmwrite(folder / "2_good.dcm", good)
    before = node.metrics()
    send = ("storescu", "-v", "+sd", "-aet", "CUTSCU", "-aec", "TRIAGE", "127.0.0.1",
            str(node.dicom_port), str(folder))
    halted = _dcmtk(*send[:2], "-d", *send[2:])
    output = halted.stdout + halted.stderr
    assert halted.returncode != 0, output[-3000:]
    assert re.search(r"DIMSE Status +: 0xa900: Error: Data Set does not match SOP Class",
                     output), output[-3000:]
    assert re.search(r"\[pixel data holds 31768 of the 32768 bytes declared\] .*ErrorComment",
                     output), output[-3000:]
    assert "2_good.dcm" not in output  # it stopped at the failure
    carried_on = _dcmtk(*send[:2], "-nh", *send[2:])
    output = carried_on.stdout + carried_on.stderr
    sent, not_sent = _sent(output)
    assert [Path(name).name for name in sent] == ["2_good.dcm"], output[-3000:]
    assert [Path(name).name for name in not_sent] == ["1_cut.dcm"], output[-3000:]
    assert output.count("Requesting Association") == 1
    wait_until(lambda: files_settled(node, "CUTSCU", 1), 30, "the good instance read")
    assert assert_final(node, "CUTSCU") == {"archived": 1}  # the cut one never journaled
    archived = {uid for (uid,) in node.query(
        "SELECT sop_uid FROM instances JOIN studies ON studies.id = instances.study_id "
        "WHERE study_uid = ?", [study])}
    assert archived == {str(good.SOPInstanceUID)}
    assert node.query("SELECT COUNT(*) FROM files WHERE sender = 'CUTSCU' AND "
                      "state = 'quarantined'")[0][0] == 0
    after = node.metrics()
    for name, labels, delta in (
        ("triage_dicom_instances_total", {"status": "failed"}, 2),
        ("triage_dicom_instances_total", {"status": "success"}, 1),
        ("triage_received_invalid_instances_total", {"origin": "dicom", "reason": "truncated"},
         2),
    ):
        assert metric(after, name, **labels) - metric(before, name, **labels) == delta, name
    refused = [e for e in events(node, "dicom_store_refused") if e["calling_ae"] == "CUTSCU"]
    assert [(e["status"], e["reason_code"]) for e in refused] == [("0xA900", "truncated")] * 2
    logs = node.logs()
    for secret in PHI_STRINGS:
        assert secret not in logs, secret


def test_the_status_page_shows_the_dicom_node(node: DicomDaemon, tmp_path: Path) -> None:
    """/api/ops/summary's `dicom` section matches the store and /metrics, and the status
    page draws it (Chromium, when installed). Runs after the tests above (their traffic)."""
    token = node.cli("token", "create", "--role", "ops", "--name", "ops user").stdout
    token = token.strip().splitlines()[-1]
    summary = httpx.get(f"{node.url}/api/ops/summary", timeout=10,
                        headers={"Authorization": f"Bearer {token}"}).json()
    dicom, text = summary["dicom"], node.metrics()
    senders = dict(node.query("SELECT sender, COUNT(*) FROM files WHERE origin = 'dicom' "
                              "GROUP BY sender"))
    assert dicom["enabled"] and dicom["listening"] and dicom["port"] == node.dicom_port
    assert (dicom["ae_title"], dicom["host"]) == ("TRIAGE", "127.0.0.1")
    assert dicom["received_24h"] == sum(senders.values()) > 80
    assert dicom["senders_24h"] == senders and senders["CTSCAN"] == 20
    assert dicom["active_associations"] == 0
    for result, value in dicom["associations"].items():
        assert value == metric(text, "triage_dicom_associations_total", result=result)
    assert dicom["instances"]["success"] == metric(text, "triage_dicom_instances_total",
                                                   status="success") == dicom["received_24h"]
    assert dicom["associations"]["rejected_called_ae"] >= 1
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium not found (make system-deps installs it)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium),
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{node.url}/status")
            page.wait_for_selector("#sign-in:not([hidden])")
            page.fill("#token", token)
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("body[data-loaded=true]", timeout=15000)
            shown = {key: page.text_content(f'[data-k="{key}"]') for key in (
                "dicom_listening", "dicom_ae_title", "dicom_allowed_ae", "dicom_allowed_hosts",
                "dicom_active", "dicom_received_24h")}
            assert shown == {
                "dicom_listening": f"127.0.0.1:{node.dicom_port}", "dicom_ae_title": "TRIAGE",
                "dicom_allowed_ae": "any", "dicom_allowed_hosts": "any",
                "dicom_active": "0 of 16",
                "dicom_received_24h": f"{dicom['received_24h']:,}"}
            assert "CTSCAN" in page.text_content("#dicom-senders")
            assert "rejected_called_ae" in page.text_content("#dicom-associations")
            page.locator("#card-dicom").screenshot(path=str(tmp_path / "dicom-card.png"))
            assert not errors, errors
        finally:
            browser.close()
