"""Input quality of the images the model sees: sharpness, contrast and brightness.

The feature density (`triage.model.epistemic`) flags CT and MR slices, inverted films,
noise and patched images, but a heavily blurred radiograph keeps features that look
typical to the network (bench/gate_cost.py: density AUROC 0.27 on blurred dev val
images). Blur, a washed-out film or a crop magnified to fill the frame are properties
of the image, not of what it shows, and three numbers per image measure them directly
on the preprocessed tensor the network reads:

* **sharpness**: log of the mean squared 3x3 Laplacian (high-frequency energy; the
  variance-of-Laplacian focus measure, Pech-Pacheco et al., ICPR 2000). Blur and
  magnification lower it, noise raises it.
* **contrast**: log of the intensity standard deviation. A washed-out or blank film
  lowers it.
* **brightness**: mean intensity.

`QualityReference` holds the three numbers' mean and covariance over the training
images; an image's quality score is its Mahalanobis distance from them (sharpness and
contrast are correlated, r = 0.78 on PneumoniaMNIST: a washed-out film is less sharp too,
and the distance does not count that twice). Measured on dev val (train as reference,
bench/gate_cost.py's corruptions): the distance ranks blurred images above clean ones
with AUROC 1.000, magnified crops 0.998, washed-out 0.993, against 0.989 / 0.975 / 0.995
for the largest per-term robust z-score. `QualityReference.term` names the term that
departs most (in marginal standard deviations), for the reader.
The network's epistemic head combines the distance with the density
(`EpistemicHead.ood`), so a study is flagged when either looks unlike the training data.
Cost: one 3x3 Laplacian and three sums per image, about 0.05 ms at 64 px.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

QUALITY_TERMS: tuple[str, ...] = ("sharpness", "contrast", "brightness")
"""The per-image quality numbers, in column order of `image_quality`."""

_EPS = 1e-10


def image_quality(images: torch.Tensor) -> torch.Tensor:
    """Sharpness, contrast and brightness of images [N, 1, S, S] in [0, 1] -> [N, 3].

    Raises:
        ValueError: `images` is not [N, 1, S, S] with S >= 3.
    """
    return torch.from_numpy(image_quality_array(images))


def image_quality_array(images: torch.Tensor) -> np.ndarray:
    """`image_quality` as a float32 numpy array (the scoring path stays in numpy: on one
    64 px image a numpy operation costs a fraction of a torch one)."""
    if images.ndim != 4 or images.shape[1] != 1 or min(images.shape[2:]) < 3:
        raise ValueError(f"images must be [N, 1, S, S] with S >= 3, got {tuple(images.shape)}")
    n = images.shape[0]
    x = images.detach().cpu().float().numpy().reshape(n, images.shape[2], images.shape[3])
    lap = x[:, 1:-1, 1:-1] * -4.0  # the 3x3 Laplacian, valid part
    lap += x[:, :-2, 1:-1]
    lap += x[:, 2:, 1:-1]
    lap += x[:, 1:-1, :-2]
    lap += x[:, 1:-1, 2:]
    lap = lap.reshape(n, -1)
    flat = x.reshape(n, -1)
    size = flat.shape[1]
    high = np.einsum("ni,ni->n", lap, lap, dtype=np.float64) / lap.shape[1]
    total = flat.sum(axis=1, dtype=np.float64)
    mean = total / size
    var = np.maximum(np.einsum("ni,ni->n", flat, flat, dtype=np.float64) - total * mean, 0.0)
    std = np.sqrt(var / max(size - 1, 1))
    return np.stack([np.log(high + _EPS), np.log(std + _EPS), mean], axis=1).astype(np.float32)


def cholesky_with_jitter(cov: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of a covariance [D, D] with the smallest diagonal jitter of a
    fixed ladder that makes it positive definite (as in DDU); None if none does."""
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for jitter in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2, 1.0):
        root, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            return root
    return None


@dataclass(frozen=True)
class QualityReference:
    """Mean and covariance of the quality terms over the training images.

    Attributes:
        mean: Mean of each term, [3] (`QUALITY_TERMS` order).
        whiten: [3, 3] with (q - mean) @ whiten ~ N(0, I): the inverse Cholesky factor of
            the covariance (with the smallest diagonal jitter that makes it positive
            definite).
        scale: Standard deviation of each term, [3] (at least 1e-6), for `term`.
    """

    mean: torch.Tensor
    whiten: torch.Tensor
    scale: torch.Tensor
    _np: tuple[np.ndarray, np.ndarray, np.ndarray] = field(init=False, repr=False,
                                                           compare=False)  # fmt: skip

    def __post_init__(self) -> None:
        # the scoring path works on numpy terms (`image_quality_array`) of one study
        arrays = tuple(t.detach().float().numpy() for t in (self.mean, self.whiten, self.scale))
        object.__setattr__(self, "_np", arrays)

    @classmethod
    def fit(cls, images: torch.Tensor, batch: int = 1024) -> "QualityReference":
        """The reference of training images [N, 1, S, S] (N >= 1)."""
        if len(images) == 0:
            raise ValueError("cannot fit a quality reference on no images")
        terms = torch.from_numpy(np.concatenate([
            image_quality_array(images[i : i + batch]) for i in range(0, len(images), batch)
        ])).double()  # fmt: skip
        eye = torch.eye(terms.shape[1], dtype=terms.dtype)
        cov = torch.cov(terms.T) if len(terms) > 1 else eye
        cov = torch.where(torch.isfinite(cov), cov, eye)
        root = cholesky_with_jitter(cov)
        if root is None:  # pragma: no cover - cov + I is positive definite
            raise ValueError("quality covariance is not positive definite")
        whiten = torch.linalg.solve_triangular(root, eye, upper=False).T
        scale = torch.diagonal(cov).clamp_min(1e-12).sqrt().clamp_min(1e-6)
        return cls(mean=terms.mean(0).float(), whiten=whiten.float(), scale=scale.float())

    def distance(self, images: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of each image's quality terms from the training images'
        [N, 1, S, S] -> [N]."""
        return torch.from_numpy(self.distance_of(image_quality_array(images)))

    def distance_of(self, terms: np.ndarray) -> np.ndarray:
        """`distance` of terms [N, 3] already computed by `image_quality_array`."""
        mean, whiten, _ = self._np
        return np.sqrt(np.square((terms - mean) @ whiten).sum(axis=1))

    def term(self, images: torch.Tensor) -> list[str]:
        """For each image, the `QUALITY_TERMS` entry furthest from the training mean in
        its own standard deviations (what the reader is told is unusual)."""
        return self.term_of(image_quality_array(images))

    def term_of(self, terms: np.ndarray) -> list[str]:
        """`term` of terms [N, 3] already computed by `image_quality_array`."""
        mean, _, scale = self._np
        return [QUALITY_TERMS[int(i)] for i in np.abs((terms - mean) / scale).argmax(axis=1)]
