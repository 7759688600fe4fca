"""Tests for triage.coreset: k-Center-Greedy, k-center with outliers, coverage weights."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from triage.coreset import coverage_weights, k_center_greedy, k_center_with_outliers


def _dmat(x: np.ndarray) -> np.ndarray:
    """Exact float64 Euclidean distance matrix [n, n] by explicit differences."""
    return np.stack([np.sqrt(((x - row) ** 2).sum(-1)) for row in x])


def _ref_greedy(x: np.ndarray, labeled: list[int], k: int, seed: int
                ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Brute-force farthest-first on the full matrix; np.argmax breaks ties by lowest index."""
    d = _dmat(x)
    n = len(x)
    md = np.full(n, np.inf)
    for c in labeled:
        md = np.minimum(md, d[c])
    picks: list[int] = []
    if not labeled and k:
        picks.append(int(np.random.default_rng(seed).integers(n)))  # documented first pick
        md = np.minimum(md, d[picks[0]])
    while len(picks) < k:
        m = md.copy()
        m[labeled + picks] = -1.0
        j = int(np.argmax(m))
        picks.append(j)
        md = np.minimum(md, d[j])
    centres = np.asarray(labeled + picks)
    assign = centres[np.argmin(d[:, centres], axis=1)]
    return picks, md, assign


def _blobs(seed: int, centres: np.ndarray, per: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([c + scale * rng.normal(size=(per, centres.shape[1])) for c in centres])


GREEDY_CASES = [  # n, d, k, n_labeled, seed, chunk_size
    (1, 3, 1, 0, 0, 16),
    (10, 2, 3, 0, 1, 3),
    (50, 5, 10, 2, 2, 7),
    (200, 8, 40, 0, 3, 64),
    (300, 3, 299, 1, 4, 1000),
    (1500, 16, 300, 5, 5, 257),  # > 128 picks: several refresh blocks, lazy prefix restarts
    (2500, 4, 200, 0, 6, 4096),  # low d: strong pruning, large lazy prefixes
]


@pytest.mark.parametrize(("n", "d", "k", "n_lab", "seed", "chunk"), GREEDY_CASES)
def test_greedy_matches_brute_force(n, d, k, n_lab, seed, chunk):
    rng = np.random.default_rng(100 + seed)
    x = rng.normal(size=(n, d))
    labeled = [int(i) for i in rng.choice(n, size=n_lab, replace=False)]
    res = k_center_greedy(x, labeled, k, seed=seed, chunk_size=chunk, dtype=torch.float64)
    picks, md, assign = _ref_greedy(x, labeled, k, seed)
    assert res.indices.tolist() == picks
    assert not set(labeled) & set(picks)
    np.testing.assert_allclose(res.min_distances, md, atol=1e-9)
    assert res.radius == pytest.approx(md.max(), abs=1e-9)
    np.testing.assert_array_equal(res.assignment, assign)
    assert np.all(np.diff(res.pick_distances[1 if not labeled else 0:]) <= 1e-12)


@pytest.mark.parametrize(("reps", "k", "labeled"), [(200, 50, []), (3, 12, [0, 4]), (400, 3, [7])])
def test_greedy_ties_lowest_index(reps, k, labeled):
    """Integer grid with duplicated points: distances are exact, picks break ties by index."""
    base = np.array([[0, 0], [3, 0], [0, 3], [3, 3], [6, 6]], dtype=np.float64)
    x = np.tile(base, (reps, 1))  # n = 5 * reps; many exactly tied distances (incl. zeros)
    for dtype in (torch.float32, torch.float64):
        res = k_center_greedy(x, labeled, k, seed=1, dtype=dtype, chunk_size=97)
        picks, md, _ = _ref_greedy(x, labeled, k, seed=1)
        assert res.indices.tolist() == picks
        np.testing.assert_allclose(res.min_distances, md, atol=1e-4)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [2, 3])
def test_greedy_two_approximation(seed, k):
    x = np.random.default_rng(seed).uniform(size=(9, 2))
    d = _dmat(x)
    opt = min(d[:, list(c)].min(axis=1).max() for c in itertools.combinations(range(9), k))
    res = k_center_greedy(x, [], k, seed=seed, dtype=torch.float64)
    assert res.radius <= 2 * opt + 1e-12


def test_greedy_determinism_and_seed():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(0))
    a = k_center_greedy(x, [], 30, seed=7)
    b = k_center_greedy(x.numpy(), [], 30, seed=7)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.indices[0] == np.random.default_rng(7).integers(500)
    assert k_center_greedy(x, [], 30, seed=8).indices[0] == np.random.default_rng(8).integers(500)
    # the seed is irrelevant once something is labeled
    assert (k_center_greedy(x, [3], 30, seed=1).indices.tolist()
            == k_center_greedy(x, [3], 30, seed=2).indices.tolist())


def test_greedy_chunk_size_invariance():
    x = torch.randn(1200, 32, generator=torch.Generator().manual_seed(1))
    ref = k_center_greedy(x, [5, 17], 200, chunk_size=1200)
    for chunk in (7, 13, 256, 100_000):
        res = k_center_greedy(x, [5, 17], 200, chunk_size=chunk)
        assert res.indices.tolist() == ref.indices.tolist()
        np.testing.assert_allclose(res.min_distances, ref.min_distances, rtol=1e-5, atol=1e-5)


def test_greedy_float32_agrees_with_float64():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(2))
    a = k_center_greedy(x, [], 150, dtype=torch.float32)
    b = k_center_greedy(x, [], 150, dtype=torch.float64)
    assert a.indices.tolist() == b.indices.tolist()
    assert a.radius == pytest.approx(b.radius, rel=1e-5)


def test_greedy_k_zero_reports_labeled_coverage():
    x = np.array([[0.0], [1.0], [5.0]])
    res = k_center_greedy(x, [0], 0)
    assert res.indices.size == 0 and res.radius == pytest.approx(5.0)
    assert k_center_greedy(x, [], 0).radius == np.inf


PLANTED = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
FAR = np.array([[200.0, 200.0], [-300.0, 50.0], [80.0, -400.0], [-250.0, -250.0], [0.0, 500.0]])


def _planted(seed: int) -> np.ndarray:
    return np.concatenate([_blobs(seed, PLANTED, 60), FAR])  # 180 inliers, indices 180..184 far


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("max_direct", "summary_size"), [(4096, 2048), (100, 60)])
def test_outliers_ignore_planted_far_points(seed, max_direct, summary_size):
    x = _planted(seed)
    far = set(range(180, 185))
    res = k_center_with_outliers(x, [], 3, 5, max_direct=max_direct,
                                 summary_size=summary_size, seed=seed)
    assert sorted(res.indices // 60) == [0, 1, 2]  # one centre per cluster
    assert set(res.outliers.tolist()) == far
    assert res.radius < 5.0 <= res.min_distances[list(far)].min()
    assert res.radius <= res.bound + 1e-6
    assert (res.summary_radius == 0.0) == (max_direct == 4096)
    plain = k_center_greedy(x, [], 3, seed=seed)
    assert set(plain.indices.tolist()) & far  # plain greedy is captured by the far points
    assert plain.radius > 5.0


def test_outliers_with_labeled_and_fill():
    x = _planted(0)
    res = k_center_with_outliers(x, [0], 2, 5)  # cluster 0 already labeled
    assert sorted(res.indices // 60) == [1, 2]
    assert set(res.outliers.tolist()) == set(range(180, 185))
    many = k_center_with_outliers(x, [0], 40, 5)  # more centres than clusters: fill-up
    assert many.indices.size == 40 and np.unique(many.indices).size == 40
    assert not set(many.indices.tolist()) & (set(range(180, 185)) | {0})
    assert many.radius <= res.radius


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("k", "z"), [(2, 1), (2, 2), (3, 1)])
def test_outliers_three_approximation(seed, k, z):
    x = np.random.default_rng(seed).uniform(size=(10, 2)) ** 3  # skewed
    d = _dmat(x)
    opt = min(np.sort(d[:, list(c)].min(axis=1))[-(z + 1)]
              for c in itertools.combinations(range(10), k))
    res = k_center_with_outliers(x, [], k, z, dtype=torch.float64)
    assert res.indices.size == k and res.outliers.size == z
    assert res.radius <= 3 * opt + 1e-12
    assert res.radius <= res.bound + 1e-12
    assert res.guess_radius <= opt + 1e-12  # binary search never stops above OPT


def test_outliers_deterministic_summary():
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(3))
    a = k_center_with_outliers(x, [1, 2], 20, 10, max_direct=1000, summary_size=500, seed=4)
    b = k_center_with_outliers(x, [1, 2], 20, 10, max_direct=1000, summary_size=500, seed=4)
    assert a.indices.tolist() == b.indices.tolist() and a.outliers.tolist() == b.outliers.tolist()
    assert 0 < a.summary_radius and a.radius <= a.bound + 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coverage_weights_rebalance_skewed_clusters(seed):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(size=(950, 8)), rng.normal(size=(50, 8)) + 20.0])
    w = coverage_weights(x, seed=seed)
    assert w.shape == (1000,) and np.all(w > 0) and w.sum() == pytest.approx(1.0)
    draw = rng.choice(1000, size=20_000, p=w)
    minority = np.mean(draw >= 950)
    # Raw mix is 0.05; farthest-first gives the minority ~6-9 of 32 cells (mass 0.19-0.28).
    assert minority >= 0.15
    assert w[950:].sum() >= 3 * 0.05


def test_coverage_weights_explicit_centres_and_power():
    x = np.array([[0.0], [0.1], [0.2], [10.0]])
    w = coverage_weights(x, centres=[0, 3])
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 1 / 2])
    np.testing.assert_allclose(coverage_weights(x, centres=[0, 3], power=0.0), 0.25)


def _call(fn, **kw):
    args = {"features": np.zeros((5, 2)), "labeled": [], "k": 1}
    if fn is k_center_with_outliers:
        args["n_outliers"] = 0
    if fn is coverage_weights:
        args = {"features": np.zeros((5, 2))}
    args.update(kw)
    return fn(**args)


ERRORS = [  # function, overrides, parameter named in the message
    (k_center_greedy, {"k": 6}, "k"),
    (k_center_greedy, {"k": -1}, "k"),
    (k_center_greedy, {"k": 5, "labeled": [0]}, "k"),
    (k_center_greedy, {"k": 1.5}, "k"),
    (k_center_greedy, {"features": np.zeros(5)}, "features"),
    (k_center_greedy, {"features": np.zeros((0, 2))}, "features"),
    (k_center_greedy, {"features": np.array([[0.0, np.nan]])}, "features"),
    (k_center_greedy, {"features": [[0.0, 1.0]]}, "features"),
    (k_center_greedy, {"labeled": [5]}, "labeled"),
    (k_center_greedy, {"labeled": [-1]}, "labeled"),
    (k_center_greedy, {"labeled": [1, 1]}, "labeled"),
    (k_center_greedy, {"labeled": [[1]]}, "labeled"),
    (k_center_greedy, {"chunk_size": 0}, "chunk_size"),
    (k_center_greedy, {"seed": -1}, "seed"),
    (k_center_greedy, {"dtype": torch.float16}, "dtype"),
    (k_center_with_outliers, {"n_outliers": -1}, "n_outliers"),
    (k_center_with_outliers, {"n_outliers": 6}, "n_outliers"),
    (k_center_with_outliers, {"k": 3, "n_outliers": 3}, "k"),
    (k_center_with_outliers, {"max_direct": 0}, "max_direct"),
    (k_center_with_outliers, {"summary_size": 0}, "summary_size"),
    (k_center_with_outliers, {"max_direct": 4, "summary_size": 5}, "summary_size"),
    (k_center_with_outliers, {"features": np.zeros((2, 2, 2))}, "features"),
    (coverage_weights, {"n_cells": 6}, "n_cells"),
    (coverage_weights, {"n_cells": 0}, "n_cells"),
    (coverage_weights, {"power": -1.0}, "power"),
    (coverage_weights, {"centres": [9]}, "centres"),
    (coverage_weights, {"centres": [0], "n_cells": 2}, "n_cells"),
]


@pytest.mark.parametrize(("fn", "kw", "name"), ERRORS)
def test_parameter_errors_name_the_parameter(fn, kw, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        _call(fn, **kw)


def test_charikar_falls_back_to_farthest_first_when_float_distances_break_the_metric():
    """Two clusters of near-identical points far from the origin: float32 distances
    computed as |x|^2 + |y|^2 - 2 x.y are noise of 0-0.1 inside a cluster and break the
    triangle inequality (0~6 and 6~1 are 0 apart, 0~1 is not). The Charikar greedy then
    could not cover R(k) (a retrain crashed on this, 2026-12-03); the farthest-first picks
    are returned instead, and they cover all but z points within 3 x the radius returned."""
    from triage.coreset.outliers import _charikar

    # distances (rounded) of 10 float32 points, two clusters 375.75 apart
    d = torch.tensor([
        [0, 0.062, 375.752, 375.755, 0.088, 375.753, 0, 375.754, 375.753, 375.754],
        [0.062, 0, 375.752, 375.755, 0, 375.753, 0.108, 375.754, 375.753, 375.754],
        [375.752, 375.752, 0, 0.088, 375.751, 0, 375.751, 0.062, 0.088, 0],
        [375.755, 375.755, 0.088, 0, 375.754, 0, 375.754, 0.108, 0, 0.088],
        [0.088, 0, 375.751, 375.754, 0, 375.752, 0.088, 375.753, 375.752, 375.753],
        [375.753, 375.753, 0, 0, 375.752, 0, 375.752, 0, 0.062, 0.062],
        [0, 0.108, 375.751, 375.754, 0.088, 375.752, 0, 375.753, 375.751, 375.753],
        [375.754, 375.754, 0.062, 0.108, 375.753, 0, 375.753, 0, 0.062, 0.062],
        [375.753, 375.753, 0, 0.088, 375.752, 0.062, 375.751, 0.062, 0, 0],
        [375.754, 375.754, 0, 0, 375.753, 0, 375.753, 0, 0, 0],
    ])
    first = [0, 1, 4, 6]
    picks, radius = _charikar(d, torch.ones(10), torch.full((10,), float("inf")), k=5, z=3)
    assert 1 <= len(picks) <= 5 and len(set(picks.tolist())) == len(picks)
    nearest = d[:, torch.from_numpy(picks)].min(1).values
    assert int((nearest > 3 * radius + 1e-6).sum()) <= 3
    assert {int(p) in first for p in picks} == {True, False}  # both clusters have a centre
