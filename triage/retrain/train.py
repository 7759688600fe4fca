"""Training a candidate: joint classifier + loss predictor, early stopping on validation.

`triage.model.training.fit` runs one epoch at a time so that every epoch can draw a fresh
coverage-weighted sample of the training images. Consequences: each epoch is a `fit` call
with seed `training.seed + epoch`, the loss predictor's features are detached from epoch
`ceil(detach_after_fraction * epochs)` on as in a single `fit`, and AdamW's moment
estimates restart every epoch (a `fit` with a sampler argument would avoid that). The
weights of the epoch with the best validation AUROC are kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from triage.errors import TriageError
from triage.model.lossnet import LossPredictor
from triage.model.network import TriageNet
from triage.model.settings import ModelSettings
from triage.model.training import fit
from triage.retrain.augment import make_augment
from triage.retrain.dataset import LabeledSet
from triage.retrain.sampling import CoveragePlan, draw
from triage.retrain.settings import RetrainSettings

EpochCallback = Callable[[int, int, dict[str, float]], None]
"""Called after each epoch with (epoch index, planned epochs, record)."""


class TrainingFailed(TriageError):
    """Training cannot produce a usable candidate (e.g. the loss became NaN)."""


@dataclass
class TrainOutcome:
    """Result of `train_candidate`; the modules hold the best epoch's weights (eval mode).

    Attributes:
        epochs: One `fit` record per epoch run (with `epoch` added).
        best_epoch: Index of the kept epoch.
        stopped_early: Whether patience ended training before `training.epochs`.
    """

    network: TriageNet
    loss_predictor: LossPredictor
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "stopped_early": self.stopped_early}


def train_candidate(
    net: TriageNet,
    loss_predictor: LossPredictor,
    train: LabeledSet,
    validation: LabeledSet,
    model: ModelSettings,
    retrain: RetrainSettings,
    plan: CoveragePlan | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainOutcome:
    """Train `net` and `loss_predictor` in place on `train`, select the epoch on `validation`.

    Args:
        net: Classifier (fresh or warm-started).
        loss_predictor: Its loss predictor.
        train: Training images (at least 2).
        validation: Validation images (may be empty: then the last epoch is kept).
        model: Model settings; `model.training` gives epochs, batch size, optimiser, seed.
        retrain: `patience` and the augmentation settings.
        plan: Coverage weights of `train`'s images, or None for the raw set.
        on_epoch: Progress callback.

    Raises:
        TrainingFailed: The training loss was not finite in some epoch.
    """
    settings = model.training
    if train.images.shape[0] < 2:
        raise TrainingFailed(f"training needs at least 2 images, got {train.images.shape[0]}")
    if plan is not None and plan.weights.shape[0] != train.images.shape[0]:
        raise ValueError("plan.weights must have one weight per training image")
    augment = make_augment(retrain, model.input_size)
    detach_from = math.ceil(settings.detach_after_fraction * settings.epochs)
    generator = torch.Generator().manual_seed(settings.seed)
    has_val = validation.images.shape[0] > 0
    outcome = TrainOutcome(net, loss_predictor)
    best_auroc, best_state, since_best = -math.inf, None, 0
    for epoch in range(settings.epochs):
        if plan is not None:
            index = draw(plan.weights, train.images.shape[0], generator)
            images, labels = train.images[index], train.labels[index]
        else:
            images, labels = train.images, train.labels
        one = settings.model_copy(update={
            "epochs": 1, "seed": settings.seed + epoch,
            "detach_after_fraction": 0.0 if epoch >= detach_from else 1.0,
        })
        history = fit(
            net, loss_predictor, images, labels, one,
            val_images=validation.images if has_val else None,
            val_labels=validation.labels if has_val else None,
            augment=augment,
        )
        record = {**history.last, "epoch": float(epoch)}
        outcome.epochs.append(record)
        if not math.isfinite(record["loss"]):
            raise TrainingFailed(f"training loss is not finite in epoch {epoch + 1}")
        score = record.get("val_auroc", math.nan)
        if best_state is None or (math.isfinite(score) and score > best_auroc):
            best_auroc = score if math.isfinite(score) else -math.inf
            best_state = (copy.deepcopy(net.state_dict()),
                          copy.deepcopy(loss_predictor.state_dict()))
            outcome.best_epoch, since_best = epoch, 0
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, settings.epochs, record)
        if retrain.patience and since_best >= retrain.patience:
            outcome.stopped_early = epoch + 1 < settings.epochs
            break
    if not has_val:  # nothing to select on: keep the last epoch
        outcome.best_epoch = len(outcome.epochs) - 1
    elif best_state is not None:
        net.load_state_dict(best_state[0])
        loss_predictor.load_state_dict(best_state[1])
    net.eval()
    loss_predictor.eval()
    return outcome
