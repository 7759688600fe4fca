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
                     "least_confidence": 0.3, "margin": margin},
        predicted_loss=loss, num_images=1, num_images_total=1,
    )  # fmt: skip


def test_registry_names():
    assert set(STRATEGIES) == {"random", "entropy", "bald", "predicted_loss", "combined"}
    for name, cls in STRATEGIES.items():
        assert issubclass(cls, Strategy) and cls.name == name


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("entropy", {"uncertainty": 0.5}),
        ("bald", {"uncertainty": 0.1}),
        ("predicted_loss", {"predicted_loss": 1.0}),
        ("combined", {"uncertainty": 0.5, "predicted_loss": 1.0}),  # entropy by default
        ("random", {}),
    ],
)
def test_components_per_strategy(strategy, expected):
    strategy = make_strategy(GateSettings(strategy=strategy))
    assert strategy.components(result()) == expected
    assert set(strategy.weights) == set(expected)


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
