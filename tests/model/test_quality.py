"""Input quality terms (sharpness, contrast, brightness) and their reference distance,
on synthetic films built so that each corruption changes one known thing."""

import math

import pytest
import torch
import torch.nn.functional as F

from triage.model.quality import QUALITY_TERMS, QualityReference, image_quality

SIZE = 32


def _films(n: int, seed: int) -> torch.Tensor:
    """Textured images within [0.2, 0.65]: random sinusoid mixtures plus fine grain, of
    varied contrast (as films are)."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 2 * math.pi, SIZE)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    films = []
    for _ in range(n):
        image = torch.zeros(SIZE, SIZE)
        for _ in range(4):
            fy, fx = torch.randint(1, 8, (2,), generator=g).tolist()
            phase = float(torch.rand(1, generator=g)) * 2 * math.pi
            image += torch.sin(fy * yy + fx * xx + phase)
        image += 0.5 * torch.randn(SIZE, SIZE, generator=g)
        image = (image - image.min()) / (image.max() - image.min())
        films.append(0.2 + (0.25 + 0.2 * float(torch.rand(1, generator=g))) * image)
    return torch.stack(films)[:, None]


def _blur(images: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    taps = torch.arange(-6, 7, dtype=torch.float32)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    padded = F.pad(images, (6, 6, 6, 6), mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))


def test_blur_lowers_sharpness_and_a_shift_changes_only_brightness() -> None:
    films = _films(20, seed=0)
    clean, blurred = image_quality(films), image_quality(_blur(films))
    assert clean.shape == (20, len(QUALITY_TERMS))
    sharp = QUALITY_TERMS.index("sharpness")
    assert (blurred[:, sharp] < clean[:, sharp] - 1.0).all()
    shifted = image_quality(films + 0.3)
    bright = QUALITY_TERMS.index("brightness")
    assert torch.allclose(shifted[:, bright], clean[:, bright] + 0.3, atol=1e-5)
    others = [i for i in range(len(QUALITY_TERMS)) if i != bright]
    assert torch.allclose(shifted[:, others], clean[:, others], atol=1e-4)


def test_corrupted_films_are_far_from_the_reference_and_named() -> None:
    reference = QualityReference.fit(_films(300, seed=1))
    unseen = _films(50, seed=2)
    inside = reference.distance(unseen)
    blurred = _blur(unseen, sigma=3.0)
    assert reference.distance(blurred).min() > inside.max()
    assert set(reference.term(blurred)) == {"sharpness"}
    brighter = unseen + 0.35
    assert reference.distance(brighter).min() > inside.max()
    assert set(reference.term(brighter)) == {"brightness"}
    blank = torch.full((1, 1, SIZE, SIZE), 0.4)  # no structure at all: an empty film
    distance = reference.distance(blank)
    assert torch.isfinite(distance).all() and distance.item() > inside.max().item()


def test_bad_shapes_and_empty_references_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\[N, 1, S, S\]"):
        image_quality(torch.zeros(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="no images"):
        QualityReference.fit(torch.zeros(0, 1, SIZE, SIZE))
