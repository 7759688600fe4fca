"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against the real server, through dicomweb-client."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from conftest import FAST_ENV, PHI, PHI_STRINGS, DaemonProcess, store_target
from dicomweb_client.api import DICOMwebClient
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid

from triage.api.viewer import viewer_link
from triage.dicomweb.multipart import MultipartParser, encode
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store

MAX_BYTES = 1_000_000
ENV = {
    **FAST_ENV,
    # a STOW request completes its studies at once: nothing may wait for this
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "60",
    "TRIAGE__INGEST__MAX_FILE_BYTES": str(MAX_BYTES),
    "TRIAGE__SCOPE__MODALITIES": "[]", "TRIAGE__SCOPE__BODY_PARTS": "[]",
    "TRIAGE__SCOPE__PHOTOMETRIC": "[]",
}
DX_STUDY = "2.25.91000"
J2K_FILE = "MR_small_jp2klossless.dcm"  # JPEG 2000 lossless: stored and sent as it came
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'


@dataclass
class Server:
    proc: DaemonProcess
    tokens: dict[str, str]
    sent: list[pydicom.Dataset]  # DX instances 1-3, then the JPEG 2000 MR
    response: pydicom.Dataset
    stored_in: float

    def client(self, role: str = "radiologist") -> DICOMwebClient:
        return DICOMwebClient(url=f"{self.proc.url}/dicomweb",
                              headers={"Authorization": f"Bearer {self.tokens[role]}"})

    def http(self, role: str | None = "radiologist") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.proc.url, headers=headers, timeout=30)

    @contextlib.contextmanager
    def db(self) -> Iterator[store.Database]:
        """The daemon's store, read-only, closed at the end of the block."""
        db = store.connect(store_target(self.proc.home), readonly=True)
        try:
            yield db
        finally:
            db.close()


def _token(proc: DaemonProcess, role: str, name: str) -> str:
    return proc.cli("token", "create", "--role", role, "--name", name).stdout.strip().split()[-1]


def _dx(tmp: Path, number: int, series_uid: str) -> pydicom.Dataset:
    pixels = np.random.default_rng(number).integers(0, 4096, (64, 64)).astype(np.uint16)
    ds = image_dataset(pixels, modality="DX", study_uid=DX_STUDY, series_uid=series_uid,
                       patient_name=PHI["name"], patient_id=PHI["id"],
                       accession=PHI["accession"], instance_number=number)
    return pydicom.dcmread(write_dataset(ds, tmp / f"dx{number}.dcm"))


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)  # as dicomweb-client encodes a part
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pydicom_files: Path):
    base = tmp_path_factory.mktemp("dicomweb")
    proc = DaemonProcess(base / "home", ENV, []).start()
    try:
        tokens = {role: _token(proc, role, name) for role, name in (
            ("radiologist", "Dr Web"), ("ops", "Ops"), ("admin", "Admin"),
            ("sender", "CR room 2"))}
        series = generate_uid()
        sent = [*(_dx(base, n, series) for n in (1, 2, 3)),
                pydicom.dcmread(pydicom_files / J2K_FILE)]
        client = DICOMwebClient(url=f"{proc.url}/dicomweb",
                                headers={"Authorization": f"Bearer {tokens['sender']}"})
        started = time.monotonic()
        response = client.store_instances(sent)
        yield Server(proc, tokens, sent, response, started)
    finally:
        proc.stop(signal.SIGKILL)


def _wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _stow_files(server: Server) -> list[tuple]:
    with server.db() as db:
        return db.execute("SELECT state, origin, sender FROM files WHERE origin = 'stow' "
                          "ORDER BY id").fetchall()


def test_stow_stores_durably_and_completes_the_study_at_once(server: Server) -> None:
    referenced = server.response.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in referenced] == [
        ds.SOPInstanceUID for ds in server.sent]
    assert referenced[0].ReferencedSOPClassUID == server.sent[0].SOPClassUID
    assert referenced[0].RetrieveURL.endswith(
        f"/dicomweb/studies/{DX_STUDY}/series/{server.sent[0].SeriesInstanceUID}"
        f"/instances/{server.sent[0].SOPInstanceUID}")
    assert "FailedSOPSequence" not in server.response
    files = _wait(lambda: (f := _stow_files(server)) and all(s[0] == "archived" for s in f)
                  and len(f) >= 4 and f, 20, "the STOW files archived")
    assert files[:4] == [("archived", "stow", "CR room 2")] * 4

    def decided() -> bool:
        with server.db() as db:
            states = dict(db.execute("SELECT study_uid, state FROM studies").fetchall())
        return states.get(DX_STUDY, "open") != "open" and states.get(
            server.sent[3].StudyInstanceUID, "open") != "open"

    _wait(decided, 15, "both studies complete without the 60 s stable age")
    assert time.monotonic() - server.stored_in < 30
    with server.db() as db:
        actions = [r[0] for r in db.execute("SELECT actor || ':' || action FROM audit")]
    assert "CR room 2:dicomweb_store" in actions


def test_qido_finds_the_study_with_counts_and_header_attributes(server: Server) -> None:
    _wait(lambda: len(_stow_files(server)) >= 4 and all(
        s[0] == "archived" for s in _stow_files(server)), 20, "archived")
    client = server.client()
    [study] = client.search_for_studies(search_filters={"StudyInstanceUID": DX_STUDY})
    found = pydicom.Dataset.from_json(study)
    assert found.NumberOfStudyRelatedSeries == 1 and found.NumberOfStudyRelatedInstances == 3
    assert found.ModalitiesInStudy == "DX"
    assert str(found.PatientName) == PHI["name"] and found.AccessionNumber == PHI["accession"]
    assert found.RetrieveURL.endswith(f"/dicomweb/studies/{DX_STUDY}")
    [series] = client.search_for_series(DX_STUDY)
    series = pydicom.Dataset.from_json(series)
    assert series.SeriesInstanceUID == server.sent[0].SeriesInstanceUID
    assert series.Modality == "DX" and series.NumberOfSeriesRelatedInstances == 3
    instances = client.search_for_instances(DX_STUDY, series.SeriesInstanceUID)
    instances = [pydicom.Dataset.from_json(i) for i in instances]
    assert [i.InstanceNumber for i in instances] == [1, 2, 3]
    assert {(i.Rows, i.Columns, i.SOPClassUID) for i in instances} == {
        (64, 64, server.sent[0].SOPClassUID)}
    # matching on what the store holds; paging
    mr = client.search_for_studies(search_filters={"ModalitiesInStudy": "MR"})
    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in mr] == [
        server.sent[3].StudyInstanceUID]
    everything = client.search_for_instances()
    assert len(everything) == 4
    assert len(client.search_for_instances(limit=2, offset=3)) == 1
    assert client.search_for_series(search_filters={"SeriesInstanceUID": "2.25.1"}) == []
    # never a silently wrong answer: filters on patient data are refused
    with server.http() as http:
        refused = http.get("/dicomweb/studies", params={"PatientName": "DOE*"})
        assert refused.status_code == 400
        assert "filtering by PatientName is not supported" in refused.json()["detail"]
        assert http.get("/dicomweb/studies", params={"00100020": "x"}).status_code == 400
        assert http.get("/dicomweb/studies", params={"colour": "x"}).status_code == 400
        # keys with no value are universal matching; includefield is accepted
        assert len(http.get("/dicomweb/studies", params={
            "PatientName": "", "includefield": "all", "limit": "10"}).json()) == 2
        assert http.get(f"/dicomweb/studies/{DX_STUDY}/series/2.25.1/instances").json() == []


def test_wado_returns_the_instances_as_they_were_sent(server: Server) -> None:
    client = server.client()
    retrieved = {ds.SOPInstanceUID: ds for ds in client.retrieve_study(DX_STUDY)}
    assert set(retrieved) == {ds.SOPInstanceUID for ds in server.sent[:3]}
    for sent in server.sent[:3]:
        np.testing.assert_array_equal(retrieved[sent.SOPInstanceUID].pixel_array,
                                      sent.pixel_array)
    j2k = server.sent[3]
    one = client.retrieve_instance(j2k.StudyInstanceUID, j2k.SeriesInstanceUID,
                                   j2k.SOPInstanceUID)
    assert one.file_meta.TransferSyntaxUID == j2k.file_meta.TransferSyntaxUID  # not transcoded
    np.testing.assert_array_equal(one.pixel_array, j2k.pixel_array)
    url = (f"/dicomweb/studies/{j2k.StudyInstanceUID}/series/{j2k.SeriesInstanceUID}"
           f"/instances/{j2k.SOPInstanceUID}")
    with server.http() as http:
        answer = http.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert answer.status_code == 200
        boundary = answer.headers["content-type"].split("boundary=")[1]
        parser = MultipartParser(boundary, 10**8)
        [part] = parser.feed(answer.content)
        assert part.data == _encoded(j2k)  # byte for byte what was sent
        assert part.headers["content-type"] == (
            f"application/dicom; transfer-syntax={j2k.file_meta.TransferSyntaxUID}")
        transcode = http.get(url, headers={
            "Accept": 'multipart/related; type="application/dicom"; '
                      "transfer-syntax=1.2.840.10008.1.2.1"})
        assert transcode.status_code == 406
        either = http.get(url, headers={"Accept": ", ".join(
            f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
            for syntax in ("1.2.840.10008.1.2.1", j2k.file_meta.TransferSyntaxUID))})
        assert either.status_code == 200  # one of the alternatives is as stored
        assert http.get(url, headers={"Accept": "application/dicom+xml"}).status_code == 406
        missing = http.get(f"/dicomweb/studies/{DX_STUDY}/series/2.25.1")
        assert missing.status_code == 404 and missing.json()["detail"] == (
            "no such series in this study")
        assert http.get("/dicomweb/studies/2.25.1").json()["detail"] == "no such study"
        wado_uri = http.get("/dicomweb/wado", params={
            "requestType": "WADO", "studyUID": j2k.StudyInstanceUID,
            "seriesUID": j2k.SeriesInstanceUID, "objectUID": j2k.SOPInstanceUID})
        assert wado_uri.content == _encoded(j2k)
    with server.db() as db:
        actions = {r[0] for r in db.execute("SELECT actor || ':' || action FROM audit")}
    assert "Dr Web:dicomweb_retrieve" in actions


def test_metadata_frames_and_rendered(server: Server) -> None:
    client = server.client()
    metadata = client.retrieve_study_metadata(DX_STUDY)
    assert len(metadata) == 3
    for item in metadata:
        pixel = item["7FE00010"]
        assert "InlineBinary" not in pixel and "Value" not in pixel
        assert "/frames/1" in pixel["BulkDataURI"]
        assert item["00100010"]["Value"] == [{"Alphabetic": PHI["name"]}]
    for sent in (server.sent[0], server.sent[3]):  # uncompressed and JPEG 2000
        [frame] = client.retrieve_instance_frames(
            sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID, [1])
        dtype = np.int16 if sent.PixelRepresentation else np.uint16
        pixels = np.frombuffer(frame, dtype=dtype).reshape(sent.Rows, sent.Columns)
        np.testing.assert_array_equal(pixels, sent.pixel_array)
    dx = server.sent[0]
    png = client.retrieve_instance_rendered(dx.StudyInstanceUID, dx.SeriesInstanceUID,
                                            dx.SOPInstanceUID, media_types=("image/png",))
    assert png.startswith(b"\x89PNG")
    jpeg = client.retrieve_instance_rendered(dx.StudyInstanceUID, dx.SeriesInstanceUID,
                                             dx.SOPInstanceUID, media_types=("image/jpeg",),
                                             params={"window": "2000,4000,linear"})
    assert jpeg.startswith(b"\xff\xd8")
    with server.http() as http:
        base = (f"/dicomweb/studies/{dx.StudyInstanceUID}/series/{dx.SeriesInstanceUID}"
                f"/instances/{dx.SOPInstanceUID}")
        assert http.get(f"{base}/frames/2").status_code == 404
        assert http.get(f"{base}/frames/1/rendered").headers["content-type"] == "image/png"
        ohif = http.get(f"{base}/frames/1", headers={  # what OHIF asks for
            "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
        assert ohif.status_code == 200 and "transfer-syntax=1.2.840.10008.1.2.1" in (
            ohif.headers["content-type"])
        compressed = http.get(f"{base}/frames/1", headers={
            "Accept": 'multipart/related; type="image/jp2"'})
        assert compressed.status_code == 406


def test_roles(server: Server) -> None:
    with server.http(None) as anonymous:
        assert anonymous.get("/dicomweb/studies").status_code == 401
    with server.http("ops") as ops:
        assert ops.get("/dicomweb/studies").status_code == 403
        assert ops.get(f"/dicomweb/studies/{DX_STUDY}/metadata").status_code == 403
    with server.http("sender") as sender:  # a machine that stores, never reads
        assert sender.get("/dicomweb/studies").status_code == 403
        assert sender.get("/api/queue").status_code == 403
    with server.http("admin") as admin:
        assert admin.get("/dicomweb/studies").status_code == 200
    with pytest.raises(requests.HTTPError) as refused:
        server.client("radiologist").store_instances([server.sent[0]])
    assert refused.value.response.status_code == 403


def test_stow_refuses_what_is_not_dicom_and_stores_the_rest(server: Server,
                                                            tmp_path: Path) -> None:
    before = len(_stow_files(server))
    good = _dx(tmp_path, 7, generate_uid())
    body = encode("b0undary", [("application/dicom", _encoded(good)),
                               ("application/dicom", b"this is not DICOM " * 20)])
    with server.http("sender") as http:
        answer = http.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": STOW_TYPE})
        assert answer.status_code == 202
        assert answer.headers["content-type"] == "application/dicom+json"
        result = pydicom.Dataset.from_json(answer.json())
        assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
            good.SOPInstanceUID]
        [failed] = result.FailedSOPSequence
        assert failed.FailureReason == 0xC000
        assert "part 2: not a DICOM file" in answer.headers["warning"]
        # a study-level URL refuses parts of another study
        other = http.post(f"/dicomweb/studies/{DX_STUDY}", content=encode(
            "b0undary", [("application/dicom", _encoded(_dx(tmp_path, 8, generate_uid())))]
        ), headers={"Content-Type": STOW_TYPE})
        assert other.status_code == 200  # _dx instances are of DX_STUDY
        mismatch = http.post("/dicomweb/studies/2.25.1", content=encode(
            "b0undary", [("application/dicom", _encoded(good))]),
            headers={"Content-Type": STOW_TYPE})
        assert mismatch.status_code == 409
        assert pydicom.Dataset.from_json(mismatch.json()).FailedSOPSequence[0].FailureReason \
            == 0xA900
        too_large = http.post("/dicomweb/studies", content=encode(
            "b0undary", [("application/dicom", b"\0" * (MAX_BYTES + 1))]),
            headers={"Content-Type": STOW_TYPE})
        assert too_large.status_code == 413
        assert http.post("/dicomweb/studies", content=b"{}", headers={
            "Content-Type": "application/json"}).status_code == 415
        assert http.post("/dicomweb/studies", content=b"--b0undary\r\nX: y\r\n\r\nabc",
                         headers={"Content-Type": STOW_TYPE}).status_code == 400
    files = _wait(lambda: (f := _stow_files(server)) and len(f) == before + 2 and all(
        s[0] == "archived" for s in f) and f, 20, "the two good parts archived")
    assert len(files) == before + 2  # the non-DICOM part was never stored


def _metric(server: Server, name: str, **labels: str) -> float:
    text = httpx.get(f"{server.proc.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_stow_refuses_a_truncated_part_and_stores_the_good_one(server: Server,
                                                              pydicom_files: Path) -> None:
    """A request with a good part and one whose Pixel Data is shorter than its Rows and
    Columns declare (pydicom's MR_small.dcm cut short): 202, the good one stored, the cut
    one in the FailedSOPSequence under its own UIDs with 0xA900 and the reason in the
    Warning header. It is never stored, so never quarantined: the sender knows to resend.
    A request holding only an instance without a SOP Instance UID stores nothing: 409."""
    study = generate_uid()
    good, cut = (pydicom.dcmread(pydicom_files / name) for name in ("CT_small.dcm",
                                                                   "MR_small.dcm"))
    for ds in (good, cut):
        ds.StudyInstanceUID = study
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = PHI["name"], PHI["id"]
    cut.PixelData = cut.PixelData[:-2000]  # 64 x 64 x 16 bits declared: 8192 bytes
    before = len(_stow_files(server))
    failed_before = _metric(server, "triage_dicomweb_stored_instances_total", result="failed")
    truncated_before = _metric(server, "triage_received_invalid_instances_total",
                               origin="stow", reason="truncated")
    body = encode("b0undary", [("application/dicom", _encoded(good)),
                               ("application/dicom", _encoded(cut))])
    with server.http("sender") as http:
        answer = http.post("/dicomweb/studies", content=body,
                           headers={"Content-Type": STOW_TYPE})
    assert answer.status_code == 202
    result = pydicom.Dataset.from_json(answer.json())
    assert [i.ReferencedSOPInstanceUID for i in result.ReferencedSOPSequence] == [
        good.SOPInstanceUID]
    [failed] = result.FailedSOPSequence
    assert failed.ReferencedSOPInstanceUID == cut.SOPInstanceUID
    assert failed.ReferencedSOPClassUID == cut.SOPClassUID
    assert failed.FailureReason == 0xA900
    assert answer.headers["warning"] == (
        '299 triage "part 2: pixel data holds 6192 of the 8192 bytes declared"')
    files = _wait(lambda: (f := _stow_files(server)) and len(f) == before + 1 and all(
        s[0] not in ("received", "reading", "moving") for s in f) and f, 20,
        "the good part read")
    assert files[-1][0] == "archived" and len(files) == before + 1  # the cut one: no row
    with server.db() as db:
        uids = {row[0] for row in db.execute(
            "SELECT sop_uid FROM instances JOIN studies ON studies.id = instances.study_id "
            "WHERE study_uid = ?", [study])}
        quarantined = db.execute("SELECT COUNT(*) FROM files WHERE origin = 'stow' AND "
                                 "state = 'quarantined'").fetchone()[0]
    assert uids == {good.SOPInstanceUID} and quarantined == 0
    assert _metric(server, "triage_dicomweb_stored_instances_total",
                   result="failed") == failed_before + 1
    assert _metric(server, "triage_received_invalid_instances_total", origin="stow",
                   reason="truncated") == truncated_before + 1
    # no SOP Instance UID in the data set: nothing stored, 409
    no_uid = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    no_uid.StudyInstanceUID = study
    del no_uid.SOPInstanceUID
    with server.http("sender") as http:
        refused = http.post("/dicomweb/studies", content=encode(
            "b0undary", [("application/dicom", _encoded(no_uid))]),
            headers={"Content-Type": STOW_TYPE})
    assert refused.status_code == 409
    [failed] = pydicom.Dataset.from_json(refused.json()).FailedSOPSequence
    assert failed.FailureReason == 0xA900
    assert "it has no SOP Instance UID" in refused.headers["warning"]
    assert len(_stow_files(server)) == before + 1
    lines = [line for line in server.proc.log.read_text(errors="replace").splitlines()
             if "dicomweb_part_refused" in line]
    logged = [json.loads(line) for line in lines[-2:]]
    assert [(e["part"], e["status"], e["reason_code"], e["sender"]) for e in logged] == [
        (2, "0xA900", "truncated", "CR room 2"), (1, "0xA900", "missing_uid", "CR room 2")]
    assert not any(secret in line for line in lines for secret in PHI_STRINGS)


def test_a_quarantined_file_is_invisible(server: Server, tmp_path: Path) -> None:
    cut = _dx(tmp_path, 9, generate_uid())
    data = (tmp_path / "dx9.dcm").read_bytes()
    (server.proc.inbox / "cut.dcm").write_bytes(data[:-500])  # pixel data cut short

    def quarantined() -> bool:
        with server.db() as db:
            return db.execute("SELECT COUNT(*) FROM files WHERE state = 'quarantined'"
                              ).fetchone()[0] >= 1

    _wait(quarantined, 20, "the truncated file quarantined")
    client = server.client()
    assert client.search_for_instances(
        search_filters={"SOPInstanceUID": cut.SOPInstanceUID}) == []
    visible = [pydicom.Dataset.from_json(i).SOPInstanceUID
               for i in client.search_for_instances(DX_STUDY)]
    assert len(visible) >= 3 and cut.SOPInstanceUID not in visible
    with server.http() as http:
        gone = http.get(f"/dicomweb/studies/{DX_STUDY}/series/{cut.SeriesInstanceUID}"
                        f"/instances/{cut.SOPInstanceUID}/metadata")
        assert gone.status_code == 404


def test_viewer_link_of_a_study(server: Server) -> None:
    with server.db() as db:
        study_id = db.execute("SELECT id FROM studies WHERE study_uid = ?",
                              [DX_STUDY]).fetchone()[0]
    with server.http() as http:
        link = http.get(f"/api/studies/{study_id}/viewer").json()
    assert link["study_uid"] == DX_STUDY
    assert link["dicomweb_url"] == f"{server.proc.url}/dicomweb/studies/{DX_STUDY}"
    assert link["viewer_url"] is None  # review.viewer_url is not set
    with server.http("ops") as ops:
        assert ops.get(f"/api/studies/{study_id}/viewer").status_code == 403
    template = "https://ohif.example/viewer?StudyInstanceUIDs={study_uid}&url={dicomweb}"
    assert viewer_link(template, "1.2.3", "https://t/dicomweb") == (
        "https://ohif.example/viewer?StudyInstanceUIDs=1.2.3&url=https://t/dicomweb")
    assert viewer_link("javascript:alert(1)//{study_uid}", "1.2.3", "x") is None
    assert viewer_link(None, "1.2.3", "x") is None


def test_multipart_parser_takes_any_chunking() -> None:
    parts = [b"", b"a" * 10, bytes(range(256)) * 40, b"\r\n--b0undar"]
    body = encode("b0undary", [("application/dicom", p) for p in parts])
    for size in (1, 2, 7, 100, len(body)):
        parser = MultipartParser("b0undary", 5000)
        got = []
        for start in range(0, len(body), size):
            got += parser.feed(body[start:start + size])
        parser.close()
        assert [p.data for p in got] == [parts[0], parts[1], None, parts[3]]
        assert got[2].size == len(parts[2])
