"""Last-layer Laplace and feature density: fitted, stored, used.

What the posterior and the density do is asserted on planted features whose outcome is
certain; a small network trained on real dev images checks the fit and the checkpoint
round trip, never a quality threshold (quality figures live in bench/gate_cost.py)."""

import numpy as np
import pytest
import torch

from triage.model.checkpoint import load_checkpoint, save_checkpoint
from triage.model.epistemic import fit_epistemic, fit_epistemic_features, pooled_features
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.measures import bald
from triage.model.network import build_network
from triage.model.settings import ModelSettings, TrainSettings
from triage.model.training import auroc, fit
from triage.replay.datasets import (
    find_data_dir,
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)

SKIP = "PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place it in ../shared/data"
SMALL = ModelSettings(
    input_size=28, channels=(8, 16, 32), subunits=1, max_images_per_study=2,
    training=TrainSettings(epochs=6, min_steps=0, batch_size=64, seed=0),
)  # fmt: skip


@pytest.fixture(scope="module")
def trained():
    """A small network trained on 1,200 real dev-train images, with its epistemic head
    fitted on them and dev val."""
    if find_data_dir() is None:
        pytest.skip(SKIP)
    data = load_pneumoniamnist_dev()
    order = np.random.default_rng(0).permutation(len(data["train_labels"]))[:1200]
    train_x = images_to_tensor(data["train_images"][order], SMALL.input_size)
    train_y = labels_to_tensor(data["train_labels"][order])
    val_x = images_to_tensor(data["val_images"], SMALL.input_size)
    val_y = labels_to_tensor(data["val_labels"])
    torch.manual_seed(0)
    net, lossnet = build_network(SMALL), build_loss_predictor(SMALL)
    fit(net, lossnet, train_x, train_y, SMALL.training)
    net.eval()
    lossnet.eval()
    head = fit_epistemic(net, train_x, train_y, val_x, val_y, samples=20, seed=0)
    return net, lossnet, head, train_x, train_y, val_x, val_y


def test_laplace_samples_are_fixed(trained):
    net, _, head, train_x, train_y, val_x, val_y = trained
    again = fit_epistemic(net, train_x, train_y, val_x, val_y, samples=20, seed=0)
    assert torch.equal(head.weights, again.weights)
    assert head.samples == 20 and head.prior_precision > 0
    assert head.weights.shape == (20, net.fc.in_features + 1, 2)


# Planted features: the posterior's shape is known, so every outcome below is certain on
# any CPU and thread count (no trained network: its solution moves with floating point).
# Training and held-out features spread along feature 0 across the decision boundary
# (which pins the weights of feature 0) and barely along feature 1 (which leaves its
# weights loose). The last layer is the well-specified logistic model, logit gap 2 x0.
def _planted_points(n, generator):
    side = torch.where(torch.arange(n) % 2 == 0, -1.0, 1.0)
    x0 = side + 0.8 * torch.randn(n, generator=generator)
    features = torch.stack([x0, 0.05 * torch.randn(n, generator=generator)], 1)
    labels = (torch.rand(n, generator=generator) < torch.sigmoid(2 * x0)).long()
    return features, labels


@pytest.fixture(scope="module")
def planted():
    generator = torch.Generator().manual_seed(0)
    fc = torch.nn.Linear(2, 2)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        fc.bias.zero_()
    train, train_y = _planted_points(400, generator)
    held, held_y = _planted_points(200, generator)
    head = fit_epistemic_features(fc, train, train_y, held, held_y, samples=20, seed=0)
    side = torch.tensor([1.0, -1.0]).repeat(10)
    points = {
        # far from the boundary, inside the data: right, and everyone agrees
        "confident": (torch.stack([2.5 * side, 0 * side], 1), side > 0),
        # on the boundary, inside the data: right, but a coin flip for any model
        "boundary": (torch.stack([0.02 * side, 0 * side], 1), side > 0),
        # off the data along feature 1, where the posterior is wide: planted errors
        "errors": (torch.stack([0.6 * side, 4.0 * side.flip(0)], 1), side < 0),
    }
    return fc, head, {k: (f, y.long()) for k, (f, y) in points.items()}


def test_posterior_is_centred_on_the_trained_layer(planted):
    fc, head, points = planted
    inside = torch.cat([points["confident"][0], points["boundary"][0]])
    with torch.inference_mode():
        deterministic = fc(inside).argmax(1)
    assert torch.equal(head.probs(inside).mean(0).argmax(1), deterministic)


def test_laplace_bald_flags_errors_where_the_posterior_is_wide(planted):
    """BALD is epistemic: high off the data, low on the boundary inside it, where the
    predictive entropy is just as high as on the errors."""
    fc, head, points = planted
    features = torch.cat([f for f, _ in points.values()])
    labels = torch.cat([y for _, y in points.values()])
    with torch.inference_mode():
        wrong = (fc(features).argmax(1) != labels).numpy()
    assert wrong.tolist() == [False] * 40 + [True] * 20  # the errors are the planted ones
    scores = {k: bald(head.probs(f)) for k, (f, _) in points.items()}
    assert auroc(torch.cat(list(scores.values())).numpy(), wrong) == 1.0
    assert scores["errors"].min() > 0.5 > 0.01 > scores["boundary"].max()
    boundary = head.probs(points["boundary"][0]).mean(0)
    entropy = -(boundary * boundary.log()).sum(-1)
    assert entropy.min() > 0.69  # ln 2 = 0.693: entropy alone cannot tell them apart


def test_density_flags_features_unlike_the_training_data(planted):
    _, head, points = planted
    inside = head.ood(torch.cat([points["confident"][0], points["boundary"][0]]))
    outside = head.ood(points["errors"][0])
    assert outside.min() > inside.max()
    assert head.ood_threshold_source == "validation"
    assert inside.max() < head.ood_threshold < outside.min()


def test_checkpoint_keeps_the_head_and_scoring_uses_it(trained, tmp_path):
    net, lossnet, head, _, _, val_x, _ = trained
    path = save_checkpoint(tmp_path / "m.pt", net, lossnet, SMALL, epistemic=head)
    checkpoint = load_checkpoint(path, SMALL)
    assert torch.equal(checkpoint.epistemic.weights, head.weights)
    images = val_x[:2]
    laplace = SMALL.model_copy(update={"epistemic": "laplace"})
    first = score_study(net, lossnet, images, laplace, seed=1, epistemic=checkpoint.epistemic)
    second = score_study(net, lossnet, images, laplace, seed=2, epistemic=checkpoint.epistemic)
    assert first.sampler == "laplace" and first.ood is not None
    # the weight samples are part of the model: the dropout seed changes nothing
    assert first.uncertainty == second.uncertainty and first.probs == second.probs
    dropout = score_study(net, lossnet, images, SMALL, seed=1, epistemic=checkpoint.epistemic)
    assert dropout.sampler == "mc_dropout" and dropout.ood == pytest.approx(first.ood, rel=1e-5)


def test_models_without_a_head_are_scored_by_mc_dropout(tmp_path):
    settings = ModelSettings(input_size=16, channels=(4, 8), subunits=1, epistemic="laplace")
    torch.manual_seed(0)
    net, lossnet = build_network(settings).eval(), build_loss_predictor(settings).eval()
    checkpoint = load_checkpoint(save_checkpoint(tmp_path / "old.pt", net, lossnet, settings))
    assert checkpoint.epistemic is None
    result = score_study(net, lossnet, torch.rand(1, 1, 16, 16), settings,
                         epistemic=checkpoint.epistemic)  # fmt: skip
    assert result.sampler == "mc_dropout" and result.ood is None
