"""Farthest-first centres chosen among the inliers: k-center with outliers finds the
outliers, k-Center-Greedy picks the centres from the rest (coverage queries and the
coverage cells of the training sample both use it)."""

from __future__ import annotations

import numpy as np
import torch

from triage.coreset.greedy import k_center_greedy
from triage.coreset.outliers import k_center_with_outliers


def robust_centres(
    features: torch.Tensor, fixed: list[int], k: int, outlier_fraction: float, seed: int = 0
) -> tuple[np.ndarray, float]:
    """k farthest-first centres (besides the `fixed` ones) chosen among the inliers.

    The outliers are the ``outlier_fraction`` of the non-fixed points that k-center with
    outliers leaves uncovered; they can be neither centres nor count for the radius.

    Args:
        features: Points [N, F].
        fixed: Indices of existing centres (labelled studies), never picked.
        k: Centres to pick, at most the number of non-fixed points.
        outlier_fraction: Share of the non-fixed points that may be outliers, in [0, 1).
        seed: Seeds the first centre when `fixed` is empty.

    Returns:
        (indices into `features` of the new centres in pick order, the coverage radius of
        the inliers).
    """
    if not 0 <= outlier_fraction < 1:
        raise ValueError(f"outlier_fraction must lie in [0, 1), got {outlier_fraction}")
    free = features.shape[0] - len(fixed)
    z = min(int(outlier_fraction * free), free - k)
    outliers: set[int] = set()
    if z > 0:
        robust = k_center_with_outliers(features, fixed, k, z, seed=seed)
        outliers = {int(i) for i in robust.outliers}
    keep = [i for i in range(features.shape[0]) if i not in outliers]
    position = {index: j for j, index in enumerate(keep)}
    greedy = k_center_greedy(features[keep], [position[i] for i in fixed], k, seed=seed)
    return np.array([keep[int(j)] for j in greedy.indices], dtype=np.int64), greedy.radius
