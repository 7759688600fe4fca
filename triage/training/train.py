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

In a run of several processes (`retrain.nproc`, `triage.training.distributed`) rank 0
sends each training's inputs to the other ranks as a `TrainJob` and all of them run the
same `fit`, each on its share of every batch; `follow` is the other ranks' side.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from triage.errors import TriageError
from triage.model.lossnet import LossPredictor
from triage.model.network import TriageNet
from triage.model.parallel import Shard
from triage.model.settings import ModelSettings
from triage.model.training import fit, planned_epochs
from triage.training import distributed
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
        forgetting: Forgetting events of each training image in this run [N]
            (`History.forgetting`).
        learned: Whether each training image was ever classified correctly [N].
    """

    network: TriageNet
    loss_predictor: LossPredictor
    epochs: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    forgetting: torch.Tensor | None = None
    learned: torch.Tensor | None = None

    def per_study(self, train: LabeledSet) -> list[tuple[int, int, bool]]:
        """(study id, forgetting events of its images, all its images learned) for each
        study of `train`, the set this run trained on."""
        if self.forgetting is None or self.learned is None:
            return []
        m = train.num_studies
        events = torch.zeros(m, dtype=torch.long).index_add_(0, train.groups, self.forgetting)
        missed = torch.zeros(m, dtype=torch.long).index_add_(0, train.groups,
                                                             (~self.learned).long())
        return [(int(study), int(e), not int(k)) for study, e, k
                in zip(train.study_ids, events.tolist(), missed.tolist(), strict=True)]

    def summary(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "epochs_run": len(self.epochs), "steps": self.steps}


@dataclass
class TrainJob:
    """What rank 0 sends the other ranks before each training: `train_candidate`'s
    inputs (the modules as they start, so a warm start or a refit needs nothing else)."""

    network: TriageNet
    loss_predictor: LossPredictor
    train: LabeledSet
    plan: CoveragePlan | None
    image_weights: np.ndarray | None


def train_candidate(
    net: TriageNet,
    loss_predictor: LossPredictor,
    train: LabeledSet,
    model: ModelSettings,
    retrain: RetrainSettings,
    plan: CoveragePlan | None = None,
    on_epoch: EpochCallback | None = None,
    image_weights: np.ndarray | None = None,
    shard: Shard | None = None,
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
        image_weights: Further sampling weights of `train`'s images [N] (the
            down-weighting of studies never forgotten in earlier runs), multiplied with
            the plan's; None: all 1.
        shard: This process's place in a run of several processes; rank 0 first sends
            the other ranks this call's inputs (`follow` receives them). None: one process.

    Raises:
        TrainingFailed: Fewer than 2 images, or the training loss was not finite.
    """
    settings = model.training
    n = train.images.shape[0]
    if n < 2:
        raise TrainingFailed(f"training needs at least 2 images, got {n}")
    if plan is not None and plan.weights.shape[0] != n:
        raise ValueError("plan.weights must have one weight per training image")
    if image_weights is not None and image_weights.shape != (n,):
        raise ValueError("image_weights must have one weight per training image")
    if shard is not None and shard.leader:
        distributed.send(shard, TrainJob(net, loss_predictor, train, plan, image_weights))
    planned = planned_epochs(n, settings)
    sampler = None
    weights = None if plan is None else plan.weights
    if image_weights is not None:
        weights = image_weights if weights is None else weights * image_weights
    if weights is not None:
        def sampler(epoch: int, generator: torch.Generator) -> torch.Tensor:
            return draw(weights, n, generator)

    outcome = TrainOutcome(net, loss_predictor)

    def on_epoch_end(epoch: int, record: dict[str, float]) -> None:
        record = {**record, "epoch": float(epoch)}
        outcome.epochs.append(record)
        if not math.isfinite(record["loss"]):
            raise TrainingFailed(f"training loss is not finite in epoch {epoch + 1}")
        if on_epoch is not None:
            on_epoch(epoch, planned, record)

    history = fit(net, loss_predictor, train.images, train.labels, settings,
                  augment=make_augment(retrain, model.input_size), sampler=sampler,
                  on_epoch_end=on_epoch_end, shard=shard)
    outcome.forgetting, outcome.learned = history.forgetting, history.learned
    outcome.steps = planned * math.ceil(n / settings.batch_size)
    return outcome


def follow(shard: Shard, model: ModelSettings, retrain: RetrainSettings) -> int:
    """A rank other than 0: train each job rank 0 sends, until it sends None.

    Returns:
        The number of trainings taken part in.
    """
    jobs = 0
    while (job := distributed.receive(shard)) is not None:
        train_candidate(job.network, job.loss_predictor, job.train, model, retrain, job.plan,
                        image_weights=job.image_weights, shard=shard)
        jobs += 1
    return jobs
