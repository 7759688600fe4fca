"""Training a candidate: one joint run of classifier and loss predictor, from scratch.

One `fit` call covers the run: one AdamW optimiser and one one-cycle learning-rate
schedule, at least `model.training.min_steps` steps, each epoch's sample drawn by the
coverage plan (`sampler`) when rebalancing. The last epoch's weights are kept: the
schedule ends at a small learning rate, so no epoch is picked on the validation set,
which stays free for the promotion decision and the operating point (picking the epoch
and deciding the promotion on the same ~100 studies would bias both).

Retraining from scratch is the default: a run then depends only on the labels, not on
the chain of earlier models. Measured on bench/label_efficiency.py (README, "Label
efficiency"), warm-starting from the serving model (`retrain.warm_start`) was not
distinguishable from it at 5 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from triage.errors import TriageError
from triage.model.lossnet import LossPredictor
from triage.model.network import TriageNet
from triage.model.settings import ModelSettings
from triage.model.training import fit, planned_epochs
from triage.training.augment import make_augment
from triage.training.dataset import LabeledSet
from triage.training.sampling import CoveragePlan, draw
from triage.training.settings import RetrainSettings

EpochCallback = Callable[[int, int, dict[str, float]], None]
"""Called after each epoch with (epoch index, planned epochs, record)."""


class TrainingFailed(TriageError):
    """Training cannot produce a usable candidate (e.g. the loss became NaN)."""


@dataclass
class TrainOutcome:
    """Result of `train_candidate`; the modules hold the last epoch's weights (eval mode).

    Attributes:
        epochs: One `fit` record per epoch run (with `epoch` added).
        steps: Optimiser steps taken.
    """

    network: TriageNet
    loss_predictor: LossPredictor
    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "epochs_run": len(self.epochs), "steps": self.steps}


def train_candidate(
    net: TriageNet,
    loss_predictor: LossPredictor,
    train: LabeledSet,
    model: ModelSettings,
    retrain: RetrainSettings,
    plan: CoveragePlan | None = None,
    on_epoch: EpochCallback | None = None,
) -> TrainOutcome:
    """Train `net` and `loss_predictor` in place on `train` (one run, last epoch kept).

    Args:
        net: Classifier (fresh, or warm-started with `retrain.warm_start`).
        loss_predictor: Its loss predictor.
        train: Training images (at least 2).
        model: Model settings; `model.training` gives epochs, steps, optimiser, seed.
        retrain: The augmentation settings.
        plan: Coverage weights of `train`'s images, or None for the raw set.
        on_epoch: Progress callback.

    Raises:
        TrainingFailed: Fewer than 2 images, or the training loss was not finite.
    """
    settings = model.training
    n = train.images.shape[0]
    if n < 2:
        raise TrainingFailed(f"training needs at least 2 images, got {n}")
    if plan is not None and plan.weights.shape[0] != n:
        raise ValueError("plan.weights must have one weight per training image")
    planned = planned_epochs(n, settings)
    sampler = None
    if plan is not None:
        def sampler(epoch: int, generator: torch.Generator) -> torch.Tensor:
            return draw(plan.weights, n, generator)

    outcome = TrainOutcome(net, loss_predictor)

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        record = {**record, "epoch": float(epoch)}
        outcome.epochs.append(record)
        if not math.isfinite(record["loss"]):
            raise TrainingFailed(f"training loss is not finite in epoch {epoch + 1}")
        if on_epoch is not None:
            on_epoch(epoch, planned, record)

    fit(net, loss_predictor, train.images, train.labels, settings,
        augment=make_augment(retrain, model.input_size), sampler=sampler,
        on_epoch_end=on_epoch_end)
    outcome.steps = planned * math.ceil(n / settings.batch_size)
    return outcome
