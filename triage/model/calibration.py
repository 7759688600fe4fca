"""The operating point of a model: temperature scaling and a decision threshold.

A model's raw softmax is neither calibrated nor thresholded where it should be: argmax at
0.5 on a skewed stream gave a holdout accuracy of 0.56 (README, 2026-11-21). Each
candidate therefore gets, from its validation set (never from the holdout):

* a temperature T (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017):
  probabilities are ``softmax(logits / T)``, with T fitted by minimising the validation
  negative log-likelihood. It changes no ranking, so AUROC is unchanged;
* with two classes, a threshold on the calibrated probability of the positive class
  (index 1) that maximises Youden's J = sensitivity + specificity - 1 on validation.
  J does not depend on the class mix, so the point carries over to a stream whose mix
  differs from the validation set's.

Both are stored with the model (checkpoint metadata `operating_point`) and used wherever
a prediction is shown or counted: the API, the web UI, the metrics and the replay.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


@dataclass(frozen=True)
class OperatingPoint:
    """How a model's logits become a calibrated probability and a predicted class.

    Attributes:
        temperature: Divides the logits before the softmax (1.0: unchanged).
        threshold: With two classes, class 1 is predicted when its calibrated
            probability is >= threshold; None means argmax (more than two classes).
    """

    temperature: float = 1.0
    threshold: float | None = 0.5

    def __post_init__(self) -> None:
        if not (_is_number(self.temperature) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.threshold is not None and not (
                _is_number(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be None or a number in [0, 1], "
                             f"got {self.threshold!r}")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities [..., C] of logits [..., C]."""
        return torch.softmax(logits / self.temperature, dim=-1)

    def predict(self, probs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Predicted class [N] of calibrated probabilities [N, C]."""
        p = np.asarray(probs, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"probs must be [N, C], got shape {p.shape}")
        if self.threshold is None or p.shape[1] != 2:
            return p.argmax(axis=1)
        return (p[:, 1] >= self.threshold).astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> OperatingPoint:
        """The stored point, or the identity for models without one.

        The identity is T = 1 and no threshold (argmax), so a model saved without an
        operating point predicts exactly as before. A missing or null ``temperature``
        is 1; a missing or null ``threshold`` means argmax.

        Raises:
            ValueError: A value is not a number or out of range; the message names it.
        """
        if not data:
            return cls(1.0, None)
        if not isinstance(data, Mapping):
            raise ValueError(f"operating_point must be a mapping, got {data!r}")
        temperature = data.get("temperature")
        threshold = data.get("threshold")
        return cls(1.0 if temperature is None else _number("temperature", temperature),
                   None if threshold is None else _number("threshold", threshold))


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _number(name: str, value: Any) -> float:
    """``value`` as a float; a ValueError naming ``name`` when it is not a number."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature minimising the mean NLL of ``softmax(logits / T)`` on labelled data.

    Args:
        logits: Float [N, C] (one row per study).
        labels: Class indices, torch.long [N].

    Returns:
        T in [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 when N < 2 or only one class is present.

    Raises:
        ValueError: Shapes do not match, or the labels are not integers.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"logits must be [N, C] and labels [N], got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise ValueError(f"labels must hold class indices (an integer dtype), got {labels.dtype}")
    labels = labels.detach().long()
    if logits.shape[0] < 2 or torch.unique(labels).numel() < 2:
        return 1.0
    z = logits.detach().double()
    # 1-D convex-ish problem in log T: a bounded grid, then golden-section refinement
    grid = torch.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), 61,
                          dtype=torch.float64)
    nll = torch.stack([F.cross_entropy(z / math.exp(g), labels) for g in grid.tolist()])
    best = int(nll.argmin())
    lo = float(grid[max(best - 1, 0)])
    hi = float(grid[min(best + 1, grid.numel() - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(40):
        a = hi - ratio * (hi - lo)
        b = lo + ratio * (hi - lo)
        if F.cross_entropy(z / math.exp(a), labels) <= F.cross_entropy(z / math.exp(b), labels):
            hi = b
        else:
            lo = a
    return float(min(max(math.exp((lo + hi) / 2), MIN_TEMPERATURE), MAX_TEMPERATURE))


def youden_threshold(positive: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
                     ) -> float:
    """Threshold on the positive-class probability that maximises sensitivity + specificity.

    Args:
        positive: Probability of class 1, [N].
        labels: Binary labels [N].

    Returns:
        The midpoint between the two scores around the best cut (ties: the cut nearest
        0.5); 0.5 when a class is missing or no cut separates the classes at all (best
        J <= 0: then 0 or 1, "everything positive" or "nothing", would be as good).
    """
    p = np.asarray(positive, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if p.shape != y.shape:
        raise ValueError(f"positive and labels must have the same length, got {p.size}, {y.size}")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return 0.5
    values = np.unique(p)
    # candidate cuts: below everything, between neighbours, above everything
    cuts = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [1.0]])
    predicted = p[None, :] >= cuts[:, None]
    sens = (predicted & y).sum(axis=1) / n_pos
    spec = (~predicted & ~y).sum(axis=1) / n_neg
    j = sens + spec - 1.0
    if j.max() <= 1e-12:
        return 0.5
    best = np.flatnonzero(np.isclose(j, j.max()))
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def fit_operating_point(logits: torch.Tensor, labels: torch.Tensor) -> OperatingPoint:
    """Temperature and (for two classes) the Youden threshold from validation logits [N, C]."""
    temperature = fit_temperature(logits, labels)
    if logits.shape[1] != 2:
        return OperatingPoint(temperature, None)
    probs = torch.softmax(logits.detach().double() / temperature, dim=1)[:, 1]
    return OperatingPoint(temperature, youden_threshold(probs.numpy(), labels.numpy()))
