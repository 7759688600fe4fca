"""STOW-RS: what each part of a store request is, and the answer (PS3.18 10.5).

A part is acknowledged once :meth:`~triage.ingest.received.ReceivedStore.accept` made it
durable in the ingestion journal; it is read, archived or quarantined later by the
ingest loop like any other arrival. Its UIDs for the answer come from parsing its header
here; a part that is not DICOM at all is refused and never stored.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from triage.dicomweb.json_model import attributes, element, tag_key

# Failure reasons (PS3.18 Table 10.5.3-2 / PS3.4 Annex B status codes).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # e.g. not of the study named in the request URL
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class PartHeader:
    sop_class_uid: str | None
    sop_instance_uid: str
    study_uid: str | None
    series_uid: str | None


def read_part_header(data: bytes) -> PartHeader | None:
    """The identifying UIDs of a part, or None when it is not a DICOM instance."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except InvalidDicomError:
            try:  # no preamble and 'DICM': still DICOM if it names an instance
                ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
            except Exception:  # noqa: BLE001 - any failure means "not DICOM"
                return None
        except Exception:  # noqa: BLE001
            return None
        meta = getattr(ds, "file_meta", None) or {}
        try:
            sop_uid = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
            sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
            study, series = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
        except Exception:  # noqa: BLE001 - a value that cannot be decoded
            return None
    if not sop_uid:
        return None
    return PartHeader(_text(sop_class), str(sop_uid), _text(study), _text(series))


def _text(value: object) -> str | None:
    return str(value) if value else None


@dataclass
class StowResult:
    """What happened to the parts of one request, in order."""

    stored: list[tuple[PartHeader, str | None]]  # header, retrieve URL
    failed: list[tuple[PartHeader | None, int]]  # header (None: not DICOM), reason
    notes: list[str]  # why parts failed, in words (no patient data), for a Warning header
    too_large: int = 0  # parts refused for exceeding ingest.max_file_bytes

    @property
    def status_code(self) -> int:
        """200 all stored, 202 some, 409 none; 413 when every part was too large."""
        if not self.failed:
            return 200
        if self.stored:
            return 202
        return 413 if self.too_large == len(self.failed) else 409


def response(result: StowResult, study_url: str | None) -> dict[str, Any]:
    """The store response dataset (DICOM JSON)."""
    out: dict[str, Any] = {}
    if study_url:
        out.update(element("RetrieveURL", study_url))
    if result.stored:
        out[tag_key("ReferencedSOPSequence")] = {"vr": "SQ", "Value": [
            attributes({"ReferencedSOPClassUID": header.sop_class_uid,
                        "ReferencedSOPInstanceUID": header.sop_instance_uid,
                        "RetrieveURL": url})
            for header, url in result.stored
        ]}
    if result.failed:
        out[tag_key("FailedSOPSequence")] = {"vr": "SQ", "Value": [
            {**element("ReferencedSOPClassUID", header.sop_class_uid if header else None),
             **element("ReferencedSOPInstanceUID", header.sop_instance_uid if header else None),
             **element("FailureReason", reason)}
            for header, reason in result.failed
        ]}
    return out
