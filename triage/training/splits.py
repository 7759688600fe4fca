"""The fixed validation set: each labelled study is assigned to `train` or `validation` once.

Models are compared on the same studies only if a study never changes side, so the split
is decided when a study's first label is stored and reused for every later label
(correction) of that study. Audit labels (studies routed at random, regardless of score)
always go to validation: they are the unbiased sample of the stream, and the only one.
With `retrain.validation_source: audit` (the default) every other label trains: the
gate's own picks are biased toward hard cases, and a validation set made of them picks
a worse operating point and promotes on a distorted AUROC. With `mixed`, other labels
are also stratified by class: a label goes to validation while its class's validation
share is below `validation_fraction`, i.e. when ``n_val < fraction * (n + 1)`` for the
``n`` studies of that class already split. The rule (`choose_split`) reads only counts:
replaying the same labels gives the same split, in the daemon and in the lockstep
benchmark alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import sqlite_utils

if TYPE_CHECKING:
    from triage.config import Settings

Split = Literal["train", "validation"]
AUDIT_REASON = "audit"


def choose_split(
    label: str, reason: str | None, class_total: int, class_validation: int, settings: Settings
) -> Split | None:
    """The split of a study's first label, from the counts of its class so far.

    Args:
        label: The label text: a class name, or `skip` / `not-diagnostic`.
        reason: The gate reason of the study's queue item (`audit`, `uncertainty`, ...).
        class_total: Studies of this class already split.
        class_validation: How many of them are validation studies.
        settings: `retrain.validation_source`, `retrain.validation_fraction`, `model.labels`.

    Returns:
        `train`, `validation`, or None for a label that is not a class.
    """
    if label not in settings.model.labels:
        return None
    if reason == AUDIT_REASON:
        return "validation"
    if settings.retrain.validation_source == "audit":
        return "train"
    fraction = settings.retrain.validation_fraction
    return "validation" if class_validation < fraction * (class_total + 1) else "train"


def assign_split(
    db: sqlite_utils.Database,
    study_id: int,
    label: str,
    reason: str | None,
    settings: Settings,
) -> Split | None:
    """The split of a label about to be stored (call inside the label's transaction).

    Args:
        db: The store, inside the caller's write transaction (so counts cannot race).
        study_id: The labelled study.
        label: The label text: a class name, or `skip` / `not-diagnostic`.
        reason: The gate reason of the study's queue item (`audit`, `uncertainty`, ...).
        settings: The configuration (`retrain.validation_fraction`, `model.labels`).

    Returns:
        `train` or `validation`; the study's earlier split when it has one; None for a
        label that is not a class (skip, not-diagnostic): such labels are never used for
        training or validation, and the study gets a split with its first class label.
    """
    earlier = db.execute(
        "SELECT split FROM labels WHERE study_id = ? AND split IS NOT NULL ORDER BY id LIMIT 1",
        [study_id],
    ).fetchone()
    if earlier is not None:
        return earlier[0]
    if label not in settings.model.labels or reason == AUDIT_REASON:
        return choose_split(label, reason, 0, 0, settings)
    n_total, n_val = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN split = 'validation' THEN 1 ELSE 0 END), 0) "
        "FROM labels "
        "WHERE superseded_by IS NULL AND label = ? AND split IS NOT NULL AND study_id != ?",
        [label, study_id],
    ).fetchone()
    return choose_split(label, reason, int(n_total), int(n_val), settings)
