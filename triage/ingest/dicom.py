"""Read one file's bytes as a DICOM instance and decide what it is.

A file becomes exactly one of: a scoreable image (decoded now, so that truncated pixel data
is caught at ingest and not at training time), a valid instance that holds no scoreable
image (``unsupported``), an image outside the model's ``scope`` (``out_of_scope``, decided
from the header before any pixel is decoded: :mod:`triage.ingest.scope`), or a
:class:`~triage.errors.DicomRejected` with a reason in words.
Decoding goes through pydicom's pixel backends; the pylibjpeg plugins (libjpeg, openjpeg)
add JPEG, JPEG-LS and JPEG 2000; RLE is built in.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pydicom
import pydicom.uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut
from pydicom.tag import BaseTag, Tag

from triage.errors import DicomRejected
from triage.ingest.phi import phi_values, redact
from triage.ingest.scope import OutOfScope, check_scope
from triage.ingest.settings import IngestSettings, ScopeSettings

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class DecodedImage:
    """Pixels of one instance, in modality units (rescale slope/intercept applied).

    Attributes:
        frames: float32 array [n_frames, rows, cols]; colour is already converted to grey.
        window: DICOM VOI window (centre, width) when the file gives one, else None.
        invert: True for MONOCHROME1, where low values are displayed white.
    """

    frames: np.ndarray
    window: tuple[float, float] | None
    invert: bool


@dataclass(frozen=True)
class DicomInstance:
    """What ingestion keeps of a DICOM file (no patient identifiers; the descriptions the
    review view shows are kept as the sender wrote them).

    Attributes:
        sop_uid: SOP Instance UID (from the dataset, else the file meta).
        study_uid: Study Instance UID; None only for unsupported files without one.
        image: Decoded pixels when the instance is scoreable, else None.
        unsupported_reason: Why it is not scored, in words, when it holds no scoreable
            image (``unsupported``); None otherwise.
        out_of_scope: Why it is outside ``scope`` when it is an image the model is not
            for (never decoded, ``image`` is None); None otherwise.
        body_part: BodyPartExamined as written, stripped; None when absent or empty.
        series_number, slice_position, instance_number: What orders the instances of a
            study independently of their arrival (:func:`slice_position`); None when
            absent or invalid.
        view: What the review view shows of the header (:class:`ViewHeader`).
    """

    sop_uid: str
    sop_class_uid: str | None
    study_uid: str | None
    series_uid: str | None
    modality: str | None
    photometric: str | None
    rows: int | None
    cols: int | None
    image: DecodedImage | None
    unsupported_reason: str | None
    series_number: int | None = None
    slice_position: float | None = None
    instance_number: int | None = None
    view: ViewHeader | None = None
    out_of_scope: OutOfScope | None = None
    body_part: str | None = None

    @property
    def scoreable(self) -> bool:
        return self.image is not None

    @property
    def note(self) -> str | None:
        """Why it is not scored, in words (None for a scoreable image)."""
        if self.out_of_scope is not None:
            return self.out_of_scope.reason
        return self.unsupported_reason


def read_instance(
    data: bytes, settings: IngestSettings, scope: ScopeSettings | None = None
) -> DicomInstance:
    """Parse, check and (for images in scope) decode a DICOM file held in memory.

    Precedence: a file that is not a usable DICOM instance is rejected; an instance that
    holds no scoreable image (no pixel data, float pixels, ``ingest.unscored_modalities``)
    is ``unsupported``; an image outside ``scope`` is ``out_of_scope`` without decoding
    its pixels (so neither ``ingest.max_pixels`` nor a decoder sees it); only the rest is
    decoded.

    Args:
        data: The whole file.
        settings: The ``ingest`` section (size limits, unscored modalities).
        scope: The ``scope`` section; None checks no scope (the review view re-reading
            an archived image it already scored).

    Raises:
        DicomRejected: when the file is not a usable DICOM instance.
    """
    with warnings.catch_warnings():
        # pydicom warns about odd but readable values; the checks below decide.
        warnings.simplefilter("ignore")
        ds = parse_dataset(data)
        phi = phi_values(ds)
        try:
            instance = _describe(ds, settings, scope)
        except DicomRejected as exc:
            exc.detail = redact(exc.detail, phi)
            raise
    if instance.out_of_scope is not None:
        # the reason quotes header text (the body part): never an identifier
        verdict = instance.out_of_scope
        instance = replace(instance, out_of_scope=replace(verdict,
                                                          reason=redact(verdict.reason, phi)))
    return instance


# DIMSE statuses (PS3.4 Annex B.2.3), also STOW-RS failure reasons (PS3.18 10.5.3)
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH_SOP_CLASS = 0xA900

# Type 1 in every composite IOD (SOP Common, General Study and General Series modules)
REQUIRED_UIDS = {"SOPInstanceUID": "SOP Instance UID", "SOPClassUID": "SOP Class UID",
                 "StudyInstanceUID": "Study Instance UID",
                 "SeriesInstanceUID": "Series Instance UID"}
_READ_BEFORE_ANSWER = (*REQUIRED_UIDS, "Rows", "Columns", "NumberOfFrames",
                       "SamplesPerPixel", "BitsAllocated", "PhotometricInterpretation",
                       "PixelData")


@dataclass(frozen=True)
class ReceivedHeader:
    """The identifying UIDs of an instance received over the network (None: absent).

    The SOP Instance and Class UIDs fall back to the file meta's, for naming the instance
    in an answer only: the check itself wants them in the data set.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_uid: str | None
    series_uid: str | None


class InstanceRefused(DicomRejected):
    """An instance received over the network that must not be acknowledged as stored.

    Attributes:
        status: What to answer: 0xC000 (cannot understand: the bytes do not parse) or
            0xA900 (data set does not match SOP class: a required UID missing, pixel data
            that cannot hold the image declared).
        header: Its UIDs where the header could be read (None when it could not).
    """

    def __init__(self, rejected: DicomRejected, status: int,
                 header: ReceivedHeader | None) -> None:
        super().__init__(rejected.code, rejected.reason, rejected.detail)
        self.status = status
        self.header = header


def check_received(data: bytes) -> ReceivedHeader:
    """Check an instance received over the network before its sender is told Success.

    A sender told Success forgets the instance: if the ingest loop quarantined it later
    for something its bytes already showed, the study would silently lack an image and
    nobody would resend it. So the checks that need no decoding run here, the reader's
    own (:func:`parse_dataset`, :func:`check_pixel_data`, same codes and words): the
    header parses, every declared length within the data; the four required UIDs are in
    the data set; the pixel data can hold the image declared (native: its length;
    encapsulated: the item framing). About 0.7 ms for a 512x512 CT with a short header,
    1.6 ms with a scanner's (bench/receive_check.py), mostly pydicom's parse.

    Not seen here, so still quarantined by the reader later: a value other than those
    checked that pydicom cannot convert, e.g. inside a sequence (``invalid_header``:
    converting them all would cost 7 ms a scanner's CT header); a compressed frame whose
    codestream is damaged inside well-formed items (``decode_failed``); ``too_large``
    (``ingest.max_pixels``); ``conflict``; colour and LUT conversion failures.

    Raises:
        InstanceRefused: with the reader's reason code and words.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as in read_instance: the checks decide
        try:
            ds = parse_dataset(data, every_value=False)
            _read_values(ds, _READ_BEFORE_ANSWER)
        except DicomRejected as exc:
            raise InstanceRefused(exc, CANNOT_UNDERSTAND, None) from None
        meta = getattr(ds, "file_meta", None)
        present = {keyword: _uid(ds, keyword) for keyword in REQUIRED_UIDS}
        header = ReceivedHeader(
            sop_class_uid=present["SOPClassUID"] or (
                _uid(meta, "MediaStorageSOPClassUID") if meta is not None else None),
            sop_instance_uid=present["SOPInstanceUID"] or (
                _uid(meta, "MediaStorageSOPInstanceUID") if meta is not None else None),
            study_uid=present["StudyInstanceUID"], series_uid=present["SeriesInstanceUID"])
        try:
            missing = [name for keyword, name in REQUIRED_UIDS.items() if not present[keyword]]
            if missing:
                raise _missing_uids(missing)
            if "PixelData" in ds:
                check_pixel_data(ds)
        except DicomRejected as exc:
            raise InstanceRefused(exc, DOES_NOT_MATCH_SOP_CLASS, header) from None
    return header


def _missing_uids(names: list[str]) -> DicomRejected:
    return DicomRejected("missing_uid",
                         f"not a usable DICOM instance: it has no {', '.join(names)}")


def parse_dataset(data: bytes, *, every_value: bool = True) -> Dataset:
    """Parse a whole file held in memory: its data elements, each declared length within
    the data, and (``every_value``) every value, nested ones included.

    The values are read because pydicom converts them lazily: a value that cannot be
    converted would otherwise fail later, in whatever reads it. That is most of the cost
    (about 25 us an element, 7 ms for a scanner's CT header with its private elements),
    so :func:`check_received` reads only the values it checks and leaves the others to
    the reader.

    Raises:
        DicomRejected: ``empty_file``, ``not_dicom``, ``invalid_header`` or ``truncated``
            (a declared length past the end of the data).
    """
    if not data:
        raise DicomRejected("empty_file", "the file is empty")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        # Files without the 128-byte preamble and 'DICM' marker are still valid DICOM
        # when they start with data elements; accept them only if they identify an instance.
        ds = None
        if _starts_with_a_data_element(data):
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
            except Exception:  # noqa: BLE001 - any failure here means "not DICOM"
                ds = None
        if ds is None or ("SOPInstanceUID" not in ds and "SOPClassUID" not in ds):
            raise DicomRejected(
                "not_dicom",
                "not a DICOM file: no 'DICM' marker and no DICOM instance identifiers",
            ) from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for broken headers
        raise DicomRejected(
            "invalid_header", "the DICOM header could not be parsed", type(exc).__name__
        ) from None
    if not len(ds):
        _explain_empty(data)
    # A deflated data set's offsets are in the inflated stream, not the file: a truncated
    # deflate stream fails to inflate instead (an unreadable element, below).
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax != pydicom.uid.DeflatedExplicitVRLittleEndian:
        _check_declared_lengths(ds, len(data))
    if every_value:
        for elem in _walk(ds):
            try:
                _ = elem.value
            except Exception as exc:  # noqa: BLE001
                raise _unreadable(elem.tag, elem.keyword, exc) from None
    return ds


# The group of the first data element of a data set stored without the preamble: its File
# Meta Information (0002) or, without one, the lowest group of an instance's header (0008).
_FIRST_GROUPS = (0x0002, 0x0008)


def _starts_with_a_data_element(data: bytes) -> bool:
    """Whether bytes without the 'DICM' marker begin as a data set does (little or big
    endian), before pydicom is asked to parse them by force. Anything else is not parsed
    at all: zeros read as millions of empty (0000,0000) elements, 18 s of CPU for a
    50 MB zero-filled STOW part before this check (issue 23); a few microseconds now."""
    return len(data) >= 8 and (int.from_bytes(data[:2], "little") in _FIRST_GROUPS
                               or int.from_bytes(data[:2], "big") in _FIRST_GROUPS)


def _unreadable(tag: BaseTag, keyword: str, exc: Exception) -> DicomRejected:
    return DicomRejected("invalid_header",
                         f"data element {tag} {keyword or '(private)'} could not be read",
                         type(exc).__name__)


def _read_values(ds: Dataset, keywords: Sequence[str]) -> None:
    """Convert these top-level elements' values, failing as the reader's walk does."""
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in ds:
            continue
        try:
            _ = ds[tag].value
        except Exception as exc:  # noqa: BLE001 - pydicom's converters raise many types
            raise _unreadable(Tag(tag), keyword, exc) from None


def _explain_empty(data: bytes) -> None:
    """A file with a 'DICM' marker whose data set parsed empty. pydicom keeps nothing of
    a data set that ends inside an element of undefined length (it only warns), so a
    file cut inside its encapsulated pixel data would otherwise pass as an instance with
    no content at all."""
    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - it parsed once; whatever fails now, no header
        header = Dataset()
    if len(header):
        raise DicomRejected(
            "truncated", "the data ends inside the pixel data, before its sequence delimiter")
    raise DicomRejected(
        "invalid_header", "no data element could be read after the file meta (none, or "
                          "the data ends inside a sequence)")


def _check_declared_lengths(ds: Dataset, file_size: int) -> None:
    # pydicom reads a value shorter than its declared length without complaint; a length
    # that runs past the end of the file means the file is truncated or corrupt.
    for tag in ds.keys():
        raw = ds.get_item(tag)
        length, tell = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or tell is None or length == _UNDEFINED_LENGTH:
            continue
        if tell + length > file_size:
            raise DicomRejected(
                "truncated",
                f"data element {raw.tag} declares {length} bytes but the file ends "
                f"{file_size - tell} bytes after its start",
            )


def _walk(ds: Dataset):  # type: ignore[no-untyped-def]
    try:
        yield from ds.iterall()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt sequences fail here
        raise DicomRejected(
            "invalid_header",
            "the DICOM header is truncated or corrupt",
            type(exc).__name__,
        ) from None


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def _describe(ds: Dataset, settings: IngestSettings, scope: ScopeSettings | None) -> DicomInstance:
    meta = getattr(ds, "file_meta", None)
    sop_uid = _uid(ds, "SOPInstanceUID") or (
        _uid(meta, "MediaStorageSOPInstanceUID") if meta is not None else None
    )
    if sop_uid is None:
        raise _missing_uids([REQUIRED_UIDS["SOPInstanceUID"]])
    sop_class = _uid(ds, "SOPClassUID") or (
        _uid(meta, "MediaStorageSOPClassUID") if meta is not None else None
    )
    modality = _uid(ds, "Modality")
    fields = {
        "sop_uid": sop_uid,
        "sop_class_uid": sop_class,
        "study_uid": _uid(ds, "StudyInstanceUID"),
        "series_uid": _uid(ds, "SeriesInstanceUID"),
        "modality": modality,
        "photometric": _uid(ds, "PhotometricInterpretation"),
        "rows": _int(ds, "Rows"),
        "cols": _int(ds, "Columns"),
        "series_number": _int(ds, "SeriesNumber"),
        "slice_position": slice_position(ds),
        "instance_number": _int(ds, "InstanceNumber"),
        "view": view_header(ds),
        "body_part": _uid(ds, "BodyPartExamined"),
    }
    unsupported = _unsupported_reason(ds, modality, sop_class, settings)
    if unsupported is not None:
        return DicomInstance(image=None, unsupported_reason=unsupported, **fields)
    if scope is not None:
        # from the header only: an out-of-scope series costs no pixel decode
        verdict = check_scope(scope, modality=modality, body_part=fields["body_part"],
                              photometric=fields["photometric"], rows=fields["rows"],
                              cols=fields["cols"])
        if verdict is not None:
            return DicomInstance(image=None, unsupported_reason=None, out_of_scope=verdict,
                                 **fields)
    if fields["study_uid"] is None:
        raise DicomRejected(
            "missing_uid", "image without a Study Instance UID: it cannot be assigned to a study"
        )
    return DicomInstance(image=_decode(ds, settings), unsupported_reason=None, **fields)


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def slice_position(ds: Dataset) -> float | None:
    """Where the (first) image plane lies along its normal, in mm, or None.

    ImagePositionPatient projected on the normal of ImageOrientationPatient (row
    direction x column direction): the order of slices in space, which neither arrival
    order nor InstanceNumber reliably gives. Enhanced multi-frame instances carry both
    in their functional groups; the first frame's plane stands for the instance.
    """
    position, orientation = _plane(ds)
    try:
        ipp = np.asarray([float(v) for v in position], dtype=np.float64)
        iop = np.asarray([float(v) for v in orientation], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if ipp.shape != (3,) or iop.shape != (6,) or not np.isfinite([*ipp, *iop]).all():
        return None
    normal = np.cross(iop[:3], iop[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:  # parallel or zero direction cosines: no plane
        return None
    return float(ipp @ normal) / norm


def _plane(ds: Dataset) -> tuple[object, object]:
    position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    groups = [_first_item(ds, "PerFrameFunctionalGroupsSequence"),
              _first_item(ds, "SharedFunctionalGroupsSequence")]
    for group in groups:
        if group is None:
            continue
        if position is None:
            position = _nested(group, "PlanePositionSequence", "ImagePositionPatient")
        if orientation is None:
            orientation = _nested(group, "PlaneOrientationSequence", "ImageOrientationPatient")
    return position, orientation


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    items = ds.get(keyword)
    return items[0] if items else None


def _nested(group: Dataset, sequence: str, keyword: str) -> object:
    item = _first_item(group, sequence)
    return item.get(keyword) if item is not None else None


def _unsupported_reason(
    ds: Dataset, modality: str | None, sop_class: str | None, settings: IngestSettings
) -> str | None:
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        kind = pydicom.uid.UID(sop_class).name if sop_class else "unknown SOP class"
        return f"holds no pixel data ({kind})"
    if "PixelData" not in ds:
        return "float pixel data is not scored"
    if modality and modality.upper() in settings.unscored_modalities:
        return f"modality {modality} is not scored (ingest.unscored_modalities)"
    return None


def _decode(ds: Dataset, settings: IngestSettings) -> DecodedImage:
    shape = check_pixel_data(ds)
    n_frames, samples = shape.frames, shape.samples
    declared = shape.rows * shape.cols * n_frames * samples
    if declared > settings.max_pixels:
        raise DicomRejected(
            "too_large",
            f"declares {declared} pixel values, more than ingest.max_pixels "
            f"({settings.max_pixels})",
        )
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        message = str(exc)
        if "less than expected" in message or "truncated" in message.lower():
            code, reason = "truncated", "pixel data is shorter than the image attributes declare"
        elif isinstance(exc, AttributeError):
            code, reason = "invalid_image", "image attributes needed to decode are missing"
        else:
            name = pydicom.uid.UID(str(syntax)).name if syntax else "unknown transfer syntax"
            code, reason = "decode_failed", f"pixel data could not be decoded ({name})"
        raise DicomRejected(code, reason, f"{type(exc).__name__}: {message}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    try:
        frames = _to_grey_frames(ds, array, photometric, n_frames, samples)
    except Exception as exc:  # noqa: BLE001 - malformed LUTs and odd shapes
        raise DicomRejected(
            "invalid_image", "pixel values could not be converted to grey levels", repr(exc)
        ) from None
    if not np.isfinite(frames).all():
        raise DicomRejected("invalid_image", "pixel values are not finite numbers")
    return DecodedImage(frames=frames, window=dicom_window(ds), invert=photometric == "MONOCHROME1")


@dataclass(frozen=True)
class PixelShape:
    """What the Image Pixel attributes declare (NumberOfFrames and SamplesPerPixel are 1
    when absent)."""

    rows: int
    cols: int
    frames: int
    samples: int
    bits: int


def check_pixel_data(ds: Dataset) -> PixelShape:
    """Check that the Pixel Data can hold the image its attributes declare; no decoding.

    Native (uncompressed) transfer syntaxes: its length must be at least Rows x Columns x
    SamplesPerPixel x NumberOfFrames x BitsAllocated / 8 bytes (1-bit data packed,
    YBR_FULL_422 two samples a pixel, PS3.5 8.1.1 and PS3.3 C.7.6.3.1.2); a trailing odd
    padding byte, or more, is read as pydicom does, the excess ignored. Encapsulated
    (compressed) ones: the item framing, each item within the data and at least one
    fragment a frame; what is inside a fragment is only seen by a decoder. Cheap either
    way: lengths and 8-byte item headers, so that it can run before a sender is answered.

    Raises:
        DicomRejected: ``invalid_image`` (attributes missing or invalid, items malformed)
            or ``truncated`` (less pixel data than declared).
    """
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    if not rows or not cols or rows < 0 or cols < 0:
        raise DicomRejected("invalid_image", "image without valid Rows and Columns")
    frames = _int(ds, "NumberOfFrames") or 1  # pydicom reads 0 and absent as 1, too
    samples = _int(ds, "SamplesPerPixel") or 1
    bits = _int(ds, "BitsAllocated")
    if bits is None:
        raise DicomRejected("invalid_image", "image attributes needed to decode are missing")
    if frames < 0 or samples < 0 or bits < 0:
        raise DicomRejected("invalid_image", "NumberOfFrames, SamplesPerPixel or "
                                             "BitsAllocated is negative")
    shape = PixelShape(rows, cols, frames, samples, bits)
    element = ds["PixelData"]
    value = element.value or b""
    if _encapsulated(ds, element):
        _check_fragments(value, frames)
        return shape
    if bits != 1 and bits % 8:
        raise DicomRejected("invalid_image", f"BitsAllocated {bits} is not 1 or a multiple of 8")
    values = rows * cols * frames * samples
    expected = (values + 7) // 8 if bits == 1 else values * (bits // 8)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "YBR_FULL_422":
        expected = expected // 3 * 2
    if len(value) < expected:
        raise DicomRejected(
            "truncated", f"pixel data holds {len(value)} of the {expected} bytes declared",
            f"Rows {rows} x Columns {cols} x {samples} samples x {frames} frames x "
            f"{bits} bits allocated ({photometric or 'no photometric interpretation'})")
    return shape


def _encapsulated(ds: Dataset, element: DataElement) -> bool:
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        try:
            return bool(pydicom.uid.UID(str(syntax)).is_encapsulated)
        except ValueError:
            pass
    # no file meta, or a transfer syntax pydicom does not know: encapsulated pixel data
    # is the one kind with an undefined length (PS3.5 A.4)
    return bool(element.is_undefined_length)


def _check_fragments(value: bytes, frames: int) -> None:
    """The items of encapsulated pixel data (PS3.5 A.4): a Basic Offset Table item, then
    one or more fragments a frame, each item's declared length within the data."""
    offset, items, end = 0, 0, len(value)
    while offset < end:
        if end - offset < 8:
            raise DicomRejected("truncated", "encapsulated pixel data ends inside an item header")
        group, elem, length = struct.unpack_from("<HHL", value, offset)
        tag = group << 16 | elem
        if tag == _SEQUENCE_DELIMITER:
            break
        if tag != _ITEM:
            raise DicomRejected(
                "invalid_image",
                f"encapsulated pixel data has a ({group:04X},{elem:04X}) where an item belongs")
        if length == _UNDEFINED_LENGTH or length > end - offset - 8:
            raise DicomRejected(
                "truncated", f"encapsulated pixel data item {items + 1} is cut short",
                f"declares {length} bytes, {end - offset - 8} remain")
        offset += 8 + length
        items += 1
    fragments = max(items - 1, 0)  # the first item is the Basic Offset Table
    if fragments < frames:
        raise DicomRejected(
            "truncated", f"encapsulated pixel data has fewer fragments ({fragments}) than "
                         f"frames ({frames})")


def _to_grey_frames(
    ds: Dataset, array: np.ndarray, photometric: str, n_frames: int, samples: int
) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
        samples = 3
    elif samples == 1:
        array = apply_modality_lut(array, ds)
    colour = samples > 1
    if n_frames == 1:
        array = array[np.newaxis]
    if colour:
        # pydicom converts YBR to RGB while decoding; grey is the luma of RGB.
        array = np.asarray(array, dtype=np.float32) @ _LUMA
    frames = np.asarray(array, dtype=np.float32)
    if frames.ndim != 3:
        raise ValueError(f"unexpected pixel array shape {frames.shape}")
    return frames


# Which pair of a multi-valued WindowCenter/WindowWidth is the default: the first, as
# DICOM (PS3.3 C.11.2.1.2) ranks the presets; the choice is stored and shown, not silent.
DEFAULT_WINDOW_PRESET = 0


@dataclass(frozen=True)
class WindowChoice:
    """The VOI window read from a header, and which of its presets it is.

    Attributes:
        centre, width: The window, in modality units.
        index: Which (centre, width) pair of the header it is (0-based).
        count: How many pairs the header gives (WindowCenter and WindowWidth are
            multi-valued, one value per preset).
        explanation: That pair's WindowCenterWidthExplanation (e.g. ``LUNG``), if any.
    """

    centre: float
    width: float
    index: int
    count: int
    explanation: str | None


@dataclass(frozen=True)
class ViewHeader:
    """What the review view shows of an instance's header, read once at ingest and kept
    in the store, so that viewing a study reads no file however many slices it has.

    Descriptions are the sender's text, kept as written (the UI sets them as text only).
    """

    window: WindowChoice | None
    series_description: str
    study_description: str


def _values(value: object) -> list[object]:
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return [value]


def window_choice(ds: Dataset, preset: int = DEFAULT_WINDOW_PRESET) -> WindowChoice | None:
    """Pair ``preset`` of the header's VOI windows, or None if absent or invalid.

    A header may give several (centre, width) pairs, one per preset (lung, mediastinum,
    bone...); which one is used, and how many there were, is part of the answer so that
    it can be shown instead of silently taking one.
    """
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None:
        return None
    centres, widths = _values(centre), _values(width)
    count = min(len(centres), len(widths))
    if not 0 <= preset < count:
        return None
    try:
        centre_value, width_value = float(centres[preset]), float(widths[preset])
    except (TypeError, ValueError):
        return None
    if not np.isfinite(centre_value) or not np.isfinite(width_value) or width_value <= 1:
        return None
    explanations = _values(ds.get("WindowCenterWidthExplanation"))
    explanation = explanations[preset] if preset < len(explanations) else None
    text = str(explanation).strip() if explanation is not None else ""
    return WindowChoice(centre_value, width_value, preset, count, text or None)


def dicom_window(ds: Dataset) -> tuple[float, float] | None:
    """The default VOI window (centre, width) of a dataset, or None if absent or invalid."""
    choice = window_choice(ds)
    return (choice.centre, choice.width) if choice is not None else None


def view_header(ds: Dataset) -> ViewHeader:
    """The header fields the review view shows (see :class:`ViewHeader`)."""
    return ViewHeader(
        window=window_choice(ds),
        series_description=_description(ds, "SeriesDescription"),
        study_description=_description(ds, "StudyDescription"),
    )


def _description(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value or "")
