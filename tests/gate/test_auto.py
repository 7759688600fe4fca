"""`gate.strategy: auto`: the expert draw, the budget under any mix, the mix from audits."""

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from triage.gate import BudgetGate, GateSettings
from triage.gate.strategies import AuditOutcome, audit_mix, make_strategy
from triage.gate.strategies.auto import LOSS_CAP, expert_rewards

START = datetime(2024, 3, 1, tzinfo=UTC)
CANDIDATES = ("combined", "entropy", "bald")
# the components `auto` gives with these candidates: every candidate's, prefixed
KEYS = ("combined.uncertainty", "combined.predicted_loss", "entropy.uncertainty",
        "bald.uncertainty")


def auto_settings(**kwargs) -> GateSettings:
    return GateSettings(strategy="auto", auto_strategies=CANDIDATES, daily_cap=10_000,
                        **kwargs)


def score_stream(n: int, seed: int = 0) -> list[dict[str, float]]:
    """Independent raw scores for every component: the candidates rank differently."""
    rng = np.random.default_rng(seed)
    values = rng.random((n, len(KEYS)))
    return [dict(zip(KEYS, map(float, row), strict=True)) for row in values]


def run(gate: BudgetGate, scores: list[dict[str, float]]):
    decisions = []
    for i, s in enumerate(scores):
        decision = gate.decide(s, START + timedelta(minutes=i), key=i)
        gate.commit(decision)
        decisions.append(decision)
    return decisions


@pytest.mark.parametrize("expert", CANDIDATES)
def test_a_mix_on_one_candidate_decides_exactly_as_that_strategy(expert):
    scores = score_stream(1500)
    gate = BudgetGate(auto_settings(label_rate=0.15))
    gate.set_mix({name: float(name == expert) for name in CANDIDATES})
    auto = run(gate, scores)
    prefix = f"{expert}."
    alone = run(BudgetGate(GateSettings(strategy=expert, daily_cap=10_000, label_rate=0.15)),
                [{k[len(prefix):]: v for k, v in s.items() if k.startswith(prefix)}
                 for s in scores])
    assert [d.needs_label for d in auto] == [d.needs_label for d in alone]
    assert [d.reason for d in auto] == [d.reason for d in alone]
    assert [d.combined for d in auto] == pytest.approx([d.combined for d in alone])
    ranked = [d for d in auto if d.combined is not None]
    assert ranked and {d.expert for d in ranked} == {expert}


@pytest.mark.parametrize("mix", [None, {"combined": 0.7, "entropy": 0.2, "bald": 0.1}])
def test_any_mix_keeps_the_label_rate_and_draws_experts_by_the_mix(mix):
    gate = BudgetGate(auto_settings(label_rate=0.1))
    if mix is not None:
        gate.set_mix(mix)
    decisions = run(gate, score_stream(6000, seed=1))
    after = decisions[gate.settings.warmup :]
    assert abs(np.mean([d.needs_label for d in after]) - 0.1) <= 0.015
    drawn = [d.expert for d in after if d.reason != "audit"]
    expected = mix or dict.fromkeys(CANDIDATES, 1 / 3)
    for name, p in expected.items():
        assert abs(drawn.count(name) / len(drawn) - p) <= 0.03, name
    audits = [d for d in after if d.reason == "audit"]
    # audits come first and at their own rate, whatever the mix
    assert abs(len(audits) / len(after) - gate.settings.exploration_rate) <= 0.01
    # an audit keeps every component's quantile (its reward) and no expert
    assert audits and all(d.expert is None and set(d.quantiles) == set(KEYS) for d in audits)


def test_the_expert_draw_is_reproducible():
    scores = score_stream(800, seed=2)
    first, second = (run(BudgetGate(auto_settings(label_rate=0.2)), scores) for _ in range(2))
    assert [d.to_dict() for d in first] == [d.to_dict() for d in second]


def test_other_strategies_have_no_mix():
    gate = BudgetGate(GateSettings(strategy="combined"))
    assert gate.mix is None
    with pytest.raises(ValueError, match="has no mix"):
        gate.set_mix({"combined": 1.0})


@pytest.mark.parametrize(("mix", "match"), [
    ({"combined": 1.0}, "mix must give"),
    ({"combined": 1.0, "entropy": -1.0, "bald": 0.0}, "non-negative"),
    ({"combined": 0.0, "entropy": 0.0, "bald": 0.0}, "not all 0"),
    ({"combined": math.nan, "entropy": 1.0, "bald": 0.0}, "finite"),
])  # fmt: skip
def test_bad_mixes_are_refused(mix, match):
    with pytest.raises(ValueError, match=match):
        BudgetGate(auto_settings()).set_mix(mix)


@pytest.mark.parametrize(("candidates", "match"), [
    (("combined",), "two or more"),
    (("combined", "combined"), "two or more"),
    (("combined", "random"), "must be taken from"),
    (("combined", "dal"), "must be taken from"),
    (("combined", "auto"), "must be taken from"),
    (("combined", "nope"), "must be taken from"),
])  # fmt: skip
def test_bad_candidates_are_refused(candidates, match):
    with pytest.raises(ValidationError, match=f"auto_strategies.*{match}|{match}"):
        GateSettings(strategy="auto", auto_strategies=candidates)


# ---- the mix from the audits -------------------------------------------------------------


EXPERTS = {"a": {"a.x": 1.0}, "b": {"b.x": 1.0}}


def test_without_two_audits_the_mix_is_uniform():
    assert audit_mix(EXPERTS, []) == {"a": 0.5, "b": 0.5}
    assert audit_mix(EXPERTS, [AuditOutcome({"a.x": 0.9, "b.x": 0.1}, 0.01)]) == {
        "a": 0.5, "b": 0.5}
    strategy = make_strategy(auto_settings())
    assert strategy.mix([]) == pytest.approx(dict.fromkeys(CANDIDATES, 1 / 3))


def test_rewards_are_the_clipped_loss_times_each_experts_quantile():
    outcomes = [AuditOutcome({"a.x": 0.9, "b.x": 0.2}, 0.05),
                AuditOutcome({"a.x": 0.8, "b.x": 0.1}, 0.3),
                AuditOutcome({"a.x": 0.1, "b.x": 0.9}, 1e-9)]
    losses = [min(-math.log(p), LOSS_CAP) / LOSS_CAP for p in (0.05, 0.3, 1e-9)]
    assert losses[2] == 1.0  # a confident miss counts as much as any worse one
    expected = [[0.9 * losses[0], 0.2 * losses[0]], [0.8 * losses[1], 0.1 * losses[1]],
                [0.1, 0.9]]
    assert expert_rewards(EXPERTS, outcomes) == pytest.approx(np.array(expected))
    # a candidate of several components is rewarded by its weighted quantile
    two = {"c": {"c.x": 3.0, "c.y": 1.0}, "a": {"a.x": 1.0}}
    rewards = expert_rewards(two, [AuditOutcome({"c.x": 0.2, "c.y": 1.0, "a.x": 0.5}, 0.5)])
    loss = math.log(2) / LOSS_CAP
    assert rewards == pytest.approx(np.array([[loss * (0.6 + 1.0) / 4, loss * 0.5]]))


def test_the_mix_is_the_probability_of_being_best_under_the_normal_approximation():
    rng = np.random.default_rng(3)
    outcomes = [AuditOutcome({"a.x": float(a), "b.x": float(b)}, float(p))
                for a, b, p in zip(rng.random(40), rng.random(40), rng.uniform(0.05, 1, 40),
                                   strict=True)]
    rewards = expert_rewards(EXPERTS, outcomes)
    difference = rewards[:, 0] - rewards[:, 1]
    z = difference.mean() / (difference.std(ddof=1) / math.sqrt(len(difference)))
    normal_cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))  # P(mean_a - mean_b > 0)
    assert audit_mix(EXPERTS, outcomes)["a"] == pytest.approx(normal_cdf, abs=0.01)


def test_the_expert_that_ranks_the_models_misses_high_takes_the_mix_as_audits_accumulate():
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(300):
        wrong = rng.random() < 0.2  # the model misses one study in five
        p = rng.uniform(0.01, 0.4) if wrong else rng.uniform(0.7, 1.0)
        # a ranks misses higher (a noisy but informative score), b at random
        a = float(np.clip(rng.normal(0.7 if wrong else 0.4, 0.2), 0, 1))
        outcomes.append(AuditOutcome({"a.x": a, "b.x": float(rng.random())}, p))
    shares = [audit_mix(EXPERTS, outcomes[:n])["a"] for n in (5, 300)]
    assert shares[1] > 0.99 and shares[0] < shares[1]


def test_identical_experts_share_their_part_and_the_mix_is_reproducible():
    rng = np.random.default_rng(1)
    same = {"a": {"a.x": 1.0}, "a2": {"a2.x": 1.0}, "b": {"b.x": 1.0}}
    outcomes = []
    for a, b, p in zip(rng.random(60), rng.random(60), rng.uniform(0.05, 1, 60), strict=True):
        outcomes.append(AuditOutcome({"a.x": float(a), "a2.x": float(a), "b.x": float(b)},
                                     float(p)))
    mix = audit_mix(same, outcomes)
    assert mix["a"] == pytest.approx(mix["a2"]) and sum(mix.values()) == pytest.approx(1)
    assert audit_mix(same, outcomes) == mix


def test_outcomes_without_every_experts_quantile_are_not_counted():
    counted = [AuditOutcome({"a.x": 0.9, "b.x": 0.1}, 0.1),
               AuditOutcome({"a.x": 0.3, "b.x": 0.5}, 0.9)]
    partial = [AuditOutcome({"a.x": 0.1}, 0.01)] * 5  # e.g. decided under other candidates
    assert expert_rewards(EXPERTS, counted + partial).shape == (2, 2)
    assert audit_mix(EXPERTS, counted + partial) == audit_mix(EXPERTS, counted)


@pytest.mark.parametrize(("p", "loss"), [(1.0, 0.0), (0.0, 1.0), (1e-9, 1.0), (0.5, None)])
def test_audit_loss_is_clipped_cross_entropy(p, loss):
    expected = math.log(2) / LOSS_CAP if loss is None else loss
    assert AuditOutcome({}, p).loss == pytest.approx(expected)


def test_why_names_the_candidate_that_ranked_a_study(tmp_path):
    """A reader asking why a study was routed under `auto` learns which candidate's
    ranking routed it (stored with the decision as `expert`)."""
    import json as json_

    import torch
    from training.conftest import Store, make_settings

    from triage.review.queue import explain

    st = Store(make_settings(tmp_path))
    ranked, plain = (st.add_study(torch.zeros(1, 1, 8, 8)) for _ in range(2))
    st.enqueue(ranked, reason="emoc")
    st.enqueue(plain, reason="uncertainty")
    st.db.execute("UPDATE decisions SET decision = ? WHERE study_id = ?",
                  [json_.dumps({"expert": "emoc"}), ranked])
    why = explain(st.db, ranked)
    assert why["expert"] == "emoc"
    assert why["explanation"] == ("its label would change the model's outputs most (expected "
                                  "output change); ranked by emoc, drawn from the gate's auto mix")
    assert explain(st.db, plain)["expert"] is None
    assert "auto mix" not in explain(st.db, plain)["explanation"]
