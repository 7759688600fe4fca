"""Robust k-center with outliers (Charikar, Khuller, Mount, Narasimhan, SODA 2001).

For a guessed radius ``r`` the greedy repeatedly takes the point whose ``r``-ball holds the most
uncovered weight and marks everything within ``3r`` of it covered. If at most ``z`` weight is
left uncovered, ``r`` is feasible; for every ``r >= OPT`` it is, so a binary search over the
sorted candidate distances returns ``r <= OPT`` and a solution of radius ``<= 3 OPT`` that leaves
at most ``z`` points uncovered (3-approximation). Already-labeled points are fixed centres: the
points within ``3r`` of them start covered (the proof is unchanged, since OPT's fixed balls of
radius ``r`` cover a subset of those).

Scale. A guess costs O(m^2) time and memory for ``m`` instance points (a dense ``m x m``
distance matrix, ~10 bytes per entry with the boolean ball masks), plus an O(m^2 log m) sort of
the candidate radii once. ``m <= max_direct`` (default 4096: ~170 MB, a few seconds on 2 cores)
is solved directly on the unlabeled points. Above that the instance is a *summary*: a
k-Center-Greedy cover of ``summary_size`` centres (labeled points act as centres and their cells
are dropped, being covered) with each summary point weighted by the size of its cell. If ``rho``
is the summary's coverage radius, moving every point onto its cell centre moves it by
``<= rho``, so the weighted instance has a solution of radius ``<= OPT + 2 rho`` and the search
returns ``r <= OPT + 2 rho``. Mapped back, all but ``z`` points lie within ``3 r + rho`` of a
centre: the reported ``bound`` (a certificate), i.e. ``<= 3 OPT + 7 rho``. ``rho`` shrinks as
``summary_size`` grows and is returned so callers can judge the guarantee.
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
)
from triage.coreset.greedy import greedy_core


@dataclass(frozen=True)
class RobustCoresetResult:
    """Outcome of :func:`k_center_with_outliers`.

    Attributes:
        indices: Selected point indices, int64 ``[k]``, in pick order (Charikar picks by
            decreasing covered weight, then any farthest-first fill-up).
        radius: Max Euclidean distance to the nearest centre over all points except
            ``outliers``, in feature units.
        outliers: The ``n_outliers`` points farthest from every centre, int64 ``[z]``, farthest
            first (ties: lowest index first).
        guess_radius: The radius ``r`` the binary search settled on.
        summary_radius: ``rho``, coverage radius of the summary (0 when solved directly).
        bound: ``3 * guess_radius + summary_radius``; ``radius <= bound`` is guaranteed.
        min_distances: Per-point Euclidean distance to the nearest centre, float64 ``[n]``.
        assignment: Per-point index of that centre, int64 ``[n]`` (``-1`` if none).
    """

    indices: np.ndarray
    radius: float
    outliers: np.ndarray
    guess_radius: float
    summary_radius: float
    bound: float
    min_distances: np.ndarray
    assignment: np.ndarray


def k_center_with_outliers(
    features: torch.Tensor | np.ndarray,
    labeled: Sequence[int] | np.ndarray | torch.Tensor,
    k: int,
    n_outliers: int,
    *,
    max_direct: int = 4096,
    summary_size: int = 2048,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> RobustCoresetResult:
    """Selects ``k`` centres that cover all but ``n_outliers`` points with a small radius.

    See the module docstring for the algorithm, its guarantee and the scale it handles.

    Args:
        features: Embeddings, Tensor or ndarray ``[n, d]``.
        labeled: Indices already labeled, ``[m]``; fixed centres, never selected nor outliers.
        k: Number of points to select, ``0 <= k <= n - m - n_outliers``.
        n_outliers: Points allowed to stay uncovered, ``z >= 0``.
        max_direct: Largest number of unlabeled points solved exactly (O(m^2) memory).
        summary_size: Summary centres used above ``max_direct``; ``1 <= summary_size <=
            max_direct``.
        seed: Seeds the summary's first centre when ``labeled`` is empty.
        chunk_size: Rows per distance block for the O(n*d) passes.
        dtype: ``torch.float32`` or ``torch.float64``.
        device: Device for the computation; ``None`` keeps a tensor's device.

    Returns:
        A :class:`RobustCoresetResult`; deterministic for given inputs and ``seed``.

    Raises:
        ValueError: On bad inputs; the message names the parameter.
    """
    x = as_features(features, dtype, device)
    n, dev = x.shape[0], x.device
    lab = as_indices(labeled, n, "labeled")
    check_count(n_outliers, "n_outliers", n - lab.size, "n - len(labeled)")
    check_count(k, "k", n - lab.size - n_outliers, "n - len(labeled) - n_outliers")
    check_chunk_size(chunk_size)
    check_count(max_direct, "max_direct", 2**31, "2**31")
    if max_direct < 1:
        raise ValueError(f"max_direct must be >= 1, got {max_direct}")
    check_count(summary_size, "summary_size", max_direct, "max_direct")
    if summary_size < 1:
        raise ValueError(f"summary_size must be >= 1, got {summary_size}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    k, z = int(k), int(n_outliers)
    x_sq = sq_norms(x)

    unl = np.setdiff1d(np.arange(n), lab)
    rho, r = 0.0, float("inf")
    centres = np.zeros(0, dtype=np.int64)
    if k > 0:
        wdt = torch.float32 if n < 2**24 else torch.float64  # weight sums stay exact integers
        d_lab = greedy_core(x, x_sq, lab, 0, -1, chunk_size)[2].sqrt()  # inf if no labeled
        if unl.size <= max_direct:
            inst, w = unl, torch.ones(unl.size, dtype=wdt, device=dev)
        else:
            first = int(np.random.default_rng(seed).integers(n))
            picks, _, best, assign = greedy_core(x, x_sq, lab, summary_size, first, chunk_size)
            rho = float(best.max().sqrt())
            inst = np.asarray(picks, dtype=np.int64)
            w = torch.bincount(assign, minlength=n)[torch.from_numpy(inst).to(dev)].to(wdt)
        inst_t = torch.from_numpy(inst).to(dev)
        d = sq_dists(x[inst_t], x_sq[inst_t], x[inst_t], x_sq[inst_t]).sqrt_()
        d.fill_diagonal_(0.0)
        local, r = _charikar(d, w, d_lab[inst_t], k, z)
        del d
        centres = inst[local]

    fixed = np.concatenate([lab, centres])
    best, assign = greedy_core(x, x_sq, fixed, 0, -1, chunk_size)[2:]
    if centres.size < k:  # fill up farthest-first, never picking the current outliers
        ignore = torch.zeros(n, dtype=torch.bool, device=dev)
        ignore[_farthest(best, fixed, z)] = True
        extra = greedy_core(x, x_sq, fixed, k - centres.size, -1, chunk_size, ignore)[0]
        centres = np.concatenate([centres, np.asarray(extra, dtype=np.int64)])
        fixed = np.concatenate([lab, centres])
        best, assign = greedy_core(x, x_sq, fixed, 0, -1, chunk_size)[2:]
    out = _farthest(best, fixed, z)
    dist = best.sqrt().cpu().numpy().astype(np.float64)
    keep = np.ones(n, dtype=bool)
    keep[out.cpu().numpy()] = False
    return RobustCoresetResult(
        indices=centres.astype(np.int64),
        radius=float(dist[keep].max()) if keep.any() else 0.0,
        outliers=out.cpu().numpy().astype(np.int64),
        guess_radius=r,
        summary_radius=rho,
        bound=3.0 * r + rho,
        min_distances=dist,
        assignment=assign.cpu().numpy().astype(np.int64),
    )


def _farthest(best: torch.Tensor, fixed: np.ndarray, z: int) -> torch.Tensor:
    """The ``z`` non-centres with the largest ``best``; farthest first, lowest index on ties."""
    vals = best.clone()
    vals[torch.from_numpy(fixed).to(best.device)] = -1.0
    return torch.argsort(vals, descending=True, stable=True)[:z]


def _charikar(d: torch.Tensor, w: torch.Tensor, d_fixed: torch.Tensor, k: int, z: int
              ) -> tuple[np.ndarray, float]:
    """Weighted Charikar et al. greedy with a binary search over candidate radii.

    Args:
        d: Euclidean distances among the instance points ``[m, m]``.
        w: Point weights (integer multiplicities) ``[m]``, float32 or float64.
        d_fixed: Distance of each instance point to the nearest fixed centre ``[m]`` (``inf``
            if none).
        k: Maximum number of centres, ``>= 1``.
        z: Weight allowed to stay uncovered.

    Returns:
        ``(picks, r)``: instance positions of the centres (``<= k``, pick order) and the
        smallest feasible candidate radius found.
    """
    m = d.shape[0]
    # Candidates above R(k), the farthest-first k-center radius (>= OPT(k, 0) >= OPT(k, z), so
    # feasible), are never needed. Feasible r below OPT are kept: they only tighten the result.
    r_k, gonzalez = _gonzalez(d, d_fixed, k)
    tri = torch.ones(m, m, dtype=torch.bool, device=d.device).triu_(1)
    cand = torch.cat([d[tri], d_fixed[torch.isfinite(d_fixed)].to(d.dtype), d.new_zeros(1)])
    del tri
    cand = cand[cand <= r_k]
    cand = torch.unique_consecutive(torch.sort(cand).values)
    lo, hi = -1, cand.numel() - 1  # invariant: cand[lo] infeasible (or none), cand[hi] feasible
    ok, picks = _feasible(d, w, d_fixed, float(cand[hi]), k, z)
    if not ok:
        # Exact distances make this impossible (R(k) >= OPT(k, 0) >= OPT(k, z)). float32
        # distances of near-identical points (|x|^2 + |y|^2 - 2 x.y) can break the triangle
        # inequality the guarantee rests on; the farthest-first picks still cover every
        # point within R(k), so they are the answer (no outliers needed).
        return np.asarray(list(dict.fromkeys(gonzalez)), dtype=np.int64), r_k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok, p = _feasible(d, w, d_fixed, float(cand[mid]), k, z)
        if ok:
            hi, picks = mid, p
        else:
            lo = mid
    return np.asarray(picks, dtype=np.int64), float(cand[hi])


def _gonzalez(d: torch.Tensor, d_fixed: torch.Tensor, k: int) -> tuple[float, list[int]]:
    """Farthest-first radius after ``k`` picks on the instance (first pick 0 if nothing
    fixed), and the picks."""
    md = d_fixed.clone()
    picks: list[int] = []
    for _ in range(k):
        j = int(torch.argmax(md)) if bool(torch.isfinite(md).all()) else 0
        picks.append(j)
        md = torch.minimum(md, d[j])
    return float(md.max()), picks


def _feasible(d: torch.Tensor, w: torch.Tensor, d_fixed: torch.Tensor, r: float, k: int, z: int
              ) -> tuple[bool, list[int]]:
    """One Charikar greedy pass for radius ``r``: O(m^2) time and memory."""
    ball = (d <= r).to(w.dtype)  # symmetric
    covered = d_fixed <= 3.0 * r
    unc = torch.where(covered, 0.0, w)
    counts = ball @ unc
    left = float(unc.sum())
    picks: list[int] = []
    while len(picks) < k and left > z + 0.5:
        j = int(torch.argmax(counts))
        if float(counts[j]) <= 0.0:
            break
        picks.append(j)
        new = torch.nonzero((d[j] <= 3.0 * r) & ~covered).squeeze(1)
        covered[new] = True
        counts -= w[new] @ ball[new]
        left -= float(w[new].sum())
    return left <= z + 0.5, picks
