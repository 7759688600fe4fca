"""Cold start: a label-free embedding and farthest-first selection at the label rate."""

import math

import numpy as np
import pytest
import torch

from triage.gate.coldstart import (
    EMBEDDING_SIZE,
    NOVELTY_CAP,
    ColdStartSelector,
    coldstart_embedding,
)

S = 32
YY, XX = np.mgrid[0:S, 0:S] / (S - 1)
RARE = 3
MIX = (0.45, 0.30, 0.22, 0.03)  # cluster 3 is rare


def _pattern(cluster: int, rng: np.random.Generator) -> np.ndarray:
    jitter = rng.normal(0, 0.08, 2)
    if cluster == 0:
        return XX + jitter[0] * YY
    if cluster == 1:
        return YY + jitter[0] * XX
    if cluster == 2:
        return np.exp(-((XX - 0.5 - jitter[0]) ** 2 + (YY - 0.5 - jitter[1]) ** 2) / 0.05)
    return (np.sin(6 * np.pi * (XX + jitter[0])) * np.sin(6 * np.pi * (YY + jitter[1])) + 1) / 2


def synthetic_study(cluster: int, rng: np.random.Generator) -> torch.Tensor:
    """One or two noisy images [K, 1, S, S] of a cluster's pattern, random exposure."""
    images = []
    for _ in range(int(rng.integers(1, 3))):
        image = _pattern(cluster, rng) * rng.uniform(0.5, 1.0) + rng.uniform(0, 0.3)
        images.append(np.clip(image + rng.normal(0, 0.1, (S, S)), 0, 1))
    return torch.tensor(np.stack(images)[:, None], dtype=torch.float32)


def stream(n: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    clusters = rng.choice(len(MIX), size=n, p=MIX)
    return clusters, [coldstart_embedding(synthetic_study(c, rng)) for c in clusters]


def select(embeddings: list[np.ndarray], label_rate: float, **options) -> list[bool]:
    selector = ColdStartSelector(label_rate, seed=0, **options)
    routed = []
    for sequence, embedding in enumerate(embeddings):
        wanted = selector.wants(embedding, sequence)
        selector.commit(embedding, wanted)
        routed.append(wanted)
    return routed


@pytest.fixture(scope="module")
def study_stream() -> tuple[np.ndarray, list[np.ndarray]]:
    return stream(2000)


def test_embedding_is_a_standardised_thumbnail_that_ignores_exposure():
    rng = np.random.default_rng(1)
    images = synthetic_study(2, rng)
    embedding = coldstart_embedding(images)
    assert embedding.shape == (EMBEDDING_SIZE,) and embedding.dtype == np.float64
    assert abs(embedding.mean()) < 1e-9 and embedding.std() == pytest.approx(1, abs=1e-4)
    # brightness and contrast change nothing; the pattern does
    np.testing.assert_allclose(coldstart_embedding(images * 0.5 + 0.2), embedding, atol=1e-4)
    other = coldstart_embedding(synthetic_study(0, rng))
    assert np.linalg.norm(other - embedding) > 5
    flat = coldstart_embedding(torch.full((2, 1, S, S), 0.3))
    assert np.isfinite(flat).all() and not flat.any()
    with pytest.raises(ValueError, match="images"):
        coldstart_embedding(torch.zeros(1, S, S))


@pytest.mark.parametrize("label_rate", [0.1, 0.2])
def test_routed_share_tracks_the_label_rate(study_stream, label_rate):
    _, embeddings = study_stream
    routed = select(embeddings, label_rate)
    assert abs(np.mean(routed) - label_rate) <= 0.2 * label_rate
    # and within each quarter of the stream, not only on average
    for quarter in np.array_split(np.array(routed), 4):
        assert abs(quarter.mean() - label_rate) <= 0.3 * label_rate


def test_routed_studies_cover_the_rare_cluster(study_stream):
    clusters, embeddings = study_stream
    routed = np.array(select(embeddings, 0.1))
    stream_share = np.mean(clusters == RARE)
    routed_share = np.mean(clusters[routed] == RARE)
    # arrival order or random routing would give the rare cluster about its stream share
    assert routed_share > 3 * stream_share
    assert set(clusters[routed]) == set(range(len(MIX)))  # every cluster is covered


def test_same_inputs_give_identical_decisions(study_stream):
    _, embeddings = study_stream
    first = select(embeddings[:600], 0.2)
    assert select(embeddings[:600], 0.2) == first
    assert select([e.copy() for e in embeddings[:600]], 0.2, window=500, warmup=50) == first


def test_warmup_routes_at_random_then_novelty_decides():
    _, embeddings = stream(80, seed=3)
    selector = ColdStartSelector(0.5, seed=0, window=100, warmup=20)
    assert selector.novelty(embeddings[0]) == NOVELTY_CAP and selector.threshold() is None
    for sequence, embedding in enumerate(embeddings[:20]):
        selector.commit(embedding, selector.wants(embedding, sequence))
    assert 0 < selector.selected < 20
    threshold = selector.threshold()
    assert threshold is not None
    for embedding in embeddings[20:]:
        novelty = selector.novelty(embedding)
        assert selector.wants(embedding, 0) == (novelty > selector.threshold())
        assert selector.wants(embedding, 0) == selector.wants(embedding, 0)  # no side effects
        selector.commit(embedding, novelty > selector.threshold())


def test_cap_blocked_studies_leave_the_realised_rate():
    selector = ColdStartSelector(0.2, seed=0, window=10, warmup=0)
    e = np.ones(EMBEDDING_SIZE)
    selector.commit(e, True)
    selector.commit(e, False, eligible=False, novelty=1.0)
    assert selector.realised_rate() == 1.0
    selector.commit(None, False, novelty=2.0)  # a replayed, unrouted decision
    assert selector.realised_rate() == 0.5 and selector.seen == 3 and selector.selected == 1
    selector.commit(None, True, novelty=2.0)  # replayed, routed, its images gone
    assert selector.realised_rate() == pytest.approx(2 / 3) and selector.selected == 1


def test_restored_selector_decides_like_the_original(study_stream):
    _, embeddings = study_stream
    original = ColdStartSelector(0.2, seed=0, window=100, warmup=20)
    history = []
    for sequence, embedding in enumerate(embeddings[:400]):
        novelty = original.novelty(embedding)
        wanted = original.wants(embedding, sequence)
        original.commit(embedding, wanted, novelty=novelty)
        history.append((embedding, wanted, novelty))
    restored = ColdStartSelector(0.2, seed=0, window=100, warmup=20)
    for embedding, wanted, _ in history[:-100]:
        if wanted:
            restored.add_selected(embedding)
    for embedding, wanted, novelty in history[-100:]:
        restored.commit(embedding if wanted else None, wanted, novelty=novelty)
    for sequence, embedding in enumerate(embeddings[400:700], start=400):
        a, b = original.wants(embedding, sequence), restored.wants(embedding, sequence)
        assert a == b
        original.commit(embedding, a)
        restored.commit(embedding, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label_rate": 0}, "label_rate"),
        ({"label_rate": 1.5}, "label_rate"),
        ({"window": 0}, "window"),
        ({"warmup": -1}, "warmup"),
        ({"warmup": 600}, "warmup"),
        ({"feedback_gain": math.inf}, "feedback_gain"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_selector_settings(kwargs, match):
    options = {"label_rate": 0.2, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        ColdStartSelector(**options)


def test_bad_embeddings_and_commits_are_refused():
    selector = ColdStartSelector(0.2, seed=0)
    with pytest.raises(ValueError, match="embedding"):
        selector.novelty(np.zeros(10))
    with pytest.raises(ValueError, match="embedding"):
        selector.commit(None, False)
    with pytest.raises(ValueError, match="novelty"):
        selector.commit(np.zeros(EMBEDDING_SIZE), False, novelty=math.nan)


def test_typicality_weighting_passes_over_outliers_that_coverage_takes():
    """A dense stream of the four patterns with isolated outliers (a pattern of their own
    each, far from everything): farthest-first coverage takes the outliers first, the
    typicality-weighted selector (k nearest recent studies) leaves most of them and
    still covers every pattern, the rare one included."""
    rng = np.random.default_rng(5)
    clusters, embeddings = stream(1200, seed=5)
    clusters = clusters.copy()
    outliers = rng.choice(np.arange(100, 1200), size=24, replace=False)
    for i in outliers:
        embeddings[i] = rng.normal(0, 1, EMBEDDING_SIZE)  # noise: unlike any pattern
        embeddings[i] = (embeddings[i] - embeddings[i].mean()) / embeddings[i].std()
        clusters[i] = -1
    coverage = np.array(select(embeddings, 0.1))
    typical = np.array(select(embeddings, 0.1, typical_neighbours=20))
    for routed in (coverage, typical):  # the rate holds either way
        assert abs(routed.mean() - 0.1) <= 0.2 * 0.1
    taken = {name: int((clusters[routed] == -1).sum())
             for name, routed in (("coverage", coverage), ("typical", typical))}
    assert taken["coverage"] >= 18 and taken["typical"] <= 4, taken
    assert set(clusters[typical]) >= set(range(len(MIX)))


def test_typicality_spread_is_the_mean_distance_to_the_nearest_recent_studies():
    selector = ColdStartSelector(0.2, seed=0, window=5, warmup=0, typical_neighbours=2)
    points = [np.full(EMBEDDING_SIZE, v) for v in (0.0, 1.0, 3.0, 10.0, 20.0, 30.0)]
    for p in points:
        selector.commit(p, False, novelty=1.0)  # the window keeps the last five seen
    query = np.full(EMBEDDING_SIZE, 2.0)
    # nearest of 1, 3, 10, 20, 30 are 1 and 3: distances 1 and 1 per value, 8 values
    assert selector.spread(query) == pytest.approx(8.0)
    assert ColdStartSelector(0.2, seed=0).spread(query) is None  # off by default
    selector.add_selected(points[0])
    assert selector.value(query) == pytest.approx(selector.novelty(query) / 8.0, rel=1e-6)
    with pytest.raises(ValueError, match="typical_neighbours"):
        ColdStartSelector(0.2, seed=0, typical_neighbours=-1)
