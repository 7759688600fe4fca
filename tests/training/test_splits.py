"""assign_split: audits to validation, per-class stratification, a study never changes side."""

from __future__ import annotations

import torch

from triage.store import db as store
from triage.training.splits import assign_split

from .conftest import Store, make_settings


def _store_label(st: Store, study: int, label: str, reason: str = "uncertainty") -> str | None:
    with store.transaction(st.db):
        split = assign_split(st.db, study, label, reason, st.settings)
    old = st.db.execute(
        "SELECT id FROM labels WHERE study_id = ? AND superseded_by IS NULL", [study]
    ).fetchone()
    if old is not None:  # a correction: the old label stops being current
        with store.transaction(st.db):
            st.db.execute("UPDATE labels SET superseded_by = id WHERE id = ?", [old[0]])
    new = st.label(study, label, split, reason)
    if old is not None:
        with store.transaction(st.db):
            st.db.execute("UPDATE labels SET superseded_by = ? WHERE id = ?", [new, old[0]])
    return split


def _studies(st: Store, n: int) -> list[int]:
    return [st.add_study(torch.zeros(1, 1, 28, 28)) for _ in range(n)]


def test_stratified_per_class_and_first_of_each_class_is_validation(tmp_path):
    st = Store(make_settings(tmp_path))
    studies = _studies(st, 100)
    splits = [_store_label(st, s, "normal" if i % 4 == 0 else "pneumonia")
              for i, s in enumerate(studies)]
    normal = [sp for i, sp in enumerate(splits) if i % 4 == 0]
    pneumonia = [sp for i, sp in enumerate(splits) if i % 4]
    assert normal[0] == "validation" and pneumonia[0] == "validation"
    assert normal.count("validation") == 5  # 20% of 25
    assert pneumonia.count("validation") == 15  # 20% of 75
    for k in range(1, len(pneumonia) + 1):  # the share never runs ahead of the target
        assert pneumonia[:k].count("validation") <= 0.2 * k + 1


def test_audit_labels_always_go_to_validation(tmp_path):
    st = Store(make_settings(tmp_path))
    studies = _studies(st, 12)
    for s in studies[:2]:
        _store_label(st, s, "pneumonia")
    assert all(_store_label(st, s, "pneumonia", reason="audit") == "validation"
               for s in studies[2:])
    # audits count toward the class's validation share: the next routed label trains
    assert _store_label(st, _studies(st, 1)[0], "pneumonia") == "train"


def test_split_is_stable_under_corrections_and_replay(tmp_path):
    st = Store(make_settings(tmp_path))
    studies = _studies(st, 30)
    first = [_store_label(st, s, ["normal", "pneumonia"][i % 2]) for i, s in enumerate(studies)]
    for i, s in enumerate(studies):  # every study corrected to the other class
        assert _store_label(st, s, ["pneumonia", "normal"][i % 2]) == first[i]
    again = Store(make_settings(tmp_path / "replay"))
    replay = [_store_label(again, s, ["normal", "pneumonia"][i % 2])
              for i, s in enumerate(_studies(again, 30))]
    assert replay == first


def test_skip_labels_get_no_split_and_do_not_count(tmp_path):
    st = Store(make_settings(tmp_path))
    skipped, other = _studies(st, 2)
    assert _store_label(st, skipped, "skip") is None
    assert _store_label(st, other, "not-diagnostic") is None
    # the skipped study gets a split with its first class label: the first normal -> validation
    assert _store_label(st, skipped, "normal") == "validation"
