"""Uncertainty measures: reference values, limits and torch/numpy agreement."""

import math

import numpy as np
import pytest
import torch

from triage.model.measures import (
    all_measures,
    bald,
    least_confidence,
    margin,
    predictive_entropy,
    variation_ratio,
    vote_entropy,
)

ROWS = [
    # probs, least confidence, margin, entropy (bits)
    ((0.2, 0.6, 0.2), 0.40, 0.40, 1.371),
    ((0.9, 0.05, 0.05), 0.10, 0.85, 0.569),
    ((0.05, 0.3, 0.65), 0.35, 0.35, 1.141),
]


@pytest.mark.parametrize("as_tensor", [True, False], ids=["torch", "numpy"])
@pytest.mark.parametrize(("probs", "lc", "mg", "ent"), ROWS)
def test_reference_rows(probs, lc, mg, ent, as_tensor):
    p = torch.tensor(probs, dtype=torch.float64) if as_tensor else np.array(probs)
    assert float(least_confidence(p)) == pytest.approx(lc, abs=1e-9)
    assert float(margin(p)) == pytest.approx(mg, abs=1e-9)
    assert float(predictive_entropy(p)) == pytest.approx(ent, abs=5e-4)


def test_rows_vectorised_over_batch():
    p = torch.tensor([r[0] for r in ROWS], dtype=torch.float64)
    np.testing.assert_allclose(least_confidence(p).numpy(), [0.40, 0.10, 0.35], atol=1e-9)
    np.testing.assert_allclose(margin(p).numpy(), [0.40, 0.85, 0.35], atol=1e-9)
    np.testing.assert_allclose(predictive_entropy(p).numpy(), [1.371, 0.569, 1.141], atol=5e-4)


@pytest.mark.parametrize(
    ("probs", "entropy_bits"),
    [((0.5, 0.5), 1.0), ((0.25,) * 4, 2.0), ((1.0, 0.0), 0.0), ((0.0, 1.0, 0.0), 0.0)],
)
def test_entropy_limits(probs, entropy_bits):
    assert float(predictive_entropy(np.array(probs))) == pytest.approx(entropy_bits, abs=1e-9)


def test_bald_zero_when_samples_agree():
    p = torch.tensor([0.3, 0.7]).expand(20, 5, 2)
    assert torch.allclose(bald(p), torch.zeros(5), atol=1e-6)
    assert torch.equal(variation_ratio(p), torch.zeros(5))


def test_bald_maximal_for_confident_disagreement():
    # half the samples say class 0 with certainty, half class 1: 1 bit of mutual information
    p = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]).repeat(10, 1, 1)
    assert float(bald(p)[0]) == pytest.approx(1.0, abs=1e-6)
    assert float(variation_ratio(p)[0]) == pytest.approx(0.5)


def test_bald_is_entropy_minus_expected_entropy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1.0, 1.0, 1.0], size=(20, 4))
    expected = predictive_entropy(p.mean(0)) - predictive_entropy(p).mean(0)
    np.testing.assert_allclose(bald(p), expected, atol=1e-12)
    assert (bald(p) >= 0).all()
    assert (bald(p) <= predictive_entropy(p.mean(0)) + 1e-12).all()


def test_variation_ratio_counts_votes():
    votes = [0, 0, 0, 1, 2]  # modal class 0 has 3 of 5 votes
    p = torch.nn.functional.one_hot(torch.tensor(votes), 3).float()[:, None, :] * 0.8 + 0.2 / 3
    assert float(variation_ratio(p)[0]) == pytest.approx(0.4)


def test_vote_entropy_is_the_entropy_of_the_votes():
    votes = [0, 0, 0, 1, 2, 2]  # shares 1/2, 1/6, 1/3
    p = torch.nn.functional.one_hot(torch.tensor(votes), 3).float()[:, None, :] * 0.6 + 0.4 / 3
    expected = -sum(s * math.log2(s) for s in (1 / 2, 1 / 6, 1 / 3))
    assert float(vote_entropy(p)[0]) == pytest.approx(expected)
    assert float(vote_entropy(p.numpy())[0]) == pytest.approx(expected)
    assert torch.equal(vote_entropy(torch.tensor([0.4, 0.6]).expand(7, 3, 2)), torch.zeros(3))


def test_the_committee_measures_that_are_entropy_and_bald():
    """With the MC samples as the committee, consensus entropy (the entropy of the
    members' mean) is `entropy`, and the members' mean KL divergence from that mean
    (maximum disagreement, McCallum & Nigam 1998) is `bald`."""
    rng = np.random.default_rng(2)
    p = rng.dirichlet([0.7, 0.7, 0.7], size=(15, 8))
    consensus = p.mean(0)
    kl = (p * (np.log2(p) - np.log2(consensus))).sum(-1).mean(0)
    measures = all_measures(p)
    np.testing.assert_allclose(measures["bald"], kl, atol=1e-12)
    np.testing.assert_allclose(measures["entropy"], predictive_entropy(consensus), atol=1e-12)


def test_all_measures_match_torch_and_numpy():
    rng = np.random.default_rng(1)
    p = rng.dirichlet([0.5, 0.5], size=(20, 6))
    via_numpy = all_measures(p)
    via_torch = all_measures(torch.from_numpy(p))
    for name, value in via_numpy.items():
        assert value.shape == (6,)
        np.testing.assert_allclose(value, via_torch[name].numpy(), atol=1e-9, err_msg=name)
    assert via_numpy["entropy"].max() <= 1.0 + 1e-9 and math.isfinite(via_numpy["bald"].sum())


@pytest.mark.parametrize(
    ("function", "value"),
    [(predictive_entropy, np.array([1.0])), (bald, np.array([0.5, 0.5])), (margin, [0.5, 0.5])],
)
def test_bad_shapes_or_types_are_rejected(function, value):
    with pytest.raises((ValueError, TypeError)):
        function(value)
