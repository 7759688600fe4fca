"""Last-layer Laplace and feature density: fitted on a trained model, stored, used."""

import numpy as np
import pytest
import torch

from triage.datasets import (
    find_data_dir,
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)
from triage.gate.measures import bald
from triage.model.checkpoint import load_checkpoint, save_checkpoint
from triage.model.epistemic import fit_epistemic, pooled_features
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.settings import ModelSettings, TrainSettings
from triage.model.training import auroc, fit

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


def test_laplace_samples_are_fixed_and_agree_with_the_network(trained):
    net, _, head, train_x, train_y, val_x, val_y = trained
    again = fit_epistemic(net, train_x, train_y, val_x, val_y, samples=20, seed=0)
    assert torch.equal(head.weights, again.weights)
    assert head.samples == 20 and head.prior_precision > 0
    features = pooled_features(net, val_x)
    mean = head.probs(features).mean(0)
    with torch.inference_mode():
        deterministic = torch.softmax(net.fc(features), -1)
    agree = (mean.argmax(1) == deterministic.argmax(1)).float().mean()
    assert agree >= 0.95  # the posterior is centred on the trained layer


def test_density_flags_images_unlike_the_training_data(trained):
    """Inverted radiographs and noise fields rank above the in-distribution val images.
    (The Laplace BALD does not: it is the error signal, the density the OOD one.)"""
    net, _, head, _, _, val_x, _ = trained
    generator = torch.Generator().manual_seed(0)
    unlike = torch.cat([1.0 - val_x[:100], torch.rand(100, *val_x.shape[1:], generator=generator)])
    with torch.inference_mode():
        inside = pooled_features(net, val_x)
        outside = pooled_features(net, unlike)
    flags = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    density = torch.cat([head.ood(inside), head.ood(outside)]).numpy()
    assert auroc(density, flags) >= 0.9


def test_laplace_bald_flags_the_networks_own_errors(trained):
    net, _, head, _, _, val_x, val_y = trained
    features = pooled_features(net, val_x)
    with torch.inference_mode():
        wrong = (net.fc(features).argmax(1) != val_y).numpy()
    assert 5 <= wrong.sum() <= len(wrong) // 2
    assert auroc(bald(head.probs(features)).numpy(), wrong) >= 0.75


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
