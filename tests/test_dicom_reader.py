"""What the reader makes of pydicom's deliberately odd files, and of our own bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import PHI_STRINGS, make_image
from pydicom.encaps import encapsulate, generate_fragments, parse_basic_offsets

from triage.config import IngestSettings
from triage.errors import DicomRejected
from triage.ingest.dicom import InstanceRefused, check_received, read_instance
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


# ---- what is checked before a network sender is answered (check_received) ----------


def _refusal(data: bytes) -> InstanceRefused:
    with pytest.raises(InstanceRefused) as caught:
        check_received(data)
    return caught.value


def _rejection(data: bytes) -> DicomRejected:
    with pytest.raises(DicomRejected) as caught:
        read_instance(data, SETTINGS)
    return caught.value


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


def test_the_checks_before_success_agree_with_the_reader_on_pydicoms_corpus(
        pydicom_files: Path) -> None:
    """No false refusal: every file of pydicom's corpus the reader decodes into an image
    passes. Every refusal but a missing UID is a rejection by the reader too, with the
    same code and words: what the sender is refused is what would have been quarantined.
    Missing UIDs are stricter over the network: a composite instance needs all four
    (the reader archives a few such fragments of files as `unsupported`)."""
    images = refused = 0
    for path in sorted(p for p in pydicom_files.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            instance = read_instance(data, SETTINGS)
        except DicomRejected as exc:
            instance, rejected = None, exc
        try:
            header = check_received(data)
        except InstanceRefused as exc:
            refused += 1
            assert instance is None or not instance.scoreable, path.name
            if exc.code != "missing_uid":
                assert (exc.code, exc.reason) == (rejected.code, rejected.reason), path.name
            assert exc.status == (0xA900 if exc.code == "missing_uid" else 0xC000), path.name
            continue
        if instance is not None and instance.scoreable:
            images += 1
            assert (header.sop_instance_uid, header.study_uid) == (
                instance.sop_uid, instance.study_uid), path.name
    assert images >= 40 and refused >= 15, (images, refused)


def test_short_native_pixel_data_is_refused_with_its_sizes(pydicom_files: Path) -> None:
    for name, rows, cols, bytes_per_pixel in (
        ("MR_small.dcm", 64, 64, 2),                       # 16-bit, explicit little endian
        ("MR_small_bigendian.dcm", 64, 64, 2),             # big endian
        ("SC_ybr_full_422_uncompressed.dcm", 100, 100, 2),  # YBR_FULL_422: 2 samples a pixel
        ("SC_rgb_small_odd.dcm", 3, 3, 3),                 # 27 bytes and a padding byte
    ):
        ds = pydicom.dcmread(pydicom_files / name)
        expected = rows * cols * bytes_per_pixel
        assert len(ds.PixelData) in (expected, expected + 1), name
        check_received(_bytes(ds))  # as it is: accepted
        ds.PixelData = ds.PixelData[:expected - 2]
        held = expected - 2 + (expected - 2) % 2  # written with its padding byte
        refused = _refusal(_bytes(ds))
        assert (refused.status, refused.code) == (0xA900, "truncated"), name
        assert refused.reason == f"pixel data holds {held} of the {expected} bytes declared"
        assert refused.header is not None and refused.header.sop_instance_uid == ds.SOPInstanceUID
        # the reader quarantines it with the same words
        assert (_rejection(_bytes(ds)).code, _rejection(_bytes(ds)).reason) == (
            refused.code, refused.reason), name


def test_encapsulated_pixel_data_items_are_checked_not_decoded(pydicom_files: Path) -> None:
    """An item whose declared length runs past the pixel data, fewer fragments than
    frames, something else where an item belongs: refused without decoding. A file cut
    inside its encapsulated pixel data parses as an empty data set in pydicom (it only
    warns): it used to be archived as an `unsupported` instance with no content; now it
    is refused, and quarantined from the inbox, as `truncated`."""
    rle = pydicom.dcmread(pydicom_files / "MR_small_RLE.dcm")
    rle.PixelData = rle.PixelData[:-100]
    refused = _refusal(_bytes(rle))
    assert (refused.status, refused.code) == (0xA900, "truncated")
    assert refused.reason == "encapsulated pixel data item 2 is cut short"
    assert (_rejection(_bytes(rle)).code, _rejection(_bytes(rle)).reason) == (
        refused.code, refused.reason)
    two = pydicom.dcmread(pydicom_files / "SC_rgb_rle_2frame.dcm")
    offsets = parse_basic_offsets(two.PixelData)
    first, _second = generate_fragments(two.PixelData[8 + len(offsets) * 4:])
    two.PixelData = encapsulate([first])
    assert _refusal(_bytes(two)).reason == (
        "encapsulated pixel data has fewer fragments (1) than frames (2)")
    two.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + b"\x00" * 16  # no item tag
    assert _refusal(_bytes(two)).reason == (
        "encapsulated pixel data has a (0000,0000) where an item belongs")
    j2k = (pydicom_files / "JPEG2000.dcm").read_bytes()
    refused = _refusal(j2k[:-100])
    assert (refused.status, refused.code, refused.header) == (0xC000, "truncated", None)
    assert refused.reason == "the data ends inside the pixel data, before its sequence delimiter"
    assert (_rejection(j2k[:-100]).code, _rejection(j2k[:-100]).reason) == (
        refused.code, refused.reason)


def test_missing_uids_and_unparseable_bytes(pydicom_files: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom_files / "CT_small.dcm")
    del ds.StudyInstanceUID, ds.SeriesInstanceUID
    refused = _refusal(_bytes(ds))
    assert (refused.status, refused.code) == (0xA900, "missing_uid")
    assert refused.reason == (
        "not a usable DICOM instance: it has no Study Instance UID, Series Instance UID")
    assert refused.header is not None and refused.header.sop_instance_uid == ds.SOPInstanceUID
    for data, code in ((b"", "empty_file"), (b"not DICOM at all " * 10, "not_dicom"),
                       ((pydicom_files / "MR_truncated.dcm").read_bytes(), "truncated")):
        refused = _refusal(data)
        assert (refused.status, refused.code, refused.header) == (0xC000, code, None)
    # the reasons never quote a value of the data set
    with_phi = pydicom.dcmread(make_image(tmp_path / "phi.dcm", seed=3))
    del with_phi.SOPInstanceUID
    cut_header = make_image(tmp_path / "cut.dcm", seed=4).read_bytes()[:400]
    text = " ".join(f"{r.reason} {r.detail}" for r in (_refusal(_bytes(with_phi)),
                                                      _refusal(cut_header)))
    assert not any(secret in text for secret in PHI_STRINGS)


def test_garbage_without_a_dicm_marker_is_refused_without_parsing_it(
        pydicom_files: Path) -> None:
    """50 MB of zeros (a STOW part, issue 23) read as millions of empty (0000,0000)
    elements when pydicom parsed it by force: 13-18 s of CPU before the refusal. Bytes
    without the marker are parsed only if they begin with a data element of group
    0002 or 0008, as the corpus's data sets stored without a preamble do."""
    import time

    started = time.perf_counter()
    refused = _refusal(b"\0" * 50_000_000)
    assert (refused.status, refused.code) == (0xC000, "not_dicom")
    assert time.perf_counter() - started < 3.0
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):
        header = check_received((pydicom_files / name).read_bytes())
        assert header.sop_instance_uid
