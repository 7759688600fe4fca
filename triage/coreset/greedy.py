"""k-Center-Greedy core-set selection (Sener & Savarese, ICLR 2018, Algorithm 1).

The greedy repeatedly adds the point farthest from its nearest centre; its coverage radius is
at most twice the optimal k-center radius (Gonzalez 1985). Exact implementation notes:

* Memory is O(n*d): an incremental vector of squared distances to the nearest centre and the
  index of that centre, never an ``n x n`` matrix.
* Distances are chunked matrix products ``||a||^2 + ||b||^2 - 2 a.b`` clamped at 0.
* The naive loop reads all of ``features`` once per pick (memory-bandwidth bound). Instead,
  new centres are buffered and folded into the distance vector by one blocked matrix product
  every ``_BLOCK`` picks. Between those refreshes the stale vector is an *upper bound* on each
  point's true distance, so the exact argmax is found lazily: points are visited in decreasing
  order of their bound and updated against the buffered centres until the best exact value
  strictly exceeds every unvisited bound. The picks are exactly those of the naive loop (up to
  floating-point rounding of individual distances).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from triage.coreset._dist import (
    DEFAULT_CHUNK_SIZE,
    as_features,
    as_indices,
    check_chunk_size,
    check_count,
    sq_dists,
    sq_norms,
    update_min,
)

_BLOCK = 128  # buffered centres per refresh pass over all points
_GROW = 512  # minimum lazy-prefix extension (rows)


@dataclass(frozen=True)
class CoresetResult:
    """Outcome of a k-center selection.

    Attributes:
        indices: Selected point indices, int64 ``[k]``, in pick order.
        radius: Coverage radius: max over all points of the Euclidean distance to the nearest
            centre (``labeled`` plus ``indices``), in feature units; ``inf`` if no centre.
        pick_distances: Euclidean distance of each pick to its nearest centre at the moment it
            was picked, float64 ``[k]`` (non-increasing; ``inf`` for a seeded first pick).
        min_distances: Per-point Euclidean distance to the nearest centre after selection,
            float64 ``[n]``.
        assignment: Per-point index (into ``features``) of that nearest centre, int64 ``[n]``
            (the earliest centre on ties; ``-1`` if there is no centre).
    """

    indices: np.ndarray
    radius: float
    pick_distances: np.ndarray
    min_distances: np.ndarray
    assignment: np.ndarray


def k_center_greedy(
    features: torch.Tensor | np.ndarray,
    labeled: Sequence[int] | np.ndarray | torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> CoresetResult:
    """Selects ``k`` points by k-Center-Greedy (farthest-first traversal).

    Args:
        features: Embeddings, Tensor or ndarray ``[n, d]``.
        labeled: Indices already labeled, ``[m]``; they act as existing centres and are never
            selected. May be empty.
        k: Number of points to select, ``0 <= k <= n - m``.
        seed: Only used when ``labeled`` is empty: the first centre is
            ``numpy.random.default_rng(seed).integers(n)``.
        chunk_size: Rows per distance block; peak extra memory is about
            ``chunk_size * 128`` floats.
        dtype: Computation dtype, ``torch.float32`` or ``torch.float64``.
        device: Device for the computation; ``None`` keeps a tensor's device (CPU for ndarrays).

    Returns:
        A :class:`CoresetResult`. Every other point's pick-time distance is at most the pick's;
        ties are broken by the lowest point index.

    Raises:
        ValueError: On a bad ``features`` array, ``labeled`` index, ``k``, ``seed``, ``dtype`` or
            ``chunk_size``; the message names the parameter.
    """
    x = as_features(features, dtype, device)
    n = x.shape[0]
    lab = as_indices(labeled, n, "labeled")
    check_count(k, "k", n - lab.size, "n - len(labeled)")
    check_chunk_size(chunk_size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    first = int(np.random.default_rng(seed).integers(n)) if lab.size == 0 else -1
    x_sq = sq_norms(x)
    picks, pick_d2, best, assign = greedy_core(x, x_sq, lab, int(k), first, chunk_size)
    return _result(picks, pick_d2, best, assign)


def _result(picks: list[int], pick_d2: list[float], best: torch.Tensor, assign: torch.Tensor
            ) -> CoresetResult:
    dist = best.clamp(min=0.0).sqrt().cpu().numpy().astype(np.float64)
    return CoresetResult(
        indices=np.asarray(picks, dtype=np.int64),
        radius=float(dist.max()),
        pick_distances=np.sqrt(np.maximum(np.asarray(pick_d2, dtype=np.float64), 0.0)),
        min_distances=dist,
        assignment=assign.cpu().numpy().astype(np.int64),
    )


def greedy_core(
    x: torch.Tensor,
    x_sq: torch.Tensor,
    labeled: np.ndarray,
    k: int,
    first: int,
    chunk_size: int,
    ignore: torch.Tensor | None = None,
) -> tuple[list[int], list[float], torch.Tensor, torch.Tensor]:
    """Validated-input core of :func:`k_center_greedy` (see the module docstring).

    Args:
        x: Points ``[n, d]``.
        x_sq: Squared norms ``[n]``.
        labeled: Existing centres, int64 ``[m]``.
        k: Picks to make (``<=`` the number of eligible points).
        first: First pick when ``labeled`` is empty (ignored otherwise).
        chunk_size: Rows per distance block.
        ignore: Optional bool mask ``[n]`` of points that are neither picked nor counted; their
            returned distance is meaningless.

    Returns:
        ``(picks, pick squared distances, best [n] squared distances, assign [n])``; ``best``
        is ``inf`` everywhere when there is no centre.
    """
    n, dev = x.shape[0], x.device
    best = torch.full((n,), float("inf"), dtype=x.dtype, device=dev)
    assign = torch.full((n,), -1, dtype=torch.int64, device=dev)
    if ignore is not None:
        best[ignore] = -1.0
    if labeled.size:
        lab_t = torch.from_numpy(labeled).to(dev)
        best[lab_t] = -1.0  # sentinel: centres are never picked nor updated
        assign[lab_t] = lab_t
        update_min(x, x_sq, lab_t, best, assign, chunk_size)
    picks: list[int] = []
    pick_d2: list[float] = []
    if k == 0:
        return picks, pick_d2, _unsentinel(best, labeled, picks), assign
    if not labeled.size:
        picks.append(first)
        pick_d2.append(float("inf"))
        best[first], assign[first] = -1.0, first
        update_min(x, x_sq, torch.tensor([first], device=dev), best, assign, chunk_size)

    cap = min(n, max(_GROW, n // 4))
    px = torch.empty((cap, x.shape[1]), dtype=x.dtype, device=dev)
    psq = torch.empty(cap, dtype=x.dtype, device=dev)
    pcur = torch.empty(cap, dtype=x.dtype, device=dev)
    pidx = torch.empty(cap, dtype=torch.int64, device=dev)
    pending: list[int] = []
    stale = True
    order = sorted_vals = None
    p = 0
    while len(picks) < k:
        if stale:  # fold buffered centres into `best`, restart the lazy prefix
            if pending:
                update_min(x, x_sq, torch.tensor(pending, device=dev), best, assign, chunk_size)
                pending = []
            order = torch.argsort(best, descending=True, stable=True)
            sorted_vals = best[order]
            p, stale = 0, False
        top = float(pcur[:p].max()) if p else -float("inf")
        while p < n and float(sorted_vals[p]) >= top:
            if p == cap:
                break
            e = min(cap - p, max(_GROW, p))
            idx = order[p:p + e]
            rows = x[idx]
            px[p:p + e], psq[p:p + e], pidx[p:p + e] = rows, x_sq[idx], idx
            cur = sorted_vals[p:p + e].clone()
            if pending:
                pend = torch.tensor(pending, device=dev)
                d2 = sq_dists(rows, x_sq[idx], x[pend], x_sq[pend]).amin(dim=1)
                cur = torch.where(cur < 0, cur, torch.minimum(cur, d2))
            pcur[p:p + e] = cur
            p += e
            top = float(pcur[:p].max())
        if p == cap and p < n and float(sorted_vals[p]) >= top:
            # Degenerate (massive ties): exact argmax over a refreshed vector.
            if pending:
                update_min(x, x_sq, torch.tensor(pending, device=dev), best, assign, chunk_size)
                pending = []
            j = int(torch.argmax(best))
            top = float(best[j])
            stale = True
        else:
            hits = torch.nonzero(pcur[:p] == top).squeeze(1)
            pos = int(hits[torch.argmin(pidx[hits])])
            j = int(pidx[pos])
            pcur[pos] = -1.0
            d2 = torch.addmv(psq[:p], px[:p], x[j], alpha=-2.0).add_(x_sq[j]).clamp_(min=0.0)
            pcur[:p] = torch.where(pcur[:p] < 0, pcur[:p], torch.minimum(pcur[:p], d2))
        picks.append(j)
        pick_d2.append(top)
        best[j], assign[j] = -1.0, j
        pending.append(j)
        if len(pending) >= _BLOCK or p > max(n // 8, _GROW):
            stale = True
    if pending:
        update_min(x, x_sq, torch.tensor(pending, device=dev), best, assign, chunk_size)
    return picks, pick_d2, _unsentinel(best, labeled, picks), assign


def _unsentinel(best: torch.Tensor, labeled: np.ndarray, picks: list[int]) -> torch.Tensor:
    """Replaces the centre sentinel (-1) by 0 (ignored points also read 0)."""
    return best.clamp_(min=0.0)
