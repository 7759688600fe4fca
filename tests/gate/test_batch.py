"""The `batch` budget manager: BADGE's diverse k-means++ batch over buffered studies.

Pure parts here (the selection and `BudgetGate.decide_batch`); the scorer's buffer in
the store, its triggers and its restart are in test_scorer.py."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from triage.gate import BatchEntry, BudgetGate, GateSettings, uniform_pair
from triage.gate.budget_managers import BatchBudget

NOW = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def _clusters(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters of gradient-like embeddings: 60 of large norm along one axis,
    40 of smaller norm along another. Returns the embeddings and each one's cluster."""
    big = np.array([10.0, 0.0, 0.0]) + rng.normal(scale=0.05, size=(60, 3))
    small = np.array([0.0, 6.0, 0.0]) + rng.normal(scale=0.05, size=(40, 3))
    return np.concatenate([big, small]), np.repeat([0, 1], [60, 40])


def test_a_kmeans_batch_holds_both_clusters_where_the_largest_norms_hold_one():
    embeddings, cluster = _clusters(np.random.default_rng(0))
    norms = np.linalg.norm(embeddings, axis=1)
    top = np.argsort(-norms)[:4]
    assert set(cluster[top]) == {0}  # ranked by norm alone (per-study BADGE): one kind
    for seed in range(20):
        picked = BatchBudget.select(embeddings, 4, seed)
        assert len(set(picked)) == 4
        # after a pick in one cluster the other holds nearly all of the D^2 mass
        assert set(cluster[picked]) == {0, 1}, seed
    assert BatchBudget.select(embeddings, 4, 3) == BatchBudget.select(embeddings, 4, 3)


def test_a_batch_picks_distinct_studies_even_when_their_embeddings_coincide():
    same = np.ones((6, 4))  # after the first pick no row has D^2 mass left
    for seed in range(5):
        assert len(set(BatchBudget.select(same, 3, seed))) == 3
    same[4:] *= 2.0  # two of larger norm: k >= n takes all, largest norm first
    assert BatchBudget.select(same, 9, 0)[:2] == [4, 5]
    assert sorted(BatchBudget.select(same, 6, 0)) == list(range(6))
    assert BatchBudget.select(same, 0, 0) == []


def _gate(**options: object) -> BudgetGate:
    settings = {"strategy": "badge", "budget_manager": "batch", "label_rate": 0.1,
                "exploration_rate": 0.02, "daily_cap": 10**6, **options}
    return BudgetGate(GateSettings(**settings))


def _batch(rng: np.random.Generator, n: int, start: int = 0) -> list[BatchEntry]:
    return [BatchEntry({"badge": float(rng.random())}, key=start + i,
                       embedding=rng.normal(size=8).astype(np.float32)) for i in range(n)]


def test_batches_route_the_label_rate_with_audits_drawn_as_one_by_one():
    gate, rng = _gate(), np.random.default_rng(1)
    decisions = []
    for b in range(40):
        batch = gate.decide_batch(_batch(rng, 50, 50 * b), NOW)
        assert [d.sequence for d in batch] == list(range(gate.sequence, gate.sequence + 50))
        assert [d.key for d in batch] == list(range(50 * b, 50 * b + 50))
        for decision in batch:
            gate.commit(decision)
        decisions += batch
    reasons = [d.reason for d in decisions]
    assert set(reasons) == {"audit", "batch", "not_selected"}
    # the audit draw of each sequence number is the one a gate deciding alone makes
    expected = [uniform_pair(0, d.sequence)[0] < 0.02 for d in decisions]
    assert [r == "audit" for r in reasons] == expected
    routed = sum(d.needs_label for d in decisions)
    assert abs(routed / len(decisions) - 0.1) < 0.01  # k = floor(r_s n + u): unbiased
    for d in decisions:  # ranked within their batch, for the review queue
        assert 0 < d.combined < 1 and d.quantiles == {"badge": d.combined}


def test_a_batch_keeps_the_daily_cap_audits_first_and_pays_the_offset_with_its_last_picks():
    gate = _gate(label_rate=0.5, exploration_rate=0.1, daily_cap=4)
    rng = np.random.default_rng(2)
    batch = _batch(rng, 40)
    free = _gate(label_rate=0.5, exploration_rate=0.1).decide_batch(batch, NOW)
    audits = [d.sequence for d in free if d.reason == "audit"]
    picks = [d.sequence for d in free if d.reason == "batch"]
    assert len(audits) >= 2 and len(picks) > 4
    capped = gate.decide_batch(batch, NOW)
    routed = [d for d in capped if d.needs_label]
    assert len(routed) == 4  # the cap holds within one batch
    assert {d.sequence for d in routed} >= set(audits[:4])  # audits take the cap first
    assert {d.reason for d in capped if d.sequence in picks} <= {"batch", "cap_reached"}

    offset = _gate(label_rate=0.5, exploration_rate=0.1)
    offset.note_routed(NOW.date(), 3)  # three coverage routes still to be paid
    paid = offset.decide_batch(batch, NOW)
    assert [d.reason for d in paid if d.sequence in picks].count("budget_offset") == 3
    assert sum(d.needs_label for d in paid) == sum(d.needs_label for d in free) - 3
    for decision in paid:
        offset.commit(decision)
    assert offset.pending_offset == 0


def test_without_embeddings_a_batch_takes_its_highest_scores():
    gate = _gate(exploration_rate=0.0, label_rate=0.2)
    entries = [BatchEntry({"badge": float(v)}, key=i) for i, v in enumerate(range(10))]
    decisions = gate.decide_batch(entries, NOW)
    assert [d.key for d in decisions if d.needs_label] == [8, 9]  # floor(0.2 * 10 + u) = 2


def test_a_batch_is_decided_once_and_only_under_a_buffered_manager():
    gate = _gate()
    batch = gate.decide_batch(_batch(np.random.default_rng(3), 5), NOW)
    assert gate.decide_batch([], NOW) == []
    for decision in batch[:2]:
        gate.commit(decision)
    with pytest.raises(ValueError, match="sequence"):
        gate.commit(batch[1])
    with pytest.raises(ValueError, match="decide_batch"):
        gate.decide({"badge": 1.0}, NOW)
    alone = BudgetGate(GateSettings(strategy="badge"))
    with pytest.raises(ValueError, match="one study at a time"):
        alone.decide_batch(_batch(np.random.default_rng(3), 5), NOW)


def test_the_batch_manager_needs_a_strategy_that_embeds_studies():
    with pytest.raises(ValidationError, match="badge.*combined"):
        GateSettings(strategy="combined", budget_manager="batch")
    with pytest.raises(ValidationError, match="batch_size"):
        GateSettings(strategy="badge", budget_manager="batch", batch_size=1)
    assert GateSettings(strategy="badge", budget_manager="batch").manager == "batch"
