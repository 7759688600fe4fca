"""What the reader makes of pydicom's deliberately odd files, and of our own bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PHI_STRINGS, make_image

from triage.config import IngestSettings
from triage.errors import DicomRejected
from triage.ingest.dicom import read_instance
from triage.ingest.preprocess import preprocess
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store.images import from_storage, to_storage

SETTINGS = IngestSettings()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("CT_small.dcm", "image"),
        ("MR_small_RLE.dcm", "image"),             # RLE, built in
        ("MR_small_jpeg_ls_lossless.dcm", "image"),  # JPEG-LS via pylibjpeg-libjpeg
        ("MR_small_jp2klossless.dcm", "image"),    # JPEG 2000 via pylibjpeg-openjpeg
        ("JPGExtended.dcm", "image"),              # 12-bit JPEG via libjpeg
        ("SC_rgb_jpeg_dcmtk.dcm", "image"),        # YBR JPEG colour
        ("examples_palette.dcm", "image"),         # palette colour
        ("ExplVR_BigEnd.dcm", "image"),
        ("rtplan.dcm", "unsupported"),
        ("test-SR.dcm", "unsupported"),
        ("waveform_ecg.dcm", "unsupported"),
        ("rtdose.dcm", "unsupported"),             # modality not scored
        ("dicomdirtests/DICOMDIR", "unsupported"),
        ("MR_truncated.dcm", "truncated"),
        ("README.txt", "not_dicom"),
        ("zipMR.gz", "not_dicom"),
        ("nested_priv_SQ.dcm", "missing_uid"),
        ("JPEG-lossy.dcm", "decode_failed"),
    ],
)
def test_pydicom_corpus_outcomes(pydicom_files: Path, name: str, expected: str) -> None:
    data = (pydicom_files / name).read_bytes()
    if expected in ("image", "unsupported"):
        instance = read_instance(data, SETTINGS)
        assert instance.scoreable == (expected == "image")
        assert instance.sop_uid
        if expected == "unsupported":
            assert instance.unsupported_reason
    else:
        with pytest.raises(DicomRejected) as caught:
            read_instance(data, SETTINGS)
        assert caught.value.code == expected and caught.value.reason


def test_multiframe_colour_becomes_grey_frames(pydicom_files: Path) -> None:
    instance = read_instance((pydicom_files / "examples_ybr_color.dcm").read_bytes(), SETTINGS)
    assert instance.image is not None and instance.image.frames.shape == (30, 240, 320)
    tensor = preprocess(instance.image, 32)
    assert tensor.shape == (30, 32, 32) and 0 <= float(tensor.min()) <= float(tensor.max()) <= 1


def test_window_rescale_and_monochrome1(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(0, 200, dtype=np.uint16), (100, 1))  # 100 rows x 200 cols
    ds = image_dataset(ramp, rescale=(2.0, -100.0), window=(100.0, 200.0))
    instance = read_instance(write_dataset(ds, tmp_path / "a.dcm").read_bytes(), SETTINGS)
    assert instance.image.window == (100.0, 200.0)
    assert instance.image.frames.min() == -100 and instance.image.frames.max() == 298
    tensor = preprocess(instance.image, 64)
    # aspect ratio kept: 200x100 becomes 64x32 centred, zero padded above and below
    assert tensor.shape == (1, 64, 64)
    assert float(tensor[0, :15].abs().sum()) == 0 and float(tensor[0, 49:].abs().sum()) == 0
    row = tensor[0, 32]
    assert float(row[0]) == 0.0 and float(row[-1]) == 1.0  # -100 below, 298 above the window
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = read_instance(write_dataset(ds, tmp_path / "b.dcm").read_bytes(), SETTINGS)
    flipped = preprocess(inverted.image, 64)
    assert float(flipped[0, 32, 0]) == 1.0 and float(flipped[0, 32, -1]) == 0.0


def test_percentile_window_when_the_file_has_none(tmp_path: Path) -> None:
    pixels = np.full((64, 64), 100, dtype=np.int16)
    pixels[0, 0] = 30000  # one hot pixel must not squash the contrast
    pixels[32:, :] = 200
    instance = read_instance(write_dataset(image_dataset(pixels), tmp_path / "p.dcm").read_bytes(),
                             SETTINGS)
    tensor = preprocess(instance.image, 64)
    assert float(tensor[0, 10, 10]) == 0.0 and float(tensor[0, 50, 50]) == 1.0


def test_storage_round_trip_is_float16_exact_enough(tmp_path: Path) -> None:
    instance = read_instance(make_image(tmp_path / "r.dcm", seed=1).read_bytes(), SETTINGS)
    tensor = preprocess(instance.image, 64)
    back = from_storage(to_storage(tensor), 1, 64)
    assert float((back - tensor).abs().max()) < 1e-3


def test_too_many_pixels_is_rejected_before_decoding(tmp_path: Path) -> None:
    data = make_image(tmp_path / "big.dcm", size=64).read_bytes()
    with pytest.raises(DicomRejected) as caught:
        read_instance(data, IngestSettings(max_pixels=1000))
    assert caught.value.code == "too_large" and "ingest.max_pixels" in caught.value.reason


def test_library_messages_are_redacted(tmp_path: Path) -> None:
    full = make_image(tmp_path / "t.dcm", seed=2).read_bytes()
    with pytest.raises(DicomRejected) as caught:
        read_instance(full[:-100], SETTINGS)
    text = f"{caught.value} {caught.value.detail}"
    assert not any(secret in text for secret in PHI_STRINGS)


def test_redact_replaces_every_identifying_value() -> None:
    from triage.ingest.phi import phi_values, redact

    ds = image_dataset(np.zeros((4, 4), np.uint8), patient_name="DOE^JANE",
                       patient_id="PID-99731", accession="ACC-55120")
    text = "bad value 'DOE^JANE' for PID-99731 (ACC-55120), JANE DOE"
    assert not any(secret in redact(text, phi_values(ds)) for secret in PHI_STRINGS)


def test_deflated_instance_is_read_and_a_cut_one_rejected(pydicom_files: Path) -> None:
    """Deflated Explicit VR Little Endian: element offsets are in the inflated stream, so
    the declared-length check must not compare them with the file size (it once
    quarantined every deflated file as `truncated`); a cut deflate stream is rejected."""
    data = (pydicom_files / "image_dfl.dcm").read_bytes()
    instance = read_instance(data, IngestSettings())
    assert instance.image is not None and instance.image.frames.shape[-2:] == (
        instance.rows, instance.cols)
    with pytest.raises(DicomRejected) as rejected:
        read_instance(data[: len(data) // 2], IngestSettings())
    assert rejected.value.code == "invalid_header"
