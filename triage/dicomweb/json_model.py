"""The DICOM JSON model (PS3.18 F.2): attributes as ``{"GGGGEEEE": {"vr", "Value"}}``.

Patient and study identifiers are never in the store: QIDO-RS results take them from the
header of one archived instance (:func:`header_attributes`), and WADO-RS metadata is the
archived header itself (:func:`metadata`), with bulk data left out or referenced.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import UID

from triage.telemetry.logs import event

log = logging.getLogger("triage.api")

# What search results carry from the header, by level (the store has none of these).
STUDY_HEADER = ("StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
                "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "StudyID", "StudyDescription")
SERIES_HEADER = ("SeriesDescription", "SeriesDate", "SeriesTime", "BodyPartExamined")

_BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
_PIXEL_DATA = 0x7FE00010
BULK_THRESHOLD = 1024


def tag_key(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def element(keyword: str, *values: Any, vr: str | None = None) -> dict[str, Any]:
    """One attribute: ``{"GGGGEEEE": {"vr": ..., "Value": [...]}}``; no values: empty."""
    vr = vr or dictionary_VR(keyword)
    item: dict[str, Any] = {"vr": vr}
    kept = [v for v in values if v is not None and v != ""]
    if kept:
        item["Value"] = kept
    return {tag_key(keyword): item}


def attributes(pairs: dict[str, Any]) -> dict[str, Any]:
    """Several attributes from ``keyword: value`` (a list for several values; None: omit)."""
    out: dict[str, Any] = {}
    for keyword, value in pairs.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        out.update(element(keyword, *values))
    return out


def resolve_keyword(name: str) -> str | None:
    """A query key as an attribute keyword: ``PatientName`` or ``00100010``; else None."""
    if tag_for_keyword(name) is not None:
        return name
    if len(name) == 8:
        try:
            return keyword_for_tag(int(name, 16)) or None
        except ValueError:
            return None
    return None


def read_header(path: Path) -> Dataset | None:
    """The archived file's header (no pixel data), or None when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - the archive copy was checked at ingest
        event(log, "archive_file_unreadable", logging.ERROR, file=path.name,
              reason_code=type(exc).__name__)
        return None


def header_attributes(header: Dataset | None, keywords: tuple[str, ...]) -> dict[str, Any]:
    """``keywords`` of ``header`` in JSON; those absent (or no header) are left out."""
    if header is None:
        return {}
    picked = Dataset()
    for keyword in keywords:
        if keyword in header:
            picked[keyword] = header[keyword]
    if "SpecificCharacterSet" in header:
        picked.SpecificCharacterSet = header.SpecificCharacterSet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = picked.to_json_dict(suppress_invalid_tags=True)
    result.pop(tag_key("SpecificCharacterSet"), None)  # the JSON is already decoded
    return result


def _strip_bulk(ds: Dataset) -> None:
    """Remove large binary values (overlays, icons, private blobs) in place, nested too."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value or []:
                _strip_bulk(item)
        elif elem.VR in _BINARY_VRS and elem.tag != _PIXEL_DATA:
            value = elem.value
            if value is not None and len(value) > BULK_THRESHOLD:
                del ds[elem.tag]


def metadata(header: Dataset, frames_url: str | None) -> dict[str, Any]:
    """WADO-RS metadata of one instance: its header in JSON, large binary values left
    out; when it holds pixel data, PixelData is a BulkDataURI to its frames
    (``frames_url`` + ``/1,2,...``) rather than the pixels."""
    _strip_bulk(header)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = header.to_json_dict(bulk_data_threshold=BULK_THRESHOLD,
                                     suppress_invalid_tags=True)
    if frames_url and "Rows" in header and "Columns" in header:
        n = _number_of_frames(header)
        syntax = getattr(header, "file_meta", {}).get("TransferSyntaxUID")
        encapsulated = syntax is not None and UID(syntax).is_compressed
        vr = "OB" if encapsulated or int(header.get("BitsAllocated", 16)) <= 8 else "OW"
        result[f"{_PIXEL_DATA:08X}"] = {
            "vr": vr, "BulkDataURI": f"{frames_url}/{','.join(map(str, range(1, n + 1)))}",
        }
    return result


def _number_of_frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1
