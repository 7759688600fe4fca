"""Coverage-weighted sampling of the labelled training set (core-set rebalancing).

The labelled set inherits the stream's skew. Each epoch draws its sample with
`triage.coreset.coverage_weights`: the training images are split into k-center cells in
the serving model's embedding space and each cell gets the same mass, so dense regions
(the common finding) are drawn less and sparse ones (rare findings) more.

Plain farthest-first puts its first centres on the most exotic points, and each such
singleton cell then gets a whole cell's mass (in one replay outliers drew 23.8% of the
training draws). So the outliers are found first, by k-center with outliers (Charikar et
al. 2001, `triage.coreset.k_center_with_outliers`): the `outlier_fraction` of points it
leaves uncovered take no part in the centre choice and join the cell of their nearest
centre. The centres themselves come from k-Center-Greedy on the other points: Charikar's
disks follow density (a dense common finding would take most cells), farthest-first
follows spread, which is what gives a small distinct cluster its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from triage.coreset import coverage_weights, robust_centres


@dataclass(frozen=True)
class CoveragePlan:
    """Sampling weights of the training images and what they do to the class mix.

    Attributes:
        weights: Probability of each training image, float64 [N], summing to 1.
        radius: Coverage radius of the cell centres: the largest Euclidean distance of a
            training image to its nearest centre, in embedding units.
        n_cells: Number of k-center cells.
        mix_before: Share of each class among the training images (raw skew).
        mix_after: Expected share of each class under `weights`.
    """

    weights: np.ndarray
    radius: float
    n_cells: int
    mix_before: dict[str, float]
    mix_after: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return {"radius": self.radius, "cells": self.n_cells,
                "class_mix_before": self.mix_before, "class_mix_after": self.mix_after}


def class_mix(labels: torch.Tensor, weights: np.ndarray | None, class_names: list[str]
              ) -> dict[str, float]:
    """Share of each class among `labels` [N], optionally weighted by `weights` [N]."""
    y = labels.numpy()
    w = np.ones(y.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    return {name: float(w[y == c].sum() / total) if total > 0 else 0.0
            for c, name in enumerate(class_names)}


def coverage_plan(
    features: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    *,
    n_cells: int | None = None,
    power: float = 1.0,
    outlier_fraction: float = 0.02,
    seed: int = 0,
) -> CoveragePlan:
    """k-center cells of the training embeddings and their coverage weights.

    Args:
        features: Embeddings of the training images, [N, F] (N >= 1).
        labels: Their class indices, torch.long [N].
        class_names: Class names, in index order.
        n_cells: Number of cells (default ceil(sqrt(N))), clipped to [1, N].
        power: Exponent of `coverage_weights`.
        outlier_fraction: Share of the images, the farthest from every centre, that may
            not become centres (they join their nearest centre's cell).
        seed: Seeds the summary's first centre (large sets).
    """
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or features.shape[0] < 1:
        raise ValueError(
            f"features must be [N, F] with N = len(labels) >= 1, got {tuple(features.shape)}"
        )
    n = features.shape[0]
    cells = min(max(1, n_cells if n_cells is not None else math.ceil(math.sqrt(n))), n)
    if not 0 <= outlier_fraction < 1:
        raise ValueError(f"outlier_fraction must lie in [0, 1), got {outlier_fraction}")
    centres, radius = robust_centres(features, [], cells, outlier_fraction, seed=seed)
    weights = coverage_weights(features, centres, power=power)
    return CoveragePlan(
        weights=weights, radius=radius, n_cells=cells,
        mix_before=class_mix(labels, None, class_names),
        mix_after=class_mix(labels, weights, class_names),
    )


def draw(weights: np.ndarray, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` indices drawn with replacement with probabilities `weights` [N]."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return torch.multinomial(torch.from_numpy(weights), size, replacement=True,
                             generator=generator)
