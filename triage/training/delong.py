"""Paired comparison of two AUROCs on the same studies (DeLong et al., Biometrics 1988).

A validation set of audit labels is small (15 studies at the first model, about 100 by
the end of a 4,690-study stream at a 10% budget), so two models' AUROCs on it differ by
a few hundredths by chance alone. `paired_auroc_difference` gives the difference and
its standard error from DeLong's structural components, which account for both models
being scored on the same studies; `retrain.promotion_test: delong` uses it so that a
candidate is rejected only when it is worse beyond that noise.

Written by hand: no maintained dependency of this project provides it (scikit-learn
and scipy are not dependencies), and it is twenty lines of numpy.
"""

from __future__ import annotations

import math

import numpy as np


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x` [N] with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.shape[0])
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def _components(scores: np.ndarray, positive: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's placement values V10 [m] (positives) and V01 [n] (negatives)."""
    pos, neg = scores[positive], scores[~positive]
    m, n = pos.shape[0], neg.shape[0]
    all_ranks = _midranks(np.concatenate([pos, neg]))
    pos_ranks, neg_ranks = _midranks(pos), _midranks(neg)
    v10 = (all_ranks[:m] - pos_ranks) / n
    v01 = 1.0 - (all_ranks[m:] - neg_ranks) / m
    return float(v10.mean()), v10, v01


def paired_auroc_difference(
    scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray
) -> tuple[float, float]:
    """AUROC(a) - AUROC(b) on the same studies, and its DeLong standard error.

    Args:
        scores_a: Scores of model a [N] (larger = more likely positive).
        scores_b: Scores of model b [N] for the same studies.
        labels: Binary labels [N].

    Returns:
        (difference, standard error); the error is NaN unless each class holds at least
        two studies.
    """
    a = np.asarray(scores_a, dtype=np.float64).reshape(-1)
    b = np.asarray(scores_b, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if not a.shape == b.shape == y.shape:
        raise ValueError(f"scores_a, scores_b and labels must have one length, got "
                         f"{a.size}, {b.size}, {y.size}")
    m, n = int(y.sum()), int((~y).sum())
    if m < 1 or n < 1:
        raise ValueError("labels must hold both classes")
    auc_a, v10_a, v01_a = _components(a, y)
    auc_b, v10_b, v01_b = _components(b, y)
    if m < 2 or n < 2:
        return auc_a - auc_b, math.nan
    s10 = np.cov(np.stack([v10_a, v10_b]))
    s01 = np.cov(np.stack([v01_a, v01_b]))
    variance = ((s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m
                + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n)
    return auc_a - auc_b, math.sqrt(max(variance, 0.0))
