"""Cheap epistemic uncertainty over the pooled features: last-layer Laplace and a density.

MC dropout at the cheap `head` scope samples only the dropout before the last linear
layer, and its BALD flags the classifier's errors poorly (bench/gate_cost.py). Two terms
fitted once after training, on the pooled features of the deterministic trunk, cost one
small matrix product per study instead:

* **Last-layer Laplace** (MacKay 1992; Daxberger et al., "Laplace Redux", NeurIPS 2021):
  a Gaussian posterior over the weights and bias of the final linear layer, centred on
  the trained ones, with precision H + lambda I, where H is the generalised Gauss-Newton
  Hessian of the training cross-entropy, sum_i a_i a_i^T (x) (diag p_i - p_i p_i^T)
  (a_i = [features_i, 1], p_i the trained softmax). The prior precision lambda is the one
  of a fixed grid with the lowest predictive NLL on the validation set (the audit labels
  in the daemon). T weight matrices are drawn once, from a fixed seed, so a study always
  gets the same samples; its T predictive distributions give BALD and the other measures.
* **Feature density** (DDU: Mukhoti et al., "Deep Deterministic Uncertainty", CVPR 2023):
  one Gaussian per class over the training features; a study's `ood` score is
  -max_c log(pi_c N(phi | mu_c, Sigma_c)), larger = less like the training data.
* **OOD flag**: the threshold above which a score is flagged "unlike the training data"
  is the `OOD_QUANTILE` (99 %) quantile of the held-out validation images' scores, i.e.
  their 1st percentile of log-density, so about 1 % of in-distribution images are
  flagged; with no validation image, of the training images' (whose scores are lower,
  the density being fitted on them: more false flags). It is stored with the density;
  `EpistemicHead.unlike_training` compares a study's score (max over its scored images)
  with it. Heads fitted before the threshold existed have none: the flag is unknown
  (None). The flag is shown to readers; it does not change routing.
* **Input quality** (`triage.model.quality`): the density misses heavily blurred films,
  whose features look typical. A head fitted with images (`fit_epistemic`) also holds
  the training images' sharpness, contrast and brightness; its `ood` score is then the
  larger of two terms, each scaled on the held-out images so that 0 is their median and
  1 their 99th percentile: the density, and the Mahalanobis distance of the image's
  quality terms from the training images' (`ood_terms`). `ood_term` names what was
  unlike (`OOD_TERMS`: `features`, or the quality term that departs most: a blurred
  film shows as `sharpness`). Heads fitted on features alone, or saved before the
  quality term existed, score the density alone, as before.

The density and the Laplace samples need only the features the deterministic pass
computes anyway; the quality terms one 3x3 Laplacian of the input.
"""

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import torch

from triage.model.discriminator import Discriminator
from triage.model.mc_dropout import McOutput, mc_dropout_mode
from triage.model.network import TriageNet
from triage.model.quality import (
    QUALITY_TERMS,
    QualityReference,
    cholesky_with_jitter,
    image_quality_array,
)

PRIOR_PRECISIONS: tuple[float, ...] = tuple(10.0**e for e in range(-6, 5))
"""Grid of prior precisions lambda tried by `fit_epistemic`."""
_NLL_DRAWS = 500
OOD_QUANTILE = 0.99
"""Quantile of the held-out images' `ood` scores that is the flag threshold: about 1 % of
in-distribution images score above it (their 1st percentile of log-density)."""
OOD_TERMS: tuple[str, ...] = ("features", *QUALITY_TERMS)
"""What a quality-aware `ood` score can name as unlike the training data (`ood_term`)."""


@dataclass(frozen=True)
class EpistemicHead:
    """The fitted terms; tensors are float32 on the CPU.

    Attributes:
        weights: Sampled [W^T; b] matrices of the last layer, [T, F + 1, C].
        prior_precision: The chosen lambda.
        validation_nll: Predictive NLL of the Laplace posterior on the validation set.
        means: Class means of the training features, [C, F].
        whiten: Per class, a matrix [F, F] with (phi - mu_c) @ whiten[c] ~ N(0, I); [C, F, F].
        log_norm: log pi_c - log det(Sigma_c) / 2 - F/2 log(2 pi), [C].
        ood_threshold: `ood` scores above it are flagged unlike the training data (the
            `OOD_QUANTILE` quantile of the held-out scores); None: not fitted (older
            files), the flag is unknown.
        ood_threshold_source: Whose scores gave it: `validation` or `training`.
        quality: The training images' input-quality reference, or None (fitted on
            features alone, or an older file): then `ood` is the density alone.
        ood_center, ood_scale: With `quality`: the median and (99th percentile - median)
            of the held-out images' density scores and quality distances, [2]; each
            column of `ood_terms` is (raw - center) / scale.
        discriminator: The labelled-versus-unlabelled classifier of the `dal` strategy
            (`triage.model.discriminator`), fitted at promotion when that strategy is
            configured; None otherwise.
    """

    weights: torch.Tensor
    prior_precision: float
    validation_nll: float
    means: torch.Tensor
    whiten: torch.Tensor
    log_norm: torch.Tensor
    ood_threshold: float | None = None
    ood_threshold_source: str | None = None
    quality: QualityReference | None = None
    ood_center: torch.Tensor | None = None
    ood_scale: torch.Tensor | None = None
    discriminator: Discriminator | None = None
    _flat: torch.Tensor = field(init=False, repr=False, compare=False)
    _np: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # [F + 1, T * C]: one plain matrix product per study instead of T batched ones
        samples, rows, classes = self.weights.shape
        flat = self.weights.permute(1, 0, 2).reshape(rows, samples * classes).contiguous()
        object.__setattr__(self, "_flat", flat)
        # numpy copies for single studies: on a [1, F] input a numpy operation costs a
        # fraction of a torch one, and the `ood` path is a dozen of them
        arrays = {"means": self.means, "whiten": self.whiten, "log_norm": self.log_norm}
        if self.quality is not None and self.ood_center is not None and self.ood_scale is not None:
            arrays.update(center=self.ood_center, scale=self.ood_scale)
        object.__setattr__(self, "_np", {k: v.detach().float().numpy() for k, v in arrays.items()})

    @property
    def samples(self) -> int:
        """Number of weight samples T."""
        return int(self.weights.shape[0])

    @property
    def anchors(self) -> np.ndarray:
        """The class means of the training features, [C, F], numpy (read-only view)."""
        return self._np["means"]

    @cached_property
    def feature_moment(self) -> np.ndarray:
        """Second moment E[a a^T] of the augmented training features a = [phi, 1],
        [F + 1, F + 1], float64, from the class Gaussians: sum_c pi_c E_c[a a^T], with
        Sigma_c = (whiten_c whiten_c^T)^-1 and pi_c recovered from `log_norm` (the
        covariance includes the jitter the fit added). Derived, not stored: every head
        saved since the density existed has it."""
        means = self.means.double().numpy()
        whiten = self.whiten.double().numpy()
        classes, features = means.shape
        # log_norm = log pi_c - log det(Sigma_c) / 2 - F/2 log(2 pi); whiten_c = L_c^-T,
        # so log det(Sigma_c) / 2 = -sum log |diag whiten_c|
        half_logdet = -np.log(np.abs(np.diagonal(whiten, axis1=1, axis2=2))).sum(1)
        log_prior = (self.log_norm.double().numpy() + half_logdet
                     + 0.5 * features * math.log(2 * math.pi))  # fmt: skip
        prior = np.exp(log_prior - log_prior.max())
        prior /= prior.sum()
        moment = np.zeros((features + 1, features + 1))
        for c in range(classes):
            cov = np.linalg.inv(whiten[c] @ whiten[c].T)
            mu = means[c]
            block = np.empty_like(moment)
            block[:features, :features] = cov + np.outer(mu, mu)
            block[:features, features] = block[features, :features] = mu
            block[features, features] = 1.0
            moment += prior[c] * block
        moment.setflags(write=False)
        return moment

    def probs(self, features: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Predictive distributions of the T weight samples, [T, N, C], for features [N, F]."""
        logits = torch.addmm(self._flat[-1], features, self._flat[:-1])  # [N, T * C]
        logits = logits.view(features.shape[0], self.samples, -1).transpose(0, 1)
        return torch.softmax(logits / temperature, dim=-1)

    def density(self, features: torch.Tensor) -> torch.Tensor:
        """-max_c log(pi_c N(phi | mu_c, Sigma_c)) of features [N, F] -> [N]."""
        return torch.from_numpy(self._density(_numpy(features)))

    def _density(self, features: np.ndarray) -> np.ndarray:
        centred = features[None] - self._np["means"][:, None]  # [C, N, F]
        distance = np.square(np.matmul(centred, self._np["whiten"])).sum(-1)  # [C, N]
        return -(self._np["log_norm"][:, None] - 0.5 * distance).max(0)

    def ood(self, features: torch.Tensor, images: torch.Tensor | None = None) -> torch.Tensor:
        """How unlike the training data each image is, [N]: the density of its features
        [N, F], or, for a head with a quality reference, the larger of `ood_terms`
        (then `images` [N, 1, S, S], the network's input, are needed)."""
        if self.quality is None:
            return self.density(features)
        return self.ood_terms(features, images).max(1).values

    def ood_terms(self, features: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """The scaled density and quality distance of each image, [N, 2]: 0 is the
        held-out images' median, 1 their 99th percentile.

        Raises:
            ValueError: The head has no quality reference, or `images` is None.
        """
        return torch.from_numpy(self._ood_terms(features, images)[0])

    def ood_term(self, features: torch.Tensor, images: torch.Tensor) -> tuple[float, str | None]:
        """A study's `ood` score (max over its images [K, 1, S, S] and features [K, F])
        and the `OOD_TERMS` entry that gave it; the term is None for a head without a
        quality reference, whose score is the density alone."""
        if self.quality is None:
            return float(self._density(_numpy(features)).max()), None
        terms, measured = self._ood_terms(features, images)
        image, column = divmod(int(terms.argmax()), terms.shape[1])
        name = "features" if column == 0 else self.quality.term_of(measured[image : image + 1])[0]
        return float(terms[image, column]), name

    def _ood_terms(self, features: torch.Tensor, images: torch.Tensor | None
                   ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        if self.quality is None or "center" not in self._np:
            raise ValueError("this head has no input-quality reference")
        if images is None:
            raise ValueError("this head scores input quality: the images are needed")
        measured = image_quality_array(images)
        raw = np.stack([self._density(_numpy(features)), self.quality.distance_of(measured)],
                       axis=1)  # fmt: skip
        return (raw - self._np["center"]) / self._np["scale"], measured

    def unlike_training(self, score: float | None) -> bool | None:
        """Whether an `ood` score (a study's: the max over its scored images) is above the
        flag threshold; None when the score or the threshold is unknown.

        Informative only: the flag is stored with the decision and shown to readers, and
        routing never depends on it.
        """
        if score is None or self.ood_threshold is None or not math.isfinite(score):
            return None
        return bool(score > self.ood_threshold)

    def state(self) -> dict[str, Any]:
        """Tensors and numbers only, for `torch.save(..., weights_only=True)` files."""
        state = {
            "weights": self.weights, "prior_precision": self.prior_precision,
            "validation_nll": self.validation_nll, "means": self.means,
            "whiten": self.whiten, "log_norm": self.log_norm,
        }  # fmt: skip
        if self.ood_threshold is not None:
            state["ood_threshold"] = self.ood_threshold
            state["ood_threshold_source"] = self.ood_threshold_source or ""
        if self.quality is not None:
            state["quality_mean"] = self.quality.mean
            state["quality_whiten"] = self.quality.whiten
            state["quality_scale"] = self.quality.scale
            state["ood_center"] = self.ood_center
            state["ood_scale"] = self.ood_scale
        if self.discriminator is not None:
            state["discriminator"] = self.discriminator.state()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "EpistemicHead":
        """Inverse of `state` (KeyError/TypeError on a damaged mapping); a state saved
        before the flag threshold or the quality term existed loads without it."""
        threshold = state.get("ood_threshold")
        quality = None
        if "quality_mean" in state:
            quality = QualityReference(mean=state["quality_mean"].float(),
                                       whiten=state["quality_whiten"].float(),
                                       scale=state["quality_scale"].float())  # fmt: skip
        return cls(
            weights=state["weights"].float(), prior_precision=float(state["prior_precision"]),
            validation_nll=float(state["validation_nll"]), means=state["means"].float(),
            whiten=state["whiten"].float(), log_norm=state["log_norm"].float(),
            ood_threshold=float(threshold) if threshold is not None else None,
            ood_threshold_source=(str(state.get("ood_threshold_source") or "") or None
                                  if threshold is not None else None),
            quality=quality,
            ood_center=state["ood_center"].float() if quality is not None else None,
            ood_scale=state["ood_scale"].float() if quality is not None else None,
            discriminator=(Discriminator.from_state(state["discriminator"])
                           if state.get("discriminator") is not None else None),
        )  # fmt: skip


def _numpy(features: torch.Tensor) -> np.ndarray:
    return features.detach().cpu().float().numpy()


def laplace_predict(
    net: TriageNet,
    head: EpistemicHead,
    images: torch.Tensor,
    *,
    with_features: bool = True,
    temperature: float = 1.0,
) -> McOutput:
    """`mc_predict`'s output with the T samples taken from the Laplace weight samples.

    One deterministic pass (every module in eval mode, no random draw, so no RNG state to
    save or restore) and one product with the stacked weight samples.
    """
    with torch.inference_mode():
        start = time.perf_counter()
        with mc_dropout_mode(net, (), net.all_modules):
            pooled, maps = net.trunk(images, "head")
        trunk_done = time.perf_counter()
        probs = head.probs(pooled, temperature)
        done = time.perf_counter()
    return McOutput(probs=probs, stage_maps=maps if with_features else [],
                    trunk_seconds=trunk_done - start, mc_seconds=done - trunk_done,
                    pooled=pooled)  # fmt: skip


def pooled_features(net: TriageNet, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Pooled features [N, F] of the deterministic trunk, in eval mode."""
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            parts = [net.trunk(images[i : i + batch], "head")[0]
                     for i in range(0, len(images), batch)]  # fmt: skip
    finally:
        net.train(was_training)
    return torch.cat(parts) if parts else images.new_zeros(0, net.fc.in_features)


def _augment(features: torch.Tensor) -> torch.Tensor:
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def _ggn(mean: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """GGN Hessian [D*C, D*C] of the summed cross-entropy in theta[d*C + c] = mean[d, c]."""
    p = torch.softmax(a @ mean, dim=1)
    curvature = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # [N, C, C]
    d, c = mean.shape
    hessian = a.new_empty(d, c, d, c)
    for i in range(c):
        for j in range(c):
            hessian[:, i, :, j] = a.T @ (a * curvature[:, i, j, None])
    hessian = hessian.reshape(d * c, d * c)
    return 0.5 * (hessian + hessian.T)


def _predictive_nll(mean: torch.Tensor, chol: torch.Tensor, a: torch.Tensor,
                    labels: torch.Tensor) -> float:  # fmt: skip
    """NLL of the Laplace predictive: the logits are Gaussian, integrated by fixed draws."""
    d, c = mean.shape
    sigma = torch.cholesky_inverse(chol).reshape(d, c, d, c)
    cov = a.new_empty(a.shape[0], c, c)
    for i in range(c):
        for j in range(c):
            cov[:, i, j] = ((a @ sigma[:, i, :, j]) * a).sum(1)
    root = torch.linalg.cholesky(cov + 1e-9 * torch.eye(c, dtype=cov.dtype))
    draws = torch.randn(_NLL_DRAWS, a.shape[0], c, dtype=cov.dtype,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    logits = a @ mean + torch.einsum("nij,snj->sni", root, draws)
    probs = torch.softmax(logits, dim=-1).mean(0)
    return float(-probs[torch.arange(len(labels)), labels].clamp_min(1e-12).log().mean())


def _class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Means, whitening matrices and log normalisers of one Gaussian per class. The
    covariance gets the smallest diagonal jitter that makes it positive definite (as in
    DDU); a class without two studies borrows the pooled covariance."""
    x_all = features.double()
    eye = torch.eye(x_all.shape[1], dtype=x_all.dtype)
    pooled = torch.cov(x_all.T) if len(x_all) > 1 else eye
    means, whitens, norms = [], [], []
    for c in range(num_classes):
        x = x_all[labels == c]
        if len(x) == 0:
            raise ValueError(f"class {c} has no training studies: cannot fit its density")
        mu = x.mean(0)
        cov = torch.cov(x.T) if len(x) > 1 else pooled
        root = cholesky_with_jitter(cov)
        if root is None:
            raise ValueError(f"class {c}: feature covariance is not positive definite")
        whitens.append(torch.linalg.solve_triangular(root, eye, upper=False).T)
        means.append(mu)
        norms.append(math.log(len(x) / len(x_all)) - float(torch.log(torch.diagonal(root)).sum())
                     - 0.5 * x.shape[1] * math.log(2 * math.pi))  # fmt: skip
    return torch.stack(means), torch.stack(whitens), torch.tensor(norms, dtype=torch.float64)


def fit_epistemic(
    net: TriageNet,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    validation_images: torch.Tensor,
    validation_labels: torch.Tensor,
    *,
    samples: int = 20,
    seed: int = 0,
) -> EpistemicHead:
    """Fit the last-layer Laplace posterior, the feature density, the input-quality
    reference and the flag threshold.

    Args:
        net: The trained classifier (its `fc` is the posterior mean).
        train_images, train_labels: The training images [N, 1, S, S] and labels [N].
        validation_images, validation_labels: Where the prior precision is chosen, and
            whose `ood` terms give their scales and the flag threshold (`OOD_QUANTILE`;
            the training images' when there is no validation image).
        samples: Weight samples T drawn from the posterior.
        seed: Seed of the draws: the same fit gives the same samples.
    """
    train_features = pooled_features(net, train_images)
    val_features = pooled_features(net, validation_images)
    head = fit_epistemic_features(net.fc, train_features, train_labels, val_features,
                                  validation_labels, samples=samples, seed=seed)  # fmt: skip
    held_features, held_images = ((val_features, validation_images) if len(val_features)
                                  else (train_features, train_images))  # fmt: skip
    return with_quality(head, QualityReference.fit(train_images), held_features, held_images)


def with_quality(head: EpistemicHead, quality: QualityReference, held_features: torch.Tensor,
                 held_images: torch.Tensor) -> EpistemicHead:  # fmt: skip
    """`head` with the input-quality term: each `ood` term scaled on held-out images of
    the training distribution (features [M, F] and images [M, 1, S, S], M >= 1), and the
    flag threshold recomputed on the combined score."""
    if len(held_images) == 0 or len(held_images) != len(held_features):
        raise ValueError("the held-out images and their features must match, M >= 1")
    with torch.inference_mode():
        raw = torch.stack([head.density(held_features.float()),
                           quality.distance(held_images)]).double()  # fmt: skip
    raw = torch.where(torch.isfinite(raw), raw, torch.nan)
    center = raw.nanmedian(dim=1).values
    top = torch.stack([torch.nanquantile(row, OOD_QUANTILE) for row in raw])
    scale = (top - center).nan_to_num(1.0).clamp_min(1e-6)
    center = center.nan_to_num(0.0)
    center, scale = center.float(), scale.float()
    # the held-out images' `ood` scores, from the raw terms already at hand
    combined = ((raw.float() - center[:, None]) / scale[:, None]).max(0).values
    return replace(head, quality=quality, ood_center=center, ood_scale=scale,
                   ood_threshold=_quantile_of(combined))


def fit_epistemic_features(
    fc: torch.nn.Linear,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    validation_features: torch.Tensor,
    validation_labels: torch.Tensor,
    *,
    samples: int = 20,
    seed: int = 0,
) -> EpistemicHead:
    """`fit_epistemic` on pooled features already computed.

    Args:
        fc: The trained last layer, features [N, F] -> logits [N, C]: the posterior mean.
        train_features, train_labels: Training features [N, F] and labels [N].
        validation_features, validation_labels: Held-out features [M, F] and labels [M].
        samples: Weight samples T drawn from the posterior.
        seed: Seed of the draws.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    train_features = train_features.double()
    val_features = validation_features.double()
    a_val = _augment(val_features)
    with torch.no_grad():
        mean = torch.cat([fc.weight.T, fc.bias[None]], dim=0).double()  # [F+1, C]
        hessian = _ggn(mean, _augment(train_features))
        eye = torch.eye(hessian.shape[0], dtype=hessian.dtype)
        best: tuple[float, float, torch.Tensor] | None = None
        for precision in PRIOR_PRECISIONS:
            chol = torch.linalg.cholesky(hessian + precision * eye)
            nll = _predictive_nll(mean, chol, a_val, validation_labels)
            if best is None or nll < best[0]:
                best = (nll, precision, chol)
        assert best is not None
        nll, precision, chol = best
        d, c = mean.shape
        z = torch.randn(d * c, samples, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
        noise = torch.linalg.solve_triangular(chol.T, z, upper=True)  # covariance (H+lI)^-1
        weights = mean[None] + noise.T.reshape(samples, d, c)
        means, whiten, log_norm = _class_gaussians(train_features, train_labels, c)
    head = EpistemicHead(
        weights=weights.float().contiguous(), prior_precision=precision, validation_nll=nll,
        means=means.float(), whiten=whiten.float(), log_norm=log_norm.float(),
    )  # fmt: skip
    source, held = ("validation", val_features) if len(val_features) else (
        "training", train_features)
    threshold = ood_threshold(head, held.float())
    return replace(head, ood_threshold=threshold, ood_threshold_source=source)


def ood_threshold(head: EpistemicHead, features: torch.Tensor, quantile: float = OOD_QUANTILE,
                  *, images: torch.Tensor | None = None) -> float | None:  # fmt: skip
    """The `quantile` quantile of the `ood` scores of features [N, F] (and their images,
    for a head with a quality reference): held-out images of the training distribution;
    None without a finite score."""
    with torch.inference_mode():
        return _quantile_of(head.ood(features, images), quantile)


def _quantile_of(scores: torch.Tensor, quantile: float = OOD_QUANTILE) -> float | None:
    """The `quantile` quantile of the finite scores; None without one."""
    scores = scores.double()
    scores = scores[torch.isfinite(scores)]
    if len(scores) == 0:
        return None
    return float(torch.quantile(scores, quantile))
