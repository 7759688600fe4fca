"""Strategies behind one interface."""

import subprocess
import sys

import numpy as np
import pytest

from triage.gate import GateSettings
from triage.gate.strategies import STRATEGIES, Strategy, make_strategy, midranks
from triage.model.inference import StudyResult


def result(bald=0.1, entropy=0.5, margin=0.4, loss=1.0):
    return StudyResult(
        probs=(0.3, 0.7),
        uncertainty={"entropy": entropy, "bald": bald, "variation_ratio": 0.0,
                     "least_confidence": 0.3, "margin": margin, "vote_entropy": 0.2},
        predicted_loss=loss, num_images=1, num_images_total=1,
    )  # fmt: skip


def test_registry_names():
    assert set(STRATEGIES) == {"random", "entropy", "bald", "margin", "least_confidence",
                               "vote_entropy", "consensus_entropy", "max_disagreement",
                               "badge", "alfa_mix", "emoc", "dal", "predicted_loss", "combined",
                               "auto"}
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("entropy", {"uncertainty": 0.5}),
        ("bald", {"uncertainty": 0.1}),
        ("margin", {"uncertainty": pytest.approx(0.6)}),  # 1 - margin: larger = less sure
        ("least_confidence", {"uncertainty": 0.3}),
        ("vote_entropy", {"uncertainty": 0.2}),
        ("consensus_entropy", {"uncertainty": 0.5}),  # the committee mean's entropy
        ("max_disagreement", {"uncertainty": 0.1}),  # the members' mean KL: BALD
        ("predicted_loss", {"predicted_loss": 1.0}),
        ("combined", {"uncertainty": 0.5, "predicted_loss": 1.0}),  # entropy by default
        ("random", {}),
    ],
)
def test_components_per_strategy(strategy, expected):
    strategy = make_strategy(GateSettings(strategy=strategy))
    assert strategy.components(result()) == expected
    assert set(strategy.weights) == set(expected)


def _scored(samples) -> StudyResult:
    """A one-image study's result as the scorer builds it from committee samples [T, C]."""
    from triage.model.measures import MEASURES, all_measures

    samples = np.asarray(samples, dtype=np.float64)[:, None, :]
    measures = all_measures(samples)
    return StudyResult(probs=tuple(samples.mean((0, 1))),
                       uncertainty={m: float(measures[m][0]) for m in MEASURES},
                       predicted_loss=None, num_images=1, num_images_total=1)


def test_margin_least_confidence_and_entropy_part_with_three_classes():
    """Each measure's defining preference, on two three-class studies (every committee
    member alike): a tie between the two likeliest classes (margin 0, but only 1 bit of
    entropy) against a flatter spread (margin 0.1, 1.57 bits, top class 0.4)."""
    tie, flat = _scored([[0.5, 0.5, 0.0]] * 4), _scored([[0.4, 0.3, 0.3]] * 4)
    prefer = {name: make_strategy(GateSettings(strategy=name)).score(tie)
              > make_strategy(GateSettings(strategy=name)).score(flat)
              for name in ("margin", "least_confidence", "entropy")}
    assert prefer == {"margin": True, "least_confidence": False, "entropy": False}
    skewed = _scored([[0.45, 0.45, 0.1]] * 4)  # the same tie; a top class of 0.45
    lc = make_strategy(GateSettings(strategy="least_confidence"))
    assert lc.score(flat) > lc.score(skewed) > lc.score(tie)
    # with two classes the three route alike: each is monotone in |p - 0.5|
    studies = [_scored([[p, 1 - p]] * 4) for p in (0.05, 0.3, 0.45, 0.5, 0.62, 0.9)]
    orders = {name: list(np.argsort(make_strategy(GateSettings(strategy=name)).score_pool(
        studies), kind="stable")) for name in ("margin", "least_confidence", "entropy")}
    assert orders["margin"] == orders["least_confidence"] == orders["entropy"]


def test_vote_entropy_counts_the_committees_votes_not_its_confidence():
    vote = make_strategy(GateSettings(strategy="vote_entropy"))
    unsure_but_agreed = _scored([[0.49, 0.51]] * 10)
    split = _scored([[0.9, 0.1]] * 5 + [[0.1, 0.9]] * 5)
    barely_split = _scored([[0.51, 0.49]] * 5 + [[0.49, 0.51]] * 5)
    assert vote.score(unsure_but_agreed) == 0.0  # all members agree: no disagreement
    assert vote.score(split) == pytest.approx(1.0) == vote.score(barely_split)
    lopsided = _scored([[0.95, 0.05]] * 6 + [[0.4, 0.6]] * 4)  # votes 6:4, mean 0.73
    assert vote.score(lopsided) == pytest.approx(0.971, abs=1e-3)
    entropy = make_strategy(GateSettings(strategy="entropy"))
    assert entropy.score(unsure_but_agreed) > entropy.score(lopsided)  # entropy: the opposite


def test_combined_margin_is_oriented_as_uncertainty():
    strategy = make_strategy(GateSettings(uncertainty_measure="margin"))
    assert strategy.components(result(margin=0.1))["uncertainty"] == pytest.approx(0.9)


def test_predicted_loss_requires_loss_predictor():
    with pytest.raises(ValueError, match="predicted_loss"):
        make_strategy(GateSettings(strategy="predicted_loss")).score(result(loss=None))


def test_score_ranks_by_component():
    strategy = make_strategy(GateSettings(strategy="bald"))
    assert strategy.score(result(bald=0.3)) > strategy.score(result(bald=0.1))


def test_score_pool_is_scale_free():
    strategy = make_strategy(GateSettings(uncertainty_measure="bald"))
    pool = [result(bald=b, loss=1000 * rank) for b, rank in [(0.1, 3), (0.2, 2), (0.3, 1)]]
    # equal weights on opposite orders: every study ties
    np.testing.assert_allclose(strategy.score_pool(pool), [0.5, 0.5, 0.5])


def test_midranks_average_ties():
    np.testing.assert_allclose(midranks(np.array([3.0, 1.0, 1.0, 2.0])), [0.875, 0.25, 0.25, 0.625])


def test_random_is_seeded():
    a = make_strategy(GateSettings(strategy="random", seed=3))
    b = make_strategy(GateSettings(strategy="random", seed=3))
    assert [a.score(result()) for _ in range(5)] == [b.score(result()) for _ in range(5)]


def test_unknown_strategy_rejected():
    with pytest.raises(ValueError, match="strategy"):
        GateSettings(strategy="committee")


def test_budget_manager_defaults_to_the_strategys_own():
    assert GateSettings(strategy="random").manager == "coin"
    assert GateSettings(strategy="combined").manager == "quantile"
    assert GateSettings(strategy="entropy", budget_manager="coin").manager == "coin"


def test_bad_budget_manager_names_the_key():
    with pytest.raises(ValueError, match="budget_manager must be one of"):
        GateSettings(budget_manager="greedy")
    with pytest.raises(ValueError, match="random.*gives none"):
        GateSettings(strategy="random", budget_manager="quantile")


def test_gate_settings_load_without_torch():
    """`triage.config` (hence the CLI's config check) must not pay for importing torch."""
    code = "import sys, triage.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
