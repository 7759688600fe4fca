"""Strategies that score a study's embedding: `badge`, `emoc`, `alfa_mix`, `dal`.

Each is checked against its definition computed the long way (an autograd gradient, an
explicit gradient step, an explicit mix of the features), on planted features with a
real fitted epistemic head, so the outcome does not depend on training."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from triage.gate import GateSettings
from triage.gate.strategies import NO_DISCRIMINATOR, NO_EPISTEMIC_HEAD, make_strategy
from triage.gate.strategies.alfa_mix import flip_distance
from triage.model.checkpoint import load_checkpoint, save_checkpoint
from triage.model.discriminator import Discriminator, fit_discriminator
from triage.model.embedding import FeatureSpace, StudyEmbedding
from triage.model.epistemic import fit_epistemic, fit_epistemic_features, pooled_features
from triage.model.inference import StudyResult, score_study
from triage.model.network import build_network
from triage.model.settings import ModelSettings

FEATURES, CLASSES = 6, 3


@pytest.fixture(scope="module")
def space() -> tuple[FeatureSpace, torch.nn.Linear, torch.Tensor]:
    """Three classes of planted Gaussian features, a fixed last layer, its fitted head."""
    generator = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(CLASSES, FEATURES, generator=generator)
    labels = torch.arange(3000) % CLASSES
    train = centres[labels] + torch.randn(3000, FEATURES, generator=generator) * torch.tensor(
        [1.0, 0.5, 2.0, 1.0, 0.3, 1.5])
    fc = torch.nn.Linear(FEATURES, CLASSES)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(CLASSES, FEATURES, generator=generator))
        fc.bias.copy_(torch.randn(CLASSES, generator=generator))
    head = fit_epistemic_features(fc, train, labels, train[:300], labels[:300], samples=4)
    return FeatureSpace.of(fc, head), fc, train


def _embedding(space: FeatureSpace, features) -> StudyEmbedding:
    return StudyEmbedding(np.asarray(features, dtype=np.float32).reshape(-1, FEATURES), space)


def _result(embedding: StudyEmbedding | None) -> StudyResult:
    return StudyResult(probs=(0.5, 0.3, 0.2), uncertainty={"entropy": 0.7, "bald": 0.1},
                       predicted_loss=0.2, num_images=1, num_images_total=1,
                       embedding=embedding)  # fmt: skip


def _strategy(name: str):
    return make_strategy(GateSettings(strategy=name))


def test_the_feature_moment_is_the_training_features_second_moment(space):
    space, _, train = space
    a = torch.cat([train, torch.ones(len(train), 1)], 1).double()
    empirical = (a.T @ a / len(a)).numpy()
    np.testing.assert_allclose(space.moment, empirical, rtol=0.01, atol=0.01)


def test_badge_is_the_norm_of_the_last_layers_gradient_under_the_predicted_label(space):
    space, fc, _ = space
    points = torch.randn(5, FEATURES, generator=torch.Generator().manual_seed(1)) * 2
    badge = _strategy("badge")
    for point in points:
        fc.zero_grad()
        logits = fc(point[None])
        torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach()).backward()
        expected = float(fc.weight.grad.norm())
        score = badge.components(_result(_embedding(space, point.numpy())))["badge"]
        assert score == pytest.approx(expected, rel=1e-4)
    # a study takes its most worth-labelling image
    both = badge.components(_result(_embedding(space, points[:2].numpy())))["badge"]
    one = [badge.components(_result(_embedding(space, p.numpy())))["badge"] for p in points[:2]]
    assert both == pytest.approx(max(one))


def test_badge_embeds_a_study_by_that_gradient_for_the_batch_manager(space):
    space, fc, _ = space
    points = torch.randn(3, FEATURES, generator=torch.Generator().manual_seed(5)) * 2
    badge = _strategy("badge")
    grads = []
    for point in points:
        fc.zero_grad()
        logits = fc(point[None])
        torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach()).backward()
        grads.append(fc.weight.grad.flatten().numpy().copy())
        vector = badge.batch_embedding(_result(_embedding(space, point.numpy())))
        assert vector.dtype == np.float32 and vector.shape == (CLASSES * FEATURES,)
        np.testing.assert_allclose(vector, grads[-1], rtol=1e-4, atol=1e-6)
    # a study is the image whose gradient is largest, as its score
    study = badge.batch_embedding(_result(_embedding(space, points.numpy())))
    largest = int(np.argmax([np.linalg.norm(g) for g in grads]))
    np.testing.assert_allclose(study, grads[largest], rtol=1e-4, atol=1e-6)
    assert badge.batch_embedding(_result(None)) is None  # no head: the batch ranks by score
    assert _strategy("emoc").batch_embedding(_result(_embedding(space, points[0]))) is None


def test_emoc_is_the_expected_output_change_of_one_gradient_step(space):
    """One SGD step of the last layer on (x, y), y drawn from the model's own prediction:
    the root mean square over the training features of the L1 change of their logits,
    in expectation over y, equals the score up to the step size."""
    space, fc, train = space
    eta = 1e-3
    emoc = _strategy("emoc")
    points = torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(2)) * 2
    expected, scores = [], []
    for point in points:
        probs = torch.softmax(fc(point[None]), 1)[0].detach()
        change = 0.0
        for y in range(CLASSES):
            step = torch.nn.Linear(FEATURES, CLASSES)
            step.load_state_dict(fc.state_dict())
            torch.nn.functional.cross_entropy(step(point[None]), torch.tensor([y])).backward()
            with torch.no_grad():
                before = step(train)
                for p in step.parameters():
                    p -= eta * p.grad
                moved = (step(train) - before).abs().sum(1)  # L1 change of each x'
            change += float(probs[y]) * float(moved.square().mean().sqrt()) / eta
        expected.append(change)
        scores.append(emoc.components(_result(_embedding(space, point.numpy())))["emoc"])
    np.testing.assert_allclose(scores, expected, rtol=0.02)


def test_alfa_mix_scores_how_small_a_mix_toward_an_anchor_flips_the_prediction(space):
    space, fc, _ = space
    alfa = _strategy("alfa_mix")
    points = torch.randn(6, FEATURES, generator=torch.Generator().manual_seed(3)) * 2
    for point in points.numpy():
        embedding = _embedding(space, point)
        eps = float(flip_distance(embedding)[0])
        assert alfa.components(_result(embedding))["alfa_mix"] == pytest.approx(1 / (1 + eps))
        predicted = int(embedding.logits().argmax())
        # the smallest flipping mix, found by trying every anchor and class the long way
        best = None
        for anchor in space.anchors.astype(np.float64):
            for other in range(CLASSES):
                if other == predicted:
                    continue
                d = (anchor - point) * (space.weight[predicted] - space.weight[other])
                margin = float(embedding.logits()[0, predicted] - embedding.logits()[0, other])
                alpha = -margin * d / float(d @ d)  # the least-norm alpha that ties them
                if best is None or np.linalg.norm(alpha) < np.linalg.norm(best[0]):
                    best = (alpha, anchor)
        alpha, anchor = best
        assert np.linalg.norm(alpha) == pytest.approx(eps, rel=1e-5)

        def mixed(scale, alpha=alpha, anchor=anchor, point=point):
            mix = point + scale * alpha * (anchor - point)
            return int(_embedding(space, mix).logits().argmax())

        assert mixed(1.01) != predicted  # a little past it, the prediction flips
        assert mixed(0.99) == predicted  # short of it, it does not
    # on the decision boundary the smallest mix is none: the score is 1
    w, b = space.weight.astype(np.float64), space.bias.astype(np.float64)
    direction = w[0] - w[1]
    tie = points[0].numpy() - (points[0].numpy() @ direction + b[0] - b[1]) / (
        direction @ direction) * direction  # logits 0 and 1 equal
    tie_logits = _embedding(space, tie).logits()[0]
    if tie_logits[2] < tie_logits[0]:  # class 2 not on top: a true two-way tie
        assert alfa.components(_result(_embedding(space, tie)))["alfa_mix"] == pytest.approx(
            1.0, abs=1e-4)


def test_dal_scores_how_surely_a_study_is_unlike_the_labelled_set(space, tmp_path):
    space, fc, train = space
    generator = torch.Generator().manual_seed(4)
    unlabelled = train[:400] + torch.tensor([0, 0, 0, 4.0, 0, 0])  # shifted along feature 3
    found = fit_discriminator(train, unlabelled)
    assert (found.labelled, found.unlabelled) == (3000, 400)
    again = fit_discriminator(train, unlabelled)
    assert torch.equal(found.weight, again.weight) and found.bias == again.bias  # deterministic
    assert abs(float(found.weight[3])) == float(found.weight.abs().max())  # the shifted one
    head = replace(space.head, discriminator=found)
    dal = _strategy("dal")
    inside = torch.randn(50, FEATURES, generator=generator) * 0.1 + train[:50]
    outside = inside + torch.tensor([0, 0, 0, 4.0, 0, 0])
    with_dal = FeatureSpace(space.weight, space.bias, head)
    score = [dal.components(_result(StudyEmbedding(p.numpy()[None], with_dal)))["dal"]
             for p in (inside[0], outside[0])]
    assert score[1] > 0.5 > score[0]
    probs = found.prob_unlabelled(outside.numpy())
    assert probs.mean() > found.prob_unlabelled(inside.numpy()).mean() + 0.5
    # it travels in the head of a saved model (weights_only loading)
    model = ModelSettings(input_size=16, channels=(4, 8), subunits=1)
    net = build_network(model).eval()
    features = torch.randn(60, 8, generator=generator)
    classes = torch.arange(60) % 2
    own = fit_epistemic_features(net.fc, features, classes, features[:10], classes[:10],
                                 samples=2)  # fmt: skip
    fitted = fit_discriminator(features, features[:20] + 3.0)
    path = save_checkpoint(tmp_path / "m.pt", net, None, model,
                           epistemic=replace(own, discriminator=fitted))
    loaded = load_checkpoint(path, model).epistemic.discriminator
    np.testing.assert_allclose(loaded.prob_unlabelled(features.numpy()),
                               fitted.prob_unlabelled(features.numpy()), rtol=1e-6)
    assert (loaded.labelled, loaded.unlabelled) == (60, 20)
    # a head without the classifier: the uncertainty stands in, by its own reason
    scores, reason = dal.components_with_fallback(_result(_embedding(space, inside[0].numpy())))
    assert reason == NO_DISCRIMINATOR and scores == {"dal": 0.7}
    with pytest.raises(ValueError, match="empty|labelled and unlabelled"):
        fit_discriminator(train, train[:0])
    assert isinstance(Discriminator.from_state(found.state()), Discriminator)


def test_a_model_without_an_epistemic_head_falls_back_to_the_uncertainty():
    for name in ("badge", "emoc", "alfa_mix", "dal"):
        strategy = _strategy(name)
        scores, reason = strategy.components_with_fallback(_result(None))
        assert reason == NO_EPISTEMIC_HEAD and scores == {name: 0.7}  # entropy stands in
        with pytest.raises(ValueError, match="epistemic head"):
            strategy.components(_result(None))


def test_score_study_attaches_the_embedding_of_the_scored_images():
    settings = ModelSettings(input_size=16, channels=(4, 8), subunits=1, max_images_per_study=2)
    torch.manual_seed(0)
    net = build_network(settings).eval()
    images = torch.rand(40, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 2
    head = fit_epistemic(net, images, labels, images[:10], labels[:10], samples=4)
    study = images[:5]  # two of five images are scored: the first and the last
    result = score_study(net, None, study, settings, seed=0, epistemic=head)
    expected = pooled_features(net, study[[0, 4]]).numpy()
    np.testing.assert_allclose(result.embedding.features, expected, rtol=1e-5, atol=1e-6)
    assert result.embedding.space.head is head
    components, reason = _strategy("emoc").components_with_fallback(result)
    assert reason is None and np.isfinite(components["emoc"])
    assert score_study(net, None, study, settings, seed=0).embedding is None
