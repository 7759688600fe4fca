"""Keep protected health information out of logs, metrics and error messages.

Library messages (pydicom's, mostly) can quote element values. Before such a message is
written anywhere, :func:`redact` replaces every identifying value found in the dataset.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

# Identifying attributes, after DICOM PS3.15 Annex E (basic profile), the ones that carry
# text a person could be recognised by.
PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientMotherBirthName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "IssuerOfPatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AcquisitionDate",
    "ContentDate",
    "SeriesDate",
    "DeviceSerialNumber",
    "RequestingPhysician",
)

REDACTED = "[redacted]"


def phi_values(ds: Dataset | None) -> list[str]:
    """Identifying strings in ``ds`` (top level), longest first; empty for None."""
    if ds is None:
        return []
    found: set[str] = set()
    for keyword in PHI_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # noqa: BLE001 - a malformed value is still not to be printed
            continue
        if value is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        for item in items:
            text = str(item).strip()
            if len(text) >= 2:
                found.add(text)
                found.update(part for part in text.replace("^", " ").split() if len(part) >= 3)
    return sorted(found, key=len, reverse=True)


def redact(text: str, values: list[str]) -> str:
    """Replace each of ``values`` in ``text`` with a marker."""
    for value in values:
        text = text.replace(value, REDACTED)
    return text
