"""STOW-RS: what each part of a store request is, and the answer (PS3.18 10.5).

A part is acknowledged once it passed the checks made before any sender is answered
(:func:`triage.ingest.dicom.check_received`: a header that parses, the four required
UIDs, pixel data that can hold the image declared) and
:meth:`~triage.ingest.received.ReceivedStore.accept` made it durable in the ingestion
journal; it is read, archived or quarantined later by the ingest loop like any other
arrival. A part that fails the checks is never stored: it is listed in the
FailedSOPSequence with the C-STORE status it would have had (0xC000, 0xA900).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from triage.dicomweb.json_model import attributes, element, tag_key

# Failure reasons (PS3.18 Table 10.5.3-2 / PS3.4 Annex B status codes).
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # e.g. not of the study named in the request URL
CANNOT_UNDERSTAND = 0xC000


class PartHeader(Protocol):
    """The identifying UIDs of a part as read before it was stored (None: absent)."""

    @property
    def sop_class_uid(self) -> str | None: ...

    @property
    def sop_instance_uid(self) -> str | None: ...

    @property
    def study_uid(self) -> str | None: ...

    @property
    def series_uid(self) -> str | None: ...


@dataclass
class StowResult:
    """What happened to the parts of one request, in order."""

    stored: list[tuple[PartHeader, str | None]]  # header, retrieve URL
    failed: list[tuple[PartHeader | None, int]]  # header (None: unreadable), reason
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
