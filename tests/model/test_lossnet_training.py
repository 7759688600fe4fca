"""Loss predictor, ranking loss and joint training."""

import math
import numpy as np
import pytest
import torch

from triage.model.lossnet import LossPredictor, build_loss_predictor, ranking_loss
from triage.model.network import build_network
from triage.model.settings import ModelSettings, TrainSettings
from triage.model.training import Consistency, auroc, class_weights, fit

TINY = ModelSettings(input_size=16, channels=(4, 8), subunits=1)


def test_loss_predictor_shape():
    lossnet = LossPredictor([4, 8], width=16)
    maps = [torch.rand(5, 4, 8, 8), torch.rand(5, 8, 4, 4)]
    assert lossnet(maps).shape == (5,)
    with pytest.raises(ValueError, match="maps"):
        lossnet(maps[:1])


def test_fused_prediction_matches_forward_and_follows_training():
    """The scoring path's fused `predict` is `forward`, with the current weights."""
    torch.manual_seed(0)
    lossnet = LossPredictor([4, 8], width=16)
    with torch.inference_mode():  # the scorer's stage maps are inference tensors
        maps = [torch.rand(5, 4, 8, 8), torch.rand(5, 8, 4, 4)]
        expected = lossnet(maps).numpy()
        assert np.allclose(lossnet.predict(maps).numpy(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        lossnet.out.bias += 1.0  # an optimizer step changes weights in place
        lossnet.branches[1][0].weight.mul_(2.0)
    with torch.inference_mode():
        assert np.allclose(lossnet.predict(maps).numpy(), lossnet(maps).numpy(),
                           rtol=1e-5, atol=1e-6)
        assert not np.allclose(lossnet.predict(maps).numpy(), expected + 1.0)
    with pytest.raises(ValueError, match="maps"):
        lossnet.predict(maps[:1])


@pytest.mark.parametrize(
    ("predicted", "target", "margin", "expected"),
    [
        ([3.0, 0.0], [2.0, 1.0], 1.0, 0.0),  # right order, beyond margin
        ([0.5, 0.0], [2.0, 1.0], 1.0, 0.5),  # right order, inside margin
        ([0.0, 1.0], [2.0, 1.0], 1.0, 2.0),  # wrong order
        ([0.0, 1.0], [1.0, 2.0], 0.0, 0.0),  # right order, no margin
        ([0.0, 2.0, 0.0, 0.0, 9.0], [1.0, 3.0, 2.0, 0.0, 5.0], 1.0, 0.5),  # odd last left out
    ],
)
def test_ranking_loss_table(predicted, target, margin, expected):
    value = ranking_loss(torch.tensor(predicted), torch.tensor(target), margin)
    assert float(value) == pytest.approx(expected)


def test_ranking_loss_has_no_gradient_into_target():
    target = torch.tensor([1.0, 2.0], requires_grad=True)
    predicted = torch.tensor([0.0, 0.0], requires_grad=True)
    ranking_loss(predicted, target).backward()
    assert target.grad is None and predicted.grad is not None


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 0.75), ([1, 2, 3], [0, 1, 1], 1.0),
     ([3, 2, 1], [0, 1, 1], 0.0), ([1, 1, 1, 1], [0, 1, 0, 1], 0.5)],
)  # fmt: skip
def test_auroc_table(scores, labels, expected):
    assert auroc(np.array(scores), np.array(labels)) == pytest.approx(expected)


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_class_weights_inverse_frequency():
    weights = class_weights(torch.tensor([0, 1, 1, 1]), 2)
    assert torch.allclose(weights, torch.tensor([2.0, 2 / 3]))


def synthetic(n, seed):
    """Bright-blob images are class 1; easy enough to learn in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 16, 16, generator=g) * 0.5
    x[y == 1, :, 4:12, 4:12] += 0.5
    return x, y


@pytest.mark.parametrize("class_weighted", [False, True])
def test_fit_learns_and_is_seeded(class_weighted):
    x, y = synthetic(256, 0)
    vx, vy = synthetic(128, 1)
    train = TrainSettings(epochs=4, min_steps=0, batch_size=32, seed=3,
                          class_weighted=class_weighted, detach_after_fraction=0.6)
    histories, weights = [], []
    for _ in range(2):
        torch.manual_seed(0)
        net, lossnet = build_network(TINY), build_loss_predictor(TINY)
        history = fit(net, lossnet, x, y, train, val_images=vx, val_labels=vy)
        histories.append(history)
        weights.append(net.fc.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    first, last = histories[0].epochs[0], histories[0].last
    assert last["ce"] < first["ce"]
    # The data are built so that learning is certain: the blob class is separable by mean
    # brightness alone (0.9998-1.0 over 10 training seeds, 1 and 2 threads). Accuracy is
    # not asserted: it lags, BatchNorm running stats after 32 steps.
    assert last["val_auroc"] >= 0.95
    assert [e["detached"] for e in histories[0].epochs] == [0.0, 0.0, 0.0, 1.0]
    assert not net.training and not lossnet.training


def test_detached_features_keep_ranking_loss_out_of_the_backbone():
    x, y = synthetic(64, 0)
    trained = []
    for ranking_weight in (0.0, 5.0):
        settings = TrainSettings(epochs=2, batch_size=32, detach_after_fraction=0.0,
                                 ranking_weight=ranking_weight)  # fmt: skip
        torch.manual_seed(0)
        net, lossnet = build_network(TINY), build_loss_predictor(TINY)
        fit(net, lossnet, x, y, settings)
        trained.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [(torch.rand(4, 16, 16), torch.zeros(4, dtype=torch.long), "images"),
     (torch.rand(4, 1, 16, 16), torch.zeros(3, dtype=torch.long), "labels"),
     (torch.rand(4, 1, 16, 16), torch.zeros(4), "labels"),
     (torch.rand(4, 1, 16, 16), torch.full((4,), 2, dtype=torch.long), "labels")],
)  # fmt: skip
def test_fit_rejects_bad_data(images, labels, match):
    net, lossnet = build_network(TINY), build_loss_predictor(TINY)
    with pytest.raises(ValueError, match=match):
        fit(net, lossnet, images, labels, TrainSettings(epochs=1))


def test_odd_batch_size_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=33)


@pytest.mark.parametrize("num_images", [2, 4, 6, 8, 16, 18])
def test_fit_runs_any_short_one_cycle_schedule(num_images):
    """A retrain on a handful of labels plans only a few optimiser steps; the one-cycle
    schedule must not divide by a zero-length warm-up (4 steps crashed a real run)."""
    torch.manual_seed(0)
    net = build_network(TINY)
    lossnet = build_loss_predictor(TINY)
    images = torch.rand(num_images, 1, 16, 16)
    labels = torch.arange(num_images) % 2
    settings = TrainSettings(epochs=1, min_steps=0, batch_size=2)
    history = fit(net, lossnet, images, labels, settings)
    assert len(history.epochs) == 1
    assert np.isfinite(history.last["loss"])


def test_the_restarts_schedule_runs_its_cycles_back_to_the_peak():
    """`restarts`: each of `cycles` equal cycles starts at the peak learning rate and
    ends near 1/1000 of it (snapshot ensembles take a model at each cycle's end)."""
    torch.manual_seed(0)
    net, lossnet = build_network(TINY), build_loss_predictor(TINY)
    images, labels = torch.rand(32, 1, 16, 16), torch.arange(32) % 2
    settings = TrainSettings(epochs=8, min_steps=0, batch_size=8, learning_rate=1e-2,
                             schedule="restarts", cycles=2)  # 4 steps per epoch, 16 per cycle
    history = fit(net, lossnet, images, labels, settings)
    # the rate for the step after each epoch: a cosine from the peak over 16 steps, back
    # to the peak after steps 16 and 32
    expected = [1e-5 + (1e-2 - 1e-5) * (1 + math.cos(math.pi * (4 * (e + 1) % 16) / 16)) / 2
                for e in range(8)]
    assert [e["lr"] for e in history.epochs] == pytest.approx(expected)
    assert expected[3] == expected[7] == pytest.approx(1e-2) and expected[2] < 2e-3
    one_cycle = fit(build_network(TINY), build_loss_predictor(TINY), images, labels,
                    settings.model_copy(update={"schedule": "onecycle"}))
    assert all(b <= a for a, b in zip([e["lr"] for e in one_cycle.epochs][2:],
                                      [e["lr"] for e in one_cycle.epochs][3:], strict=False))


def _strong(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A stand-in strong view for the tests: noise added (any hook will do here)."""
    return (batch + 0.2 * torch.rand(batch.shape, generator=generator)).clamp(0, 1)


def _consistency_fit(consistency: Consistency | None):
    x, y = synthetic(64, 0)
    settings = TrainSettings(epochs=3, min_steps=0, batch_size=32, seed=1)
    torch.manual_seed(0)
    net, lossnet = build_network(TINY), build_loss_predictor(TINY)
    history = fit(net, lossnet, x, y, settings, consistency=consistency)
    return [p.detach().clone() for p in net.parameters()], history


def test_consistency_trains_on_the_unlabelled_images_and_reports_its_mask():
    pool, _ = synthetic(200, 5)
    with_pool, history = _consistency_fit(Consistency(pool, _strong, threshold=0.6))
    without, plain = _consistency_fit(None)
    assert not all(torch.equal(a, b) for a, b in zip(with_pool, without, strict=True))
    assert all(0.0 <= e["masked"] <= 1.0 and e["consistency"] >= 0.0 for e in history.epochs)
    assert any(e["masked"] > 0 and e["consistency"] > 0 for e in history.epochs)
    assert "consistency" not in plain.last and "masked" not in plain.last


def test_consistency_only_supervises_confident_predictions():
    """At threshold 1.0 no weak view of a barely trained net is certain: nothing passes
    the mask and the consistency loss stays exactly 0."""
    pool, _ = synthetic(200, 5)
    _, history = _consistency_fit(Consistency(pool, _strong, threshold=1.0))
    assert all(e["masked"] == 0.0 and e["consistency"] == 0.0 for e in history.epochs)


def test_consistency_rejects_bad_images_and_settings():
    x, y = synthetic(8, 0)
    net, lossnet = build_network(TINY), build_loss_predictor(TINY)
    with pytest.raises(ValueError, match="shaped like images"):
        fit(net, lossnet, x, y, TrainSettings(epochs=1, batch_size=4),
            consistency=Consistency(torch.rand(4, 1, 8, 8), _strong))
    for bad in ({"images": torch.rand(0, 1, 16, 16)}, {"images": torch.rand(4, 16, 16)},
                {"threshold": 0.5}, {"weight": -1.0}, {"ratio": 0}):
        with pytest.raises(ValueError, match="consistency"):
            Consistency(**{"images": torch.rand(4, 1, 16, 16), "strong_augment": _strong,
                           **bad})
