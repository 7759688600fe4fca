"""The needs-label gate on synthetic score streams."""

import json
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from triage.gate import SKIPPED_REASONS, BudgetGate, Decision, GateSettings

START = datetime(2024, 3, 1, tzinfo=UTC)


def stream(n, seed=0, drift=0.0):
    """Correlated (uncertainty, predicted_loss) pairs; `drift` shifts the scale over time."""
    rng = np.random.default_rng(seed)
    u = rng.beta(2, 5, n) * (1 + drift * np.arange(n) / n)
    loss = 0.6 * u + rng.normal(0, 0.2, n) + drift * np.arange(n) / n
    return [
        {"uncertainty": float(a), "predicted_loss": float(b)} for a, b in zip(u, loss, strict=True)
    ]


def run(settings, scores, per_day=100):
    gate = BudgetGate(settings)
    decisions = []
    for i, s in enumerate(scores):
        decision = gate.decide(s, START + timedelta(days=i / per_day))
        gate.commit(decision)
        decisions.append(decision)
    return gate, decisions


@pytest.mark.parametrize(
    ("strategy", "label_rate", "drift"),
    [("combined", 0.2, 0.0), ("combined", 0.1, 0.0), ("combined", 0.3, 2.0),
     ("bald", 0.2, 0.0), ("predicted_loss", 0.2, 1.0)],
)  # fmt: skip
def test_routed_fraction_tracks_label_rate(strategy, label_rate, drift):
    settings = GateSettings(strategy=strategy, label_rate=label_rate, daily_cap=10_000)
    _, decisions = run(settings, stream(6000, drift=drift))
    after = decisions[settings.warmup :]
    routed = np.mean([d.needs_label for d in after])
    assert abs(routed - label_rate) <= 0.02


def test_routed_studies_have_high_scores():
    settings = GateSettings(daily_cap=10_000, exploration_rate=0.0)
    _, decisions = run(settings, stream(3000))
    scored = [d for d in decisions if d.combined is not None]
    routed = np.mean([d.combined for d in scored if d.needs_label])
    skipped = np.mean([d.combined for d in scored if not d.needs_label])
    assert routed > skipped + 0.3
    for d in scored:
        assert d.needs_label == (d.combined > d.threshold)
        if d.needs_label:
            above = {k for k, q in d.quantiles.items() if q > d.threshold}
            assert d.reason == ("both" if len(above) == 2 else above.pop())


@pytest.mark.parametrize(("per_day", "cap"), [(1000, 50), (2000, 200), (300, 1)])
def test_daily_cap_never_exceeded(per_day, cap):
    settings = GateSettings(daily_cap=cap)
    _, decisions = run(settings, stream(3000), per_day=per_day)
    per_day_routed = {}
    for d in decisions:
        per_day_routed[d.day] = per_day_routed.get(d.day, 0) + d.needs_label
    assert max(per_day_routed.values()) == cap  # the cap binds, and is never exceeded
    assert any(d.reason == "cap_reached" for d in decisions)


def test_cap_day_follows_timezone():
    settings = GateSettings(daily_cap=1, timezone="America/New_York")
    gate = BudgetGate(settings)
    # 03:00 UTC is still the previous evening in New York
    first = gate.decide(None, datetime(2024, 3, 2, 3, tzinfo=UTC))
    assert first.day == "2024-03-01"
    gate.commit(first)
    assert gate.decide(None, datetime(2024, 3, 2, 4, tzinfo=UTC)).reason == "cap_reached"
    assert gate.decide(None, datetime(2024, 3, 2, 6, tzinfo=UTC)).reason == "cold_start"


@pytest.mark.parametrize("rate", [0.05, 0.1])
def test_exploration_rate_honoured(rate):
    n = 8000
    settings = GateSettings(exploration_rate=rate, daily_cap=10_000)
    _, decisions = run(settings, stream(n, seed=2))
    audits = sum(d.reason == "audit" for d in decisions)
    sd = math.sqrt(n * rate * (1 - rate))
    assert abs(audits - n * rate) <= 4 * sd  # 4 sigma binomial tolerance


def test_decide_has_no_side_effects():
    settings = GateSettings()
    gate, _ = run(settings, stream(700))
    before = json.dumps(gate.state_dict())
    s = {"uncertainty": 0.9, "predicted_loss": 2.0}
    first = gate.decide(s, START + timedelta(days=30))
    for _ in range(5):
        assert gate.decide(s, START + timedelta(days=30)) == first
    assert json.dumps(gate.state_dict()) == before


def test_commit_rejects_stale_decision():
    gate = BudgetGate(GateSettings())
    a = gate.decide({"uncertainty": 0.1, "predicted_loss": 0.1}, START)
    b = gate.decide({"uncertainty": 0.2, "predicted_loss": 0.2}, START)
    gate.commit(a)
    with pytest.raises(ValueError, match="sequence"):
        gate.commit(b)


def test_cold_start_routes_up_to_cap_then_stops_for_the_day():
    gate = BudgetGate(GateSettings(daily_cap=5))
    reasons = []
    for i in range(8):
        d = gate.decide(None, START + timedelta(hours=i))
        gate.commit(d)
        reasons.append((d.reason, d.needs_label))
    assert reasons == [("cold_start", True)] * 5 + [("cap_reached", False)] * 3
    next_day = gate.decide(None, START + timedelta(days=1))
    assert (next_day.reason, next_day.needs_label) == ("cold_start", True)
    assert gate.realised_rate() is None  # cold-start studies stay out of the window


def test_random_strategy_routes_at_label_rate():
    n, rate = 6000, 0.2
    settings = GateSettings(strategy="random", label_rate=rate, daily_cap=10_000)
    _, decisions = run(settings, [{}] * n)
    routed = sum(d.needs_label for d in decisions)
    assert abs(routed - n * rate) <= 4 * math.sqrt(n * rate * (1 - rate))
    assert {d.reason for d in decisions} == {"random", "not_sampled"}


def test_warmup_then_scores():
    settings = GateSettings(warmup=30, exploration_rate=0.0)
    _, decisions = run(settings, stream(100))
    assert all(d.combined is None for d in decisions[:30])
    assert all(d.combined is not None for d in decisions[30:])


@pytest.mark.parametrize("use_state_dict", [True, False])
def test_restart_restores_identical_decisions(use_state_dict):
    settings = GateSettings(window=200, warmup=20, daily_cap=30)
    scores = stream(900, seed=5)
    gate, decisions = run(settings, scores[:600])
    if use_state_dict:
        state = json.loads(json.dumps(gate.state_dict()))
        restored = BudgetGate.from_state_dict(settings, state)
    else:
        stored = [Decision.from_dict(json.loads(json.dumps(d.to_dict()))) for d in decisions]
        restored = BudgetGate.restore(settings, stored)
    for i, s in enumerate(scores[600:], start=600):
        now = START + timedelta(days=i / 100)
        a, b = gate.decide(s, now), restored.decide(s, now)
        assert a == b
        gate.commit(a)
        restored.commit(b)


@pytest.mark.parametrize(
    ("scores", "match"),
    [
        ({"uncertainty": 0.1}, "predicted_loss"),
        ({"uncertainty": math.nan, "predicted_loss": 1}, "finite"),
    ],
)
def test_bad_scores_rejected(scores, match):
    with pytest.raises(ValueError, match=match):
        BudgetGate(GateSettings()).decide(scores, START)


def test_naive_timestamp_rejected():
    with pytest.raises(ValueError, match="now"):
        BudgetGate(GateSettings()).decide(None, datetime(2024, 1, 1))


@pytest.mark.parametrize(
    "kwargs",
    [{"warmup": 600}, {"exploration_rate": 0.3}, {"uncertainty_weight": 0, "loss_weight": 0},
     {"timezone": "Mars/Olympus"}, {"label_rate": 0}, {"unknown": 1}],
)  # fmt: skip
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        GateSettings(**kwargs)


def test_skipped_reasons_never_route():
    _, decisions = run(GateSettings(daily_cap=20), stream(2000), per_day=200)
    for d in decisions:
        assert d.needs_label == (d.reason not in SKIPPED_REASONS)


def test_external_routes_count_against_the_budget_and_the_cap():
    settings = GateSettings(label_rate=0.2, daily_cap=10_000, exploration_rate=0.05)
    gate = BudgetGate(settings)
    decisions, external = [], 0
    for i, s in enumerate(stream(6000, seed=3)):
        now = START + timedelta(days=i / 1000)
        if i % 500 == 250:  # a retrain every 500 studies routes 20 coverage queries
            gate.note_routed(gate.day_of(now), 20)
            external += 20
        decision = gate.decide(s, now)
        gate.commit(decision)
        decisions.append(decision)
    offset = [d for d in decisions if d.reason == "budget_offset"]
    assert len(offset) == external  # every external route was paid back by the gate
    assert not any(d.needs_label for d in offset)
    after = decisions[settings.warmup :]
    routed = (sum(d.needs_label for d in after) + external) / len(after)
    assert abs(routed - settings.label_rate) <= 0.02
    audits = np.mean([d.reason == "audit" for d in after])
    assert abs(audits - settings.exploration_rate) < 0.015  # audits are never offset


def test_external_routes_fill_the_daily_cap():
    gate = BudgetGate(GateSettings(daily_cap=5, exploration_rate=0))
    now = START
    gate.note_routed(gate.day_of(now), 5, against_budget=False)
    assert gate.remaining_on(gate.day_of(now)) == 0
    decision = gate.decide(None, now)
    assert (decision.needs_label, decision.reason) == (False, "cap_reached")
