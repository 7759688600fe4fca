"""A labelled-versus-unlabelled classifier in the model's feature space, for the `dal`
strategy (Gissin and Shalev-Shwartz, "Discriminative Active Learning", 2019).

DAL asks which unlabelled examples look least like the labelled set: it trains a binary
classifier to tell the two apart in the task model's representation and queries where
it is surest an example is unlabelled. Here the classifier is an L2-regularised logistic
regression on the standardised pooled features (the paper uses a small MLP; a linear
model is the smallest classifier that still ranks by how far outside the labelled
features a study lies, fits in well under a second, and has no seed to vary), with the
two classes weighted equally, as the paper balances them by sampling. It is refitted
whenever a retrain promotes a model, on every labelled image and the unlabelled pool of
recent scored studies (`retrain.pool_max`), and saved with that model's epistemic head.
Written by hand: a dozen lines of torch, where scikit-learn would be a new dependency.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

L2 = 1e-2
"""Weight of the L2 penalty on the standardised features' coefficients."""
_STEPS = 100


@dataclass(frozen=True, eq=False)
class Discriminator:
    """P(unlabelled | features) = sigmoid(((features - mean) / scale) . weight + bias).

    Attributes:
        weight: Coefficients [F] on the standardised features.
        bias: Intercept.
        mean, scale: The standardisation, [F] each (of the fitting data, both classes).
        labelled, unlabelled: How many images of each it was fitted on.
    """

    weight: torch.Tensor
    bias: float
    mean: torch.Tensor
    scale: torch.Tensor
    labelled: int
    unlabelled: int
    _np: dict[str, np.ndarray] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arrays = {"weight": self.weight, "mean": self.mean, "scale": self.scale}
        object.__setattr__(self, "_np", {k: v.detach().double().numpy() for k, v in arrays.items()})

    def prob_unlabelled(self, features: np.ndarray) -> np.ndarray:
        """P(unlabelled) of each row of features [K, F], [K]."""
        z = ((np.asarray(features, dtype=np.float64) - self._np["mean"]) / self._np["scale"]
             ) @ self._np["weight"] + self.bias  # fmt: skip
        return 1.0 / (1.0 + np.exp(-z))

    def state(self) -> dict[str, Any]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean,
                "scale": self.scale, "labelled": self.labelled, "unlabelled": self.unlabelled}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Discriminator:
        return cls(weight=state["weight"].float(), bias=float(state["bias"]),
                   mean=state["mean"].float(), scale=state["scale"].float(),
                   labelled=int(state["labelled"]), unlabelled=int(state["unlabelled"]))


def fit_discriminator(labelled: torch.Tensor, unlabelled: torch.Tensor) -> Discriminator:
    """Fit the classifier on labelled features [N, F] (class 0) and unlabelled [M, F]
    (class 1), N, M >= 1; deterministic (full-batch L-BFGS from zeros)."""
    if labelled.ndim != 2 or unlabelled.ndim != 2 or labelled.shape[1] != unlabelled.shape[1]:
        raise ValueError("labelled and unlabelled features must be [N, F] and [M, F]")
    if len(labelled) == 0 or len(unlabelled) == 0:
        raise ValueError("the discriminator needs labelled and unlabelled features")
    x = torch.cat([labelled, unlabelled]).double()
    y = torch.cat([torch.zeros(len(labelled)), torch.ones(len(unlabelled))]).double()
    mean = x.mean(0)
    scale = x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(mean)
    x = (x - mean) / scale
    # equal total weight per class, as balanced sampling would give
    weights = torch.where(y == 1, 0.5 / len(unlabelled), 0.5 / len(labelled))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ w + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, y, reduction="none")).sum() + 0.5 * L2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return Discriminator(weight=w.detach().float(), bias=float(b.detach()),
                         mean=mean.float(), scale=scale.float(), labelled=len(labelled),
                         unlabelled=len(unlabelled))
