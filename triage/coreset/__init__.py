"""Pool-based core-set selection (Sener & Savarese, ICLR 2018) for choosing studies to label.

* :func:`k_center_greedy`: k-Center-Greedy, 2-approximate k-center, O(n*d) memory.
* :func:`k_center_with_outliers`: Charikar et al. (2001) 3-approximate k-center with outliers.
* :func:`coverage_weights`: inverse cell-size weights to rebalance the labeled set.
* :func:`robust_centres`: farthest-first centres among the inliers (outliers left out).

Pure algorithms on feature tensors: imports nothing else from triage.
"""

from triage.coreset.greedy import CoresetResult, k_center_greedy
from triage.coreset.outliers import RobustCoresetResult, k_center_with_outliers
from triage.coreset.robust import robust_centres
from triage.coreset.weights import coverage_weights

__all__ = [
    "CoresetResult",
    "RobustCoresetResult",
    "coverage_weights",
    "k_center_greedy",
    "k_center_with_outliers",
    "robust_centres",
]
