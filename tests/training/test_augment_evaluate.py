"""Augmentation hook and study-level validation metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from triage.training.augment import make_augment, make_strong_augment
from triage.training.evaluate import classification_metrics, expected_calibration_error
from triage.training.settings import RetrainSettings


def test_augment_is_seeded_bounded_and_mild():
    augment = make_augment(RetrainSettings(), 28)
    x = torch.zeros(16, 1, 28, 28)
    x[..., 8:20, 4:10] = 1.0  # a bright block on the left
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    left, right = a[..., :, :14].sum(), a[..., :, 14:].sum()
    assert left > 5 * right  # never mirrored: the block stays on its side
    assert make_augment(RetrainSettings(augment=False), 28) is None


def test_shift_only_augmentation_moves_whole_pixels_and_blurs_nothing():
    """With no rotation or zoom every image is a whole-pixel shift of the original: its
    pixels keep their values (no bilinear mixing), only padding zeros are new."""
    settings = RetrainSettings(rotate_degrees=0, zoom=0, shift_fraction=0.1, intensity=0)
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = make_augment(settings, 28)(x, torch.Generator().manual_seed(1))
    moved = 0
    for original, shifted in zip(x[:, 0], out[:, 0], strict=True):
        found = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if (_shift(original, dy, dx) - shifted).abs().max() < 1e-5]  # float32 grid
        assert len(found) == 1, "not a whole-pixel shift"
        moved += found[0] != (0, 0)
    assert moved >= 16  # 80% of images are warped; most by at least one pixel


def _shift(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by (dy, dx) pixels, zeros where nothing came in."""
    out = torch.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        image[max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def test_classification_metrics_table():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1, 0, 1])
    m = classification_metrics(probs, labels)
    assert m["auroc"] == pytest.approx(5 / 6)  # 5 of 6 positive-negative pairs ordered
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 2)
    assert m["n"] == 5 and 0 <= m["ece"] <= 1
    single = classification_metrics(probs[labels == 1], labels[labels == 1])
    assert math.isnan(single["auroc"]) and math.isnan(single["specificity"])


def test_ece_of_a_calibrated_and_an_overconfident_model():
    probs = np.array([[0.2, 0.8]] * 10)
    calibrated = np.array([1] * 8 + [0] * 2)
    assert expected_calibration_error(probs, calibrated) == pytest.approx(0.0)
    assert expected_calibration_error(probs, np.zeros(10, dtype=int)) == pytest.approx(0.8)


def test_strong_view_is_seeded_bounded_unmirrored_and_cut_out():
    """FixMatch's strong view: a zeroed square of 40% of the side in every image, values
    in [0, 1], the same draws for the same seed, and a left-side block stays left."""
    augment = make_strong_augment(28)
    x = torch.ones(16, 1, 28, 28)
    a = augment(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(3)))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    side = round(0.4 * 28)
    for image in a[:, 0]:
        zero = (image == 0).float()
        # some side x side window is entirely zero (the cut-out)
        windows = torch.nn.functional.avg_pool2d(zero[None, None], side, stride=1)
        assert windows.max() == 1.0
    block = torch.zeros(16, 1, 28, 28)
    block[..., 8:20, 2:8] = 1.0
    b = augment(block, torch.Generator().manual_seed(4))
    assert b[..., :14].sum() > 5 * b[..., 14:].sum()
