"""DeLong's paired AUROC comparison and the promotion rule that uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from triage.model.registry import promotion_decision
from triage.model.training import auroc
from triage.training.delong import paired_auroc_difference


def _scores(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    return y, y + rng.normal(0, 1.0, n), y + rng.normal(0, 1.5, n)


def test_difference_is_the_auroc_difference_and_the_error_matches_a_bootstrap():
    y, a, b = _scores(0)
    diff, se = paired_auroc_difference(a, b, y)
    assert diff == pytest.approx(auroc(a, y) - auroc(b, y))
    rng = np.random.default_rng(1)
    boot = []
    for _ in range(1500):
        i = rng.integers(0, y.size, y.size)
        boot.append(auroc(a[i], y[i]) - auroc(b[i], y[i]))
    assert se == pytest.approx(np.std(boot), rel=0.15)


def test_pairing_shrinks_the_error_of_two_similar_models():
    y, a, _ = _scores(2)
    nudged = a + np.random.default_rng(3).normal(0, 0.05, a.size)
    _, paired = paired_auroc_difference(a, nudged, y)
    assert paired < 0.01  # unpaired errors of two AUROCs on 300 studies are ~0.03 each
    assert paired_auroc_difference(a, a, y) == (0.0, 0.0)


def test_too_few_studies_of_a_class_give_no_error_estimate():
    diff, se = paired_auroc_difference([0.1, 0.9, 0.8], [0.2, 0.7, 0.9], [0, 1, 1])
    assert math.isnan(se) and diff == pytest.approx(0.0)
    with pytest.raises(ValueError, match="both classes"):
        paired_auroc_difference([0.1, 0.2], [0.3, 0.4], [1, 1])


@pytest.mark.parametrize(("auroc_value", "noise", "promoted"), [
    (0.95, 0.0, False),   # 0.95 < 0.98 - 0.01
    (0.95, 0.03, True),   # within tolerance + noise
    (0.93, 0.03, False),  # worse beyond the noise too
])
def test_promotion_allows_the_validation_noise(auroc_value, noise, promoted):
    candidate = {"auroc": auroc_value, "accuracy": 0.9, "sensitivity": 0.9,
                 "specificity": 0.9, "ece": 0.05}
    ok, reason = promotion_decision(candidate, {"auroc": 0.98}, 0.01, noise)
    assert ok is promoted
    assert ("noise" in reason) is (noise > 0)
