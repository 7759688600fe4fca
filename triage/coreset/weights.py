"""Coverage weights for rebalancing the labeled set during retraining.

The labeled set inherits the skew of the incoming stream (many common findings, few rare ones).
Partitioning it into k-center cells and weighting every point by ``1 / |cell| ** power`` gives
each cell the same total mass at ``power = 1``: a draw then picks a region of feature space
uniformly and a study within it uniformly, so dense regions are downweighted. Farthest-first
cells follow the spread of the data, not its density, so a small but distinct cluster gets
about as many cells as a large one of similar spread.

Example (one epoch of indices)::

    w = coverage_weights(labeled_features)
    g = torch.Generator().manual_seed(epoch)
    idx = torch.multinomial(torch.from_numpy(w), len(w), replacement=True, generator=g)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from triage.coreset._dist import (
    DEFAULT_CHUNK_SIZE,
    as_features,
    as_indices,
    check_count,
    sq_norms,
)
from triage.coreset.greedy import greedy_core, k_center_greedy


def coverage_weights(
    features: torch.Tensor | np.ndarray,
    centres: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    *,
    n_cells: int | None = None,
    power: float = 1.0,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Sampling probabilities for the labeled set, inversely proportional to cell size.

    Args:
        features: Embeddings of the labeled set, ``[m, d]``.
        centres: Optional indices into ``features`` of the cell centres, ``[c]``; by default
            they are ``n_cells`` points chosen by :func:`k_center_greedy` with ``seed``.
        n_cells: Number of cells when ``centres`` is None, ``1 <= n_cells <= m``; default
            ``ceil(sqrt(m))``. Must be None when ``centres`` is given.
        power: Exponent ``p >= 0`` in ``|cell| ** -p``; 0 gives uniform weights, 1 equal mass
            per cell.
        seed: Seeds the first centre of the default cells.
        chunk_size: Rows per distance block.
        dtype: ``torch.float32`` or ``torch.float64``.
        device: Device for the computation.

    Returns:
        float64 ``[m]``, positive, summing to 1. Each point belongs to its nearest centre's cell
        (earliest centre on ties).

    Raises:
        ValueError: On bad inputs; the message names the parameter.
    """
    x = as_features(features, dtype, device)
    m = x.shape[0]
    if not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
        raise ValueError(f"power must be a finite number >= 0, got {power!r}")
    if centres is None:
        if n_cells is None:
            n_cells = math.ceil(math.sqrt(m))
        check_count(n_cells, "n_cells", m, "len(features)")
        if n_cells < 1:
            raise ValueError(f"n_cells must be >= 1, got {n_cells}")
        res = k_center_greedy(x, [], int(n_cells), seed=seed, chunk_size=chunk_size,
                              dtype=dtype, device=device)
        assign = torch.from_numpy(res.assignment)
    else:
        if n_cells is not None:
            raise ValueError("n_cells must be None when centres is given")
        cen = as_indices(centres, m, "centres")
        if cen.size == 0:
            raise ValueError("centres must be non-empty")
        x_sq = sq_norms(x)
        assign = greedy_core(x, x_sq, cen, 0, -1, chunk_size)[3].cpu()
    sizes = torch.bincount(assign, minlength=m).double()
    w = sizes[assign].pow(-float(power))
    return (w / w.sum()).numpy()
