"""DICOMweb (PS3.18) under ``/dicomweb``: the subset OHIF and Weasis use.

QIDO-RS searches and WADO-RS retrieval (instances as stored, metadata, uncompressed
frames, rendered PNG/JPEG; WADO-URI for viewers configured with ``wadoUriRoot``) carry
patient data: roles radiologist and admin. STOW-RS stores instances through the same
durable journal as the DICOM receiver: roles sender and admin. Tokens, roles and the
failed-token throttle are those of the rest of the API.

Reads are audited once per request (a search, a retrieve or metadata request), not per
frame or rendered image: a viewer fetches those by the hundred for a study whose
metadata request is already on record.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from PIL import Image
from pydicom.filereader import read_file_meta_info
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from triage.api.deps import DbDep, Reader, Sender, SettingsDep, client_address
from triage.api.images import _cache, render_png
from triage.dicomweb import multipart
from triage.dicomweb.frames import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    FrameError,
    frame_bytes,
    parse_frame_list,
)
from triage.dicomweb.json_model import metadata, read_header
from triage.dicomweb.search import QueryError, parse_query, run
from triage.dicomweb.stow import (
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    StowResult,
    response,
)
from triage.ingest.dicom import InstanceRefused, ReceivedHeader, check_received
from triage.ingest.received import StoreFailed
from triage.review import audit
from triage.review.auth import Principal
from triage.store.db import transaction
from triage.store.images import INSTANCE_ORDER
from triage.telemetry.logs import event

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
stow_router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])  # the `receiver` role's
log = logging.getLogger("triage.api")

DICOM_JSON = "application/dicom+json"
_CHUNK = 1024 * 1024
_NOT_FOUND = {"study": "no such study", "series": "no such series in this study",
              "instance": "no such instance in this series"}


def dicomweb_root(request: Request) -> str:
    """This server's DICOMweb root URL as the client reached it."""
    return str(request.base_url).rstrip("/") + router.prefix


class _OtherStudy(Exception):
    """A STOW-RS part of a study other than the one the request URL names."""


def _retrieve_url(root: str):  # type: ignore[no-untyped-def]
    def url(study: str, series: str | None = None, instance: str | None = None) -> str:
        out = f"{root}/studies/{study}"
        if series:
            out += f"/series/{series}"
            if instance:
                out += f"/instances/{instance}"
        return out
    return url


def _audit(db: Any, who: Principal, request: Request, action: str,
           study_id: int | None = None, **detail: Any) -> None:
    with transaction(db):
        audit.record(db, actor=who.name, role=who.role, action=action, study_id=study_id,
                     address=client_address(request), detail=detail or None)


# --- QIDO-RS ----------------------------------------------------------------------


def _accepts_json(request: Request) -> None:
    wanted = multipart.parse_accept(request.headers.get("accept"))
    if not any(m.matches(DICOM_JSON) or m.matches("application/json") for m in wanted):
        raise HTTPException(406, "this server answers in application/dicom+json only")


def _search(level: str, request: Request, who: Principal, db: Any, settings: Any,
            study: str | None = None, series: str | None = None) -> Response:
    _accepts_json(request)
    try:
        query = parse_query(level, list(request.query_params.multi_items()),
                            study_uid=study, series_uid=series)
    except QueryError as exc:
        raise HTTPException(400, str(exc)) from None
    results, more = run(db, query, settings.home, _retrieve_url(dicomweb_root(request)))
    _audit(db, who, request, "dicomweb_search", level=level, results=len(results))
    headers = {}
    if more and not query.limited:
        headers["Warning"] = (f'299 triage "there are more than {query.limit} results: '
                              'page with limit and offset"')
    return JSONResponse(results, media_type=DICOM_JSON, headers=headers)


@router.get("/studies", summary="QIDO-RS: search for studies")
def search_studies(request: Request, who: Reader, db: DbDep, settings: SettingsDep) -> Response:
    return _search("study", request, who, db, settings)


@router.get("/series", summary="QIDO-RS: search for series")
def search_all_series(request: Request, who: Reader, db: DbDep,
                      settings: SettingsDep) -> Response:
    return _search("series", request, who, db, settings)


@router.get("/instances", summary="QIDO-RS: search for instances")
def search_all_instances(request: Request, who: Reader, db: DbDep,
                         settings: SettingsDep) -> Response:
    return _search("instance", request, who, db, settings)


@router.get("/studies/{study}/series", summary="QIDO-RS: search for series of a study")
def search_series(study: str, request: Request, who: Reader, db: DbDep,
                  settings: SettingsDep) -> Response:
    return _search("series", request, who, db, settings, study=study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search for instances of a study")
def search_study_instances(study: str, request: Request, who: Reader, db: DbDep,
                           settings: SettingsDep) -> Response:
    return _search("instance", request, who, db, settings, study=study)


@router.get("/studies/{study}/series/{series}/instances",
            summary="QIDO-RS: search for instances of a series")
def search_series_instances(study: str, series: str, request: Request, who: Reader,
                            db: DbDep, settings: SettingsDep) -> Response:
    return _search("instance", request, who, db, settings, study=study, series=series)


# --- WADO-RS ----------------------------------------------------------------------


_INSTANCE_COLUMNS = ", ".join(f"instances.{c}" for c in (
    "id", "study_id", "sop_uid", "series_uid", "sop_class_uid", "rows", "frames", "path"))


def _instances(db: Any, study: str, series: str | None = None,
               instance: str | None = None) -> list[dict[str, Any]]:
    """The archived instances of a study / series / one instance; 404 when none."""
    where, args = ["s.study_uid = ?"], [study]
    if series is not None:
        where.append("instances.series_uid = ?")
        args.append(series)
    if instance is not None:
        where.append("instances.sop_uid = ?")
        args.append(instance)
    rows = list(db.query(
        f"SELECT {_INSTANCE_COLUMNS} FROM instances "
        "JOIN studies s ON s.id = instances.study_id "
        f"WHERE instances.series_uid IS NOT NULL AND {' AND '.join(where)} "
        f"ORDER BY {INSTANCE_ORDER}", args))
    if not rows:
        level = "instance" if instance else "series" if series else "study"
        if level != "study" and not db.execute(
                "SELECT 1 FROM studies WHERE study_uid = ?", [study]).fetchone():
            level = "study"
        raise HTTPException(404, _NOT_FOUND[level])
    return rows


def _unreadable(path: Path, reason: str) -> HTTPException:
    event(log, "archive_file_unreadable", logging.ERROR, file=path.name, reason_code=reason)
    return HTTPException(500, f"the archived file of an instance cannot be read ({reason})")


def _transfer_syntax(path: Path) -> str | None:
    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID") or "") or None
    except FileNotFoundError:
        raise _unreadable(path, "missing") from None
    except Exception:  # noqa: BLE001 - no file meta: served as stored, type unnamed
        return None


def _wanted_syntaxes(request: Request) -> set[str] | None:
    """The transfer syntaxes the client accepts instances in: None for any (no
    ``transfer-syntax`` parameter, or ``*``); 406 when it accepts no application/dicom."""
    wanted: set[str] = set()
    acceptable = False
    for media in multipart.parse_accept(request.headers.get("accept")):
        inner = media.params.get("type", "application/dicom").lower()
        if media.type in ("*/*", "multipart/*", "multipart/related", "application/dicom") and (
                media.type not in ("multipart/related", "multipart/*") or inner in (
                    "application/dicom", "*/*", "application/*")):
            acceptable = True
            syntax = media.params.get("transfer-syntax")
            if syntax in (None, "*"):
                return None
            wanted.add(syntax)
    if not acceptable:
        raise HTTPException(406, 'this server sends instances as multipart/related; '
                                 'type="application/dicom"')
    return wanted


def _stream_instances(request: Request, rows: list[dict[str, Any]], home: Path) -> Response:
    wanted = _wanted_syntaxes(request)
    paths = [home / row["path"] for row in rows]
    syntaxes = [_transfer_syntax(path) for path in paths]
    if wanted is not None and any(s not in wanted for s in syntaxes):
        raise HTTPException(
            406, "instances are sent in the transfer syntax they were stored in and "
                 "the one asked for would need transcoding, which this server does not "
                 "do: ask for transfer-syntax=*")
    boundary = multipart.new_boundary()

    def body() -> Iterator[bytes]:
        for index, (path, syntax) in enumerate(zip(paths, syntaxes, strict=True)):
            kind = f"application/dicom; transfer-syntax={syntax}" if syntax else (
                "application/dicom")
            yield multipart.part_head(boundary, kind, first=index == 0)
            try:
                with open(path, "rb") as handle:
                    while chunk := handle.read(_CHUNK):
                        yield chunk
            except OSError:
                # the status line is gone: end the body short, which the client sees
                event(log, "archive_file_unreadable", logging.ERROR, file=path.name,
                      reason_code="unreadable")
                return
        yield multipart.closing(boundary)

    for path in paths:
        if not path.is_file():
            raise _unreadable(path, "missing")
    return StreamingResponse(
        body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study's instances")
def retrieve_study(study: str, request: Request, who: Reader, db: DbDep,
                   settings: SettingsDep) -> Response:
    rows = _instances(db, study)
    answer = _stream_instances(request, rows, settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="study")
    return answer


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(study: str, series: str, request: Request, who: Reader, db: DbDep,
                    settings: SettingsDep) -> Response:
    rows = _instances(db, study, series)
    answer = _stream_instances(request, rows, settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="series")
    return answer


@router.get("/studies/{study}/series/{series}/instances/{instance}",
            summary="WADO-RS: retrieve an instance")
def retrieve_instance(study: str, series: str, instance: str, request: Request,
                      who: Reader, db: DbDep, settings: SettingsDep) -> Response:
    rows = _instances(db, study, series, instance)
    answer = _stream_instances(request, rows, settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="instance")
    return answer


def _stream_metadata(request: Request, rows: list[dict[str, Any]], home: Path) -> Response:
    _accepts_json(request)
    url = _retrieve_url(dicomweb_root(request))

    def body() -> Iterator[bytes]:
        yield b"["
        for index, row in enumerate(rows):
            header = read_header(home / row["path"])
            frames = url(row["study_uid"], row["series_uid"], row["sop_uid"]) + "/frames"
            item = metadata(header, frames if row["rows"] else None) if header else {
                # unreadable now: what the store knows, rather than a hole in the list
                "0020000D": {"vr": "UI", "Value": [row["study_uid"]]},
                "0020000E": {"vr": "UI", "Value": [row["series_uid"]]},
                "00080018": {"vr": "UI", "Value": [row["sop_uid"]]},
            }
            yield (b"," if index else b"") + json.dumps(item).encode()
        yield b"]"

    return StreamingResponse(body(), media_type=DICOM_JSON)


def _with_study_uid(rows: list[dict[str, Any]], study: str) -> list[dict[str, Any]]:
    return [{**row, "study_uid": study} for row in rows]


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study's instances")
def study_metadata(study: str, request: Request, who: Reader, db: DbDep,
                   settings: SettingsDep) -> Response:
    rows = _instances(db, study)
    answer = _stream_metadata(request, _with_study_uid(rows, study), settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="study",
           metadata=True)
    return answer


@router.get("/studies/{study}/series/{series}/metadata",
            summary="WADO-RS: metadata of a series' instances")
def series_metadata(study: str, series: str, request: Request, who: Reader, db: DbDep,
                    settings: SettingsDep) -> Response:
    rows = _instances(db, study, series)
    answer = _stream_metadata(request, _with_study_uid(rows, study), settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="series",
           metadata=True)
    return answer


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata",
            summary="WADO-RS: metadata of an instance")
def instance_metadata(study: str, series: str, instance: str, request: Request,
                      who: Reader, db: DbDep, settings: SettingsDep) -> Response:
    rows = _instances(db, study, series, instance)
    answer = _stream_metadata(request, _with_study_uid(rows, study), settings.home)
    _audit(db, who, request, "dicomweb_retrieve", rows[0]["study_id"], level="instance",
           metadata=True)
    return answer


def _accepts_octet_stream(request: Request) -> None:
    for media in multipart.parse_accept(request.headers.get("accept")):
        inner = media.params.get("type", "application/octet-stream").lower()
        syntax = media.params.get("transfer-syntax", "*")
        if syntax not in ("*", EXPLICIT_VR_LITTLE_ENDIAN):
            continue
        if media.type in ("*/*", "application/octet-stream", "application/*") or (
                media.type in ("multipart/related", "multipart/*")
                and inner in ("application/octet-stream", "*/*", "application/*")):
            return
    raise HTTPException(406, "frames are sent uncompressed only: multipart/related; "
                             'type="application/octet-stream"; '
                             f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}")


def _image_row(db: Any, study: str, series: str, instance: str) -> dict[str, Any]:
    row = _instances(db, study, series, instance)[0]
    if not row["rows"]:
        raise HTTPException(404, "this instance holds no image")
    return row


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
            summary="WADO-RS: frames (1-based, comma-separated), uncompressed")
def retrieve_frames(study: str, series: str, instance: str, frames: str, request: Request,
                    who: Reader, db: DbDep, settings: SettingsDep) -> Response:
    _accepts_octet_stream(request)
    row = _image_row(db, study, series, instance)
    path = settings.home / row["path"]
    try:
        numbers = parse_frame_list(frames, row["frames"] or None)
    except FrameError as exc:
        raise HTTPException(400 if "integers" in str(exc) else 404, str(exc)) from None
    first = _decode_frame(path, numbers[0])
    boundary = multipart.new_boundary()
    kind = f"application/octet-stream; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}"

    def body() -> Iterator[bytes]:
        for index, number in enumerate(numbers):
            location = f"{request.url.path.rsplit('/', 1)[0]}/{number}"
            yield multipart.part_head(boundary, kind, first=index == 0, location=location)
            yield first if index == 0 else _decode_frame(path, number)
        yield multipart.closing(boundary)

    return StreamingResponse(body(), media_type=(
        'multipart/related; type="application/octet-stream"; '
        f"transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}; boundary={boundary}"))


def _decode_frame(path: Path, number: int) -> bytes:
    try:
        return frame_bytes(path, number)
    except FileNotFoundError:
        raise _unreadable(path, "missing") from None
    except IndexError:
        raise HTTPException(404, f"this instance has no frame {number}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder failure: name its type only
        raise _unreadable(path, type(exc).__name__) from None


def _rendered_kind(request: Request) -> str:
    for media in multipart.parse_accept(request.headers.get("accept")):
        for kind in ("image/png", "image/jpeg"):
            if media.matches(kind):
                return kind
    raise HTTPException(406, "rendered images are image/png or image/jpeg")


def _rendered(request: Request, kind: str, row: dict[str, Any], frame: int, settings: Any,
              window: tuple[float, float] | None, quality: int) -> Response:
    """One frame as 8-bit PNG or JPEG, windowed as in the review view
    (:func:`triage.api.images.render_png`)."""
    image = _cache(request).get(settings.home / row["path"], settings,
                                settings.review.image_cache_instances)
    if not 1 <= frame <= image.frames.shape[0]:
        raise HTTPException(404, f"this instance has no frame {frame}")
    data = render_png(image, frame - 1, window)
    if kind == "image/jpeg":
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=quality)
        data = buffer.getvalue()
    return Response(data, media_type=kind, headers={"Cache-Control": "private, max-age=300"})


def _window(value: str | None) -> tuple[float, float] | None:
    """``window=centre,width[,function]`` (PS3.18 8.3.5.1.4); only linear is done."""
    if not value:
        return None
    parts = value.split(",")
    try:
        centre, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise HTTPException(400, "window must be centre,width[,linear]") from None
    if width <= 0 or (len(parts) > 2 and parts[2].strip().lower() not in ("linear", "")):
        raise HTTPException(400, "window must be centre,width[,linear] with width > 0")
    return centre, width


_WindowParam = Annotated[str | None, Query(description="centre,width[,linear]")]
_QualityParam = Annotated[int, Query(ge=1, le=100, description="JPEG quality")]


@router.get("/studies/{study}/series/{series}/instances/{instance}/rendered",
            response_class=Response, summary="WADO-RS: an instance's first frame, rendered")
def instance_rendered(study: str, series: str, instance: str, request: Request,
                      who: Reader, db: DbDep, settings: SettingsDep,
                      window: _WindowParam = None, quality: _QualityParam = 90) -> Response:
    kind = _rendered_kind(request)
    row = _image_row(db, study, series, instance)
    return _rendered(request, kind, row, 1, settings, _window(window), quality)


@router.get("/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
            response_class=Response, summary="WADO-RS: one frame, rendered")
def frame_rendered(study: str, series: str, instance: str, frame: int, request: Request,
                   who: Reader, db: DbDep, settings: SettingsDep,
                   window: _WindowParam = None, quality: _QualityParam = 90) -> Response:
    kind = _rendered_kind(request)
    row = _image_row(db, study, series, instance)
    return _rendered(request, kind, row, frame, settings, _window(window), quality)


# --- WADO-URI (PS3.18 chapter 9), for viewers configured with a wadoUriRoot -----------


@router.get("/wado", response_class=Response, summary="WADO-URI: one instance")
def wado_uri(
    request: Request, who: Reader, db: DbDep, settings: SettingsDep,
    request_type: Annotated[str, Query(alias="requestType")],
    study: Annotated[str, Query(alias="studyUID")],
    series: Annotated[str, Query(alias="seriesUID")],
    instance: Annotated[str, Query(alias="objectUID")],
    content_type: Annotated[str, Query(alias="contentType")] = "application/dicom",
    frame: Annotated[int, Query(alias="frameNumber")] = 1,
    centre: Annotated[float | None, Query(alias="windowCenter")] = None,
    width: Annotated[float | None, Query(alias="windowWidth", gt=0)] = None,
) -> Response:
    if request_type != "WADO":
        raise HTTPException(400, "requestType must be WADO")
    row = _instances(db, study, series, instance)[0]
    kind = content_type.split(",")[0].strip().lower()
    if kind in ("application/dicom", "*/*"):
        _audit(db, who, request, "dicomweb_retrieve", row["study_id"], level="instance")
        path = settings.home / row["path"]
        if not path.is_file():
            raise _unreadable(path, "missing")
        return FileResponse(path, media_type="application/dicom")
    if kind not in ("image/jpeg", "image/png"):
        raise HTTPException(406, "contentType must be application/dicom, image/jpeg or "
                                 "image/png")
    if not row["rows"]:
        raise HTTPException(404, "this instance holds no image")
    window = (centre, width) if centre is not None and width is not None else None
    return _rendered(request, kind, row, frame, settings, window, 90)


# --- STOW-RS ----------------------------------------------------------------------


@stow_router.post("/studies", summary="STOW-RS: store instances (multipart/related; "
             'type="application/dicom")')
async def store_instances(request: Request, who: Sender, db: DbDep,
                          settings: SettingsDep) -> Response:
    return await _store(request, who, db, settings, None)


@stow_router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def store_study_instances(study: str, request: Request, who: Sender, db: DbDep,
                                settings: SettingsDep) -> Response:
    return await _store(request, who, db, settings, study)


def _stow_boundary(request: Request) -> str:
    content_type = multipart.parse_media_type(request.headers.get("content-type", ""))
    inner = content_type.params.get("type", "application/dicom").lower()
    if content_type.type != "multipart/related" or inner != "application/dicom":
        raise HTTPException(415, 'send instances as multipart/related; '
                                 'type="application/dicom" (one instance per part)')
    boundary = content_type.params.get("boundary")
    if not boundary:
        raise HTTPException(400, "the multipart content type has no boundary")
    return boundary


async def _store(request: Request, who: Principal, db: Any, settings: Any,
                 study: str | None) -> Response:
    boundary = _stow_boundary(request)
    daemon = request.app.state.daemon
    root = dicomweb_root(request)
    url = _retrieve_url(root)
    result = StowResult(stored=[], failed=[], notes=[])
    file_ids: list[int] = []
    parser = multipart.MultipartParser(boundary, settings.ingest.max_file_bytes)
    count = 0

    def store(part: multipart.Part, number: int) -> None:
        if part.data is None:
            result.failed.append((None, OUT_OF_RESOURCES))
            result.too_large += 1
            result.notes.append(f"part {number}: {part.size} bytes is larger than "
                                f"ingest.max_file_bytes ({settings.ingest.max_file_bytes})")
            return
        checked: list[ReceivedHeader] = []

        def check(data: bytes) -> None:  # beside the write, in accept
            header = check_received(data)
            checked.append(header)
            if study is not None and header.study_uid != study:
                raise _OtherStudy

        try:
            file_ids.append(daemon.received.accept(part.data, origin="stow", sender=who.name,
                                                   check=check))
        except InstanceRefused as exc:
            # never stored, so never quarantined: the sender learns it here, with why
            result.failed.append((exc.header, exc.status))
            result.notes.append(f"part {number}: {exc.reason}")
            daemon.metrics.received_invalid.labels(origin="stow", reason=exc.code).inc()
            event(log, "dicomweb_part_refused", logging.WARNING, part=number,
                  status=f"0x{exc.status:04X}", reason_code=exc.code, reason=exc.reason,
                  sender=who.name)
            return
        except _OtherStudy:
            result.failed.append((checked[0], DOES_NOT_MATCH))
            result.notes.append(f"part {number} is not of the study in the request URL")
            return
        except StoreFailed as exc:
            result.failed.append(
                (checked[0] if checked else None,
                 OUT_OF_RESOURCES if exc.out_of_resources else PROCESSING_FAILURE))
            result.notes.append(f"part {number}: {exc.reason}")
            return
        header = checked[0]
        located = header.study_uid and header.series_uid
        result.stored.append((header, url(header.study_uid, header.series_uid,
                                          header.sop_instance_uid) if located else None))

    malformed = None
    try:
        async for chunk in request.stream():
            for part in parser.feed(chunk):
                count += 1
                await run_in_threadpool(store, part, count)
        parser.close()
    except multipart.MultipartError as exc:
        malformed = str(exc)
    except ClientDisconnect:
        malformed = "the client went away"
    finally:
        # one request is one complete transfer: its studies need not wait to go quiet
        daemon.association_ended(file_ids)
        _count_stored(daemon, result)
    if malformed is not None and not result.stored:
        raise HTTPException(400, f"the multipart body is malformed: {malformed}")
    if count == 0:
        raise HTTPException(400, "the request holds no instance")
    if malformed is not None:
        result.notes.append(f"the body was cut short after part {count}: {malformed}")
    await run_in_threadpool(_audit, db, who, request, "dicomweb_store",
                            stored=len(result.stored), failed=len(result.failed))
    event(log, "dicomweb_stored", stored=len(result.stored), failed=len(result.failed))
    status = 202 if malformed is not None and result.status_code == 200 else result.status_code
    headers = {}
    if result.notes:
        text = "; ".join(result.notes)[:1000].replace('"', "'")
        headers["Warning"] = f'299 triage "{text}"'
    body = response(result, url(study) if study else None)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _count_stored(daemon: Any, result: StowResult) -> None:
    counter = daemon.metrics.dicomweb_stored
    if result.stored:
        counter.labels("success").inc(len(result.stored))
    if result.failed:
        counter.labels("failed").inc(len(result.failed))
