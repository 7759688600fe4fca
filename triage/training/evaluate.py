"""Study-level validation metrics of a classifier (embeddings: `triage.model.inference.embed`).

Metrics are per study: a study's probabilities are the mean of its images' deterministic
(eval-mode) probabilities. With two classes the second is the positive class
(`pneumonia` in the default labels) for AUROC, sensitivity and specificity.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from triage.model.calibration import OperatingPoint
from triage.model.inference import embed  # noqa: F401 - re-exported (replay.lockstep)
from triage.model.network import TriageNet
from triage.model.training import classifier_auroc

ECE_BINS = 10


@torch.inference_mode()
def study_probabilities(
    net: TriageNet, images: torch.Tensor, groups: torch.Tensor, num_studies: int,
    batch_size: int = 512, temperature: float = 1.0,
) -> torch.Tensor:
    """Mean eval-mode class probabilities per study, [num_studies, C].

    Args:
        net: The classifier.
        images: Float [N, 1, S, S].
        groups: Study position of each image, torch.long [N] in [0, num_studies).
        num_studies: Number of studies M.
        batch_size: Images per forward pass.
        temperature: Divides the logits before the softmax (calibration).
    """
    probs = torch.softmax(image_logits(net, images, batch_size) / temperature, dim=1)
    sums = torch.zeros(num_studies, probs.shape[1]).index_add_(0, groups, probs)
    counts = torch.bincount(groups, minlength=num_studies).clamp_min(1).unsqueeze(1)
    return sums / counts


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
                               ) -> float:
    """ECE of the top-class confidence: sum over equal-width bins of |acc - conf| * share.

    Args:
        probs: Probabilities [M, C].
        labels: Class indices [M].
        bins: Number of confidence bins on [0, 1].
    """
    if probs.shape[0] == 0:
        return float("nan")
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += abs(correct[inside].mean() - confidence[inside].mean()) * inside.mean()
    return float(total)


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, operating_point: OperatingPoint | None = None
) -> dict[str, float]:
    """Study-level metrics of probabilities [M, C] against labels [M].

    Args:
        probs: Study probabilities [M, C] (calibrated when an operating point is used).
        labels: Class indices [M].
        operating_point: Gives the predicted class (its threshold); None: argmax.

    Returns:
        `auroc`, `accuracy`, `sensitivity` (recall of the positive class, index 1),
        `specificity` (recall of class 0; for more classes: mean recall of the others),
        `ece`, and `n`. AUROC is NaN unless both classes are present.
    """
    p = probs.detach().double().numpy()
    y = labels.detach().numpy().astype(np.int64)
    if not p.shape[0]:
        predicted = np.zeros(0, dtype=np.int64)
    elif operating_point is not None:
        predicted = operating_point.predict(p)
    else:
        predicted = p.argmax(axis=1)

    def recall(mask: np.ndarray) -> float:
        return float((predicted[mask] == y[mask]).mean()) if mask.any() else math.nan

    return {
        "auroc": classifier_auroc(probs.detach().float(), labels) if p.shape[0] else math.nan,
        "accuracy": float((predicted == y).mean()) if p.shape[0] else math.nan,
        "sensitivity": recall(y == 1),
        "specificity": recall(y == 0) if p.shape[1] == 2 else recall(y != 1),
        "ece": expected_calibration_error(p, y),
        "n": int(p.shape[0]),
    }


def validation_metrics(
    net: TriageNet, images: torch.Tensor, groups: torch.Tensor, study_labels: list[int],
    operating_point: OperatingPoint | None = None,
) -> dict[str, float]:
    """Study-level `classification_metrics` of `net` on a validation set, with the
    probabilities calibrated and thresholded at `operating_point` when one is given."""
    temperature = operating_point.temperature if operating_point is not None else 1.0
    probs = study_probabilities(net, images, groups, len(study_labels), temperature=temperature)
    return classification_metrics(probs, torch.tensor(study_labels, dtype=torch.long),
                                  operating_point)


@torch.inference_mode()
def image_logits(net: TriageNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Eval-mode logits [N, C] of images [N, 1, S, S]."""
    was = net.training
    net.eval()
    try:
        parts = [net(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    finally:
        net.train(was)
    return torch.cat(parts) if parts else torch.zeros(0, net.num_classes)


def all_finite(metrics: dict[str, float], keys: tuple[str, ...] = (
        "auroc", "accuracy", "sensitivity", "specificity", "ece")) -> bool:
    """True when every metric in `keys` is a finite number."""
    return all(isinstance(metrics.get(k), int | float) and math.isfinite(metrics[k])
               for k in keys)
