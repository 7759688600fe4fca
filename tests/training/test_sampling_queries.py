"""Coverage-weighted sampling, coverage queries and re-scoring of the pending queue."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage.gate.queries import coverage_queries, rescore_pending, study_embeddings
from triage.model.checkpoint import Checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.training.sampling import class_mix, coverage_plan, draw

from .conftest import SIZE, TINY_MODEL, Store, make_settings

NAMES = ["normal", "pneumonia"]


def _skewed(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """900 'pneumonia' points in one blob, 100 'normal' ones in another of the same spread."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(900, 8, generator=g)
    rare = torch.randn(100, 8, generator=g) + 12.0
    labels = torch.cat([torch.ones(900), torch.zeros(100)]).long()
    return torch.cat([common, rare]), labels


def test_coverage_weights_rebalance_a_skewed_set():
    features, labels = _skewed()
    plan = coverage_plan(features, labels, NAMES, seed=0)
    assert plan.mix_before == pytest.approx({"normal": 0.1, "pneumonia": 0.9})
    assert plan.mix_after["normal"] > 0.2  # the rare blob gets about twice its share
    assert plan.radius > 0 and plan.n_cells == 32
    sample = draw(plan.weights, 4000, torch.Generator().manual_seed(1))
    drawn = class_mix(labels[sample], None, NAMES)
    assert drawn["normal"] == pytest.approx(plan.mix_after["normal"], abs=0.03)


def test_outliers_do_not_capture_cells():
    """Ten exotic points far from everything and from each other: farthest-first gives
    each its own cell and so a cell's whole mass; the robust plan does not."""
    features, labels = _skewed()
    g = torch.Generator().manual_seed(5)
    exotic = torch.randn(10, 8, generator=g) * 200.0
    features = torch.cat([features, exotic])
    labels = torch.cat([labels, torch.ones(10, dtype=torch.long)])
    naive = coverage_plan(features, labels, NAMES, outlier_fraction=0.0)
    robust = coverage_plan(features, labels, NAMES, outlier_fraction=0.02)
    assert naive.weights[-10:].sum() > 0.25  # ten points drawn a quarter of the time
    assert robust.weights[-10:].sum() < 0.06
    assert robust.radius < naive.radius


def test_coverage_plan_checks_shapes():
    with pytest.raises(ValueError, match="features"):
        coverage_plan(torch.zeros(3, 2), torch.zeros(4).long(), NAMES)


def _checkpoint() -> Checkpoint:
    torch.manual_seed(0)
    net, lossnet = build_network(TINY_MODEL), build_loss_predictor(TINY_MODEL)
    return Checkpoint(TINY_MODEL, net.eval(), lossnet.eval())


def _image(kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.full((1, 1, SIZE, SIZE), 0.2) + 0.02 * torch.rand(1, 1, SIZE, SIZE, generator=g)
    if kind == "far":
        base[..., ::2, ::2] = 1.0  # a checkerboard: unlike anything labelled
    return base


def test_coverage_queries_pick_the_farthest_unlabelled_studies(tmp_path):
    st = Store(make_settings(tmp_path))
    for i in range(6):
        st.label(st.add_study(_image("near", i)), "normal", "train")
    queued = st.add_study(_image("far", 99))
    st.enqueue(queued)  # in the queue: a centre, never returned
    near = [st.add_study(_image("near", 10 + i)) for i in range(8)]
    far = [st.add_study(_image("far", 20 + i) * (0.5 + 0.1 * i)) for i in range(3)]
    st.add_study(_image("far", 50), state="open")  # not scored yet: not a candidate
    ck = _checkpoint()
    picks = coverage_queries(st.db, ck, st.settings, budget=2)
    assert len(picks) == 2 and queued not in picks
    # the first pick is the candidate farthest from every labelled or queued study
    pool, x = study_embeddings(st.db, ck, near + far, 8)
    _, c = study_embeddings(st.db, ck, [r[0] for r in st.db.execute(
        "SELECT study_id FROM labels UNION SELECT study_id FROM queue_items")], 8)
    farthest = pool[int(torch.cdist(x, c).min(dim=1).values.argmax())]
    assert picks[0] == farthest
    assert coverage_queries(st.db, ck, st.settings, budget=0) == []
    assert len(coverage_queries(st.db, ck, st.settings, budget=100)) == 11


def test_rescore_pending_reorders_only_pending_items(tmp_path):
    st = Store(make_settings(tmp_path))
    pending = [st.enqueue(st.add_study(_image("near" if i % 2 else "far", i)), priority=0.0)
               for i in range(6)]
    claimed = st.enqueue(st.add_study(_image("far", 7)), state="claimed", priority=0.123)
    audit = st.enqueue(st.add_study(_image("near", 8)), reason="audit", priority=-1.0)
    assert rescore_pending(st.db, _checkpoint(), st.settings) == 6
    rows = dict(st.db.execute("SELECT id, priority FROM queue_items").fetchall())
    assert rows[claimed] == 0.123
    assert rows[audit] == -1.0  # audits are claimed by interleaving, never by rank
    values = np.array([rows[i] for i in pending])
    assert ((values > 0) & (values <= 1)).all() and len(set(values.tolist())) > 1
