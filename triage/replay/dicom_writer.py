"""Write valid DICOM instances from pixel arrays (benchmarks, tests, and replay).

Every instance gets fresh UIDs under pydicom's UID root unless given, a proper file meta
header and the attributes a viewer needs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "DX": DX_IMAGE_STORAGE, "OT": SecondaryCaptureImageStorage}


def image_dataset(
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    patient_name: str = "ANONYMOUS",
    patient_id: str = "0",
    accession: str = "",
    pixel_spacing: float = 1.0,
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] = (1.0, 0.0),
    photometric: str = "MONOCHROME2",
    instance_number: int = 1,
) -> Dataset:
    """A single-frame greyscale image instance.

    Args:
        pixels: uint8, uint16 or int16 array [rows, cols].
        modality: ``CT``, ``DX`` or ``OT`` (SOP class follows).
        window: DICOM VOI window (centre, width), or None to leave it out.
        rescale: (slope, intercept) for the modality LUT.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError("pixels must be a 2-D uint8, uint16 or int16 array")
    sop_class = _SOP_CLASS.get(modality, SecondaryCaptureImageStorage)
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = dt.datetime.now()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = modality
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceNumber = instance_number
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (preamble, 'DICM', meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
