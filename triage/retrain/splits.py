"""The fixed validation set: each labelled study is assigned to `train` or `validation` once.

Models are compared on the same studies only if a study never changes side, so the split
is decided when a study's first label is stored and reused for every later label
(correction) of that study. Audit labels (studies routed at random, regardless of score)
always go to validation: they are the unbiased sample of the stream. Other labels are
stratified by class: a label goes to validation while its class's validation share is
below `validation_fraction`, i.e. when ``n_val < fraction * (n + 1)`` for the ``n``
studies of that class already split (so the first study of each class is a validation
study). The rule reads only the store: replaying the same labels gives the same split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import sqlite_utils

if TYPE_CHECKING:
    from triage.config import Settings

Split = Literal["train", "validation"]
AUDIT_REASON = "audit"


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
    fraction = settings.retrain.validation_fraction
    earlier = db.execute(
        "SELECT split FROM labels WHERE study_id = ? AND split IS NOT NULL ORDER BY id LIMIT 1",
        [study_id],
    ).fetchone()
    if earlier is not None:
        return earlier[0]
    if label not in settings.model.labels:
        return None
    if reason == AUDIT_REASON:
        return "validation"
    n_total, n_val = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(split = 'validation'), 0) FROM labels "
        "WHERE superseded_by IS NULL AND label = ? AND split IS NOT NULL AND study_id != ?",
        [label, study_id],
    ).fetchone()
    return "validation" if n_val < fraction * (n_total + 1) else "train"
