"""Is an instance one the model is for? The ``scope`` check, made on the header alone.

The model reads paediatric chest radiographs; a CT slice, a hand film or a colour photo
decodes just as well but its score would mean nothing. An instance outside ``scope`` is
archived ``out_of_scope`` with the reason in words: kept like any other file, never
decoded for scoring, preprocessed, scored or routed.

The checks run in this order and the first that fails is the reason (also the
``reason`` label of ``triage_out_of_scope_instances_total``):

``modality``
    Modality (0008,0060) is not in ``scope.modalities`` (a missing Modality fails too).
``body_part``
    BodyPartExamined (0018,0015) is not in ``scope.body_parts``; a missing or empty one
    passes when ``scope.accept_missing_body_part``.
``photometric``
    PhotometricInterpretation (0028,0004) is not in ``scope.photometric``; a missing one
    counts as MONOCHROME2, as the decoder reads it.
``size``
    Rows (0028,0010) < ``scope.min_rows`` or Columns (0028,0011) < ``scope.min_cols``
    (missing ones are left to the decoder, which rejects the file).

Values are compared case-insensitively, stripped of spaces; an empty list in ``scope``
admits any value. Objects that hold no image at all (structured reports, RT plans,
``ingest.unscored_modalities``) are ``unsupported``, not out of scope: that is decided
first (:mod:`triage.ingest.dicom`).
"""

from __future__ import annotations

from dataclasses import dataclass

from triage.ingest.settings import ScopeSettings

REASONS = ("modality", "body_part", "photometric", "size")
"""The reason codes, in the order the checks run."""

PREFIX = "out of scope: "


@dataclass(frozen=True)
class OutOfScope:
    """Why an instance is outside ``scope``.

    Attributes:
        code: The first check it failed, one of :data:`REASONS`.
        reason: The same in words, e.g. ``out of scope: modality CT is not in
            scope.modalities [CR, DX]``.
    """

    code: str
    reason: str


def _norm(value: str | None) -> str:
    return (value or "").strip().upper()


def _listing(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _admits(allowed: list[str], value: str) -> bool:
    return not allowed or value in {_norm(item) for item in allowed}


def check_scope(
    scope: ScopeSettings,
    *,
    modality: str | None,
    body_part: str | None,
    photometric: str | None,
    rows: int | None,
    cols: int | None,
) -> OutOfScope | None:
    """The first ``scope`` check an instance fails, or None when it is in scope.

    Args:
        scope: The ``scope`` section.
        modality, body_part, photometric, rows, cols: The header's Modality,
            BodyPartExamined, PhotometricInterpretation, Rows and Columns (None: absent).
    """
    value = _norm(modality)
    if not _admits(scope.modalities, value):
        shown = value or "(missing)"
        return OutOfScope("modality", f"{PREFIX}modality {shown} is not in scope.modalities "
                                      f"{_listing(scope.modalities)}")
    value = _norm(body_part)
    if not value:
        if not scope.accept_missing_body_part and scope.body_parts:
            return OutOfScope("body_part", f"{PREFIX}no body part (BodyPartExamined is missing) "
                                           "and scope.accept_missing_body_part is false")
    elif not _admits(scope.body_parts, value):
        return OutOfScope("body_part", f"{PREFIX}body part {value} is not in scope.body_parts "
                                       f"{_listing(scope.body_parts)}")
    value = _norm(photometric) or "MONOCHROME2"
    if not _admits(scope.photometric, value):
        return OutOfScope("photometric", f"{PREFIX}photometric interpretation {value} is not "
                                         f"in scope.photometric {_listing(scope.photometric)}")
    if rows is not None and cols is not None and (rows < scope.min_rows or cols < scope.min_cols):
        return OutOfScope("size", f"{PREFIX}image of {rows} x {cols} pixels (rows x columns) is "
                                  f"smaller than scope.min_rows x scope.min_cols "
                                  f"({scope.min_rows} x {scope.min_cols})")
    return None
