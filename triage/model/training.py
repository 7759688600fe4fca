"""Joint training of the classifier and the loss predictor, and evaluation metrics."""

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from triage.model.lossnet import LossPredictor, ranking_loss
from triage.model.network import TriageNet
from triage.model.parallel import Shard
from triage.model.settings import TrainSettings

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Hook applied to each training batch [B, 1, S, S] (with fit's seeded generator)."""


def auroc(scores: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (rank formula, ties halved).

    Args:
        scores: Scores [N]; larger means "more likely positive".
        labels: Binary labels [N] (bool or 0/1).

    Returns:
        AUROC in [0, 1]; NaN when only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    # average 1-based ranks over ties
    _, first, counts = np.unique(sorted_s, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classifier_auroc(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """AUROC of probabilities [N, C] for labels [N]: p[:, 1] for two classes, else the
    macro mean of one-vs-rest AUROCs over the classes present."""
    if probs.shape[1] == 2:
        return auroc(probs[:, 1], labels == 1)
    values = [auroc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@dataclass
class History:
    """Per-epoch records of `fit`.

    Attributes:
        epochs: One dict per epoch with `loss` (total), `ce` (cross-entropy), `rank`
            (ranking loss), `detached` (1.0 if the loss predictor's features were
            detached), `seconds`, with a `Consistency` loss `consistency` and `masked`
            (share of unlabelled images above its threshold), and, with validation
            tensors, `val_ce`, `val_accuracy`, `val_auroc` and `val_loss_auroc` (AUROC of
            the predicted loss at flagging misclassified validation images).
        forgetting: Forgetting events of each training image [N] (Toneva et al., ICLR
            2019): presentations at which the image was misclassified after being
            classified correctly at its previous presentation (the training forward pass
            of its batch, before the step).
        learned: Whether each image was classified correctly at some presentation [N].
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    forgetting: torch.Tensor | None = None
    learned: torch.Tensor | None = None

    @property
    def last(self) -> dict[str, float]:
        """The last epoch's record."""
        return self.epochs[-1]


class ForgettingCounter:
    """Forgetting events per training example (Toneva et al., ICLR 2019), counted from
    the classification of each presentation: an event is a presentation misclassified
    right after one classified correctly.

    Args:
        n: Number of training examples.
    """

    def __init__(self, n: int) -> None:
        self._last = [-1] * n  # -1: not presented yet, else 1 correct / 0 not
        self._events = [0] * n
        self._learned = [False] * n

    def update(self, index: torch.Tensor, correct: torch.Tensor) -> None:
        """Record one batch: example `index[i]` was classified correctly iff `correct[i]`
        (an example drawn twice in a batch counts as presented in order)."""
        last, events, learned = self._last, self._events, self._learned
        for i, ok in zip(index.tolist(), correct.tolist(), strict=True):
            if last[i] == 1 and not ok:
                events[i] += 1
            last[i] = 1 if ok else 0
            learned[i] = learned[i] or ok

    @property
    def events(self) -> torch.Tensor:
        """Forgetting events of each example, long [n]."""
        return torch.tensor(self._events, dtype=torch.long)

    @property
    def learned(self) -> torch.Tensor:
        """Whether each example was ever classified correctly, bool [n]."""
        return torch.tensor(self._learned, dtype=torch.bool)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency class weights [C] normalised to mean 1 (absent classes get 0)."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp_min(1)), 0.0)
    return weights


@torch.inference_mode()
def evaluate(
    net: TriageNet, loss_predictor: LossPredictor, images: torch.Tensor, labels: torch.Tensor,
    batch_size: int = 256,
) -> dict[str, float]:
    """Deterministic (eval-mode) validation metrics; see `History` for the keys."""
    was = (net.training, loss_predictor.training)
    net.eval()
    loss_predictor.eval()
    try:
        logits, predicted = [], []
        for start in range(0, images.shape[0], batch_size):
            out, maps = net.forward_with_features(images[start : start + batch_size])
            logits.append(out)
            predicted.append(loss_predictor(maps))
    finally:
        net.train(was[0])
        loss_predictor.train(was[1])
    logit = torch.cat(logits)
    probs = torch.softmax(logit, dim=1)
    wrong = probs.argmax(1) != labels
    return {
        "val_ce": float(F.cross_entropy(logit, labels)),
        "val_accuracy": float((~wrong).float().mean()),
        "val_auroc": classifier_auroc(probs, labels),
        "val_loss_auroc": auroc(torch.cat(predicted), wrong),
    }


def _check_data(images: torch.Tensor, labels: torch.Tensor, name: str, num_classes: int) -> None:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"{name}images must be [N, 1, S, S], got {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{name}labels must be [N] matching {name}images, got {tuple(labels.shape)}"
        )
    if labels.dtype != torch.long:
        raise ValueError(f"{name}labels must be torch.long, got {labels.dtype}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}labels must lie in [0, {num_classes}), got values outside")


def _gather_epoch(shard: Shard, sums: dict[str, float], seen: torch.Tensor, trained: list[int],
                  order: torch.Tensor, batch_size: int, counter: ForgettingCounter
                  ) -> dict[str, float]:  # fmt: skip
    """One data-parallel epoch's loss sums over the processes (one all-reduce, also of
    each presentation's outcome), and its presentations counted in one-process order."""
    totals = shard.all_reduce(torch.cat([torch.tensor(list(sums.values()), dtype=torch.float64),
                                         seen.double()]))
    outcome = totals[len(sums):]
    for first in trained:
        index = order[first : first + batch_size]
        counter.update(index, outcome[first : first + index.numel()] == 2.0)
    return dict(zip(sums, totals[: len(sums)].tolist(), strict=True))


Sampler = Callable[[int, torch.Generator], torch.Tensor]
"""Hook giving the training indices [N] of one epoch (epoch index, fit's generator)."""


def planned_epochs(num_images: int, settings: TrainSettings) -> int:
    """Epochs `fit` runs on `num_images` images: `epochs`, or more so that at least
    `min_steps` optimiser steps are taken (small labelled sets get more passes)."""
    steps_per_epoch = max(1, math.ceil(num_images / settings.batch_size))
    return max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))


def _scheduler(optimiser: torch.optim.Optimizer, settings: TrainSettings, total_steps: int
               ) -> torch.optim.lr_scheduler.LRScheduler | None:
    if settings.schedule == "constant":
        return None
    if settings.schedule == "restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimiser, T_0=max(1, total_steps // settings.cycles),
            eta_min=settings.learning_rate / 1000,
        )
    # OneCycleLR divides by the length of its warm-up phase, pct_start * total_steps - 1
    # steps: zero at 4 steps (a retrain on a handful of labels crashed on it), negative
    # below. At least 8 planned steps keep both phases at least one step long; a shorter
    # run just stops before the end of its schedule.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=settings.learning_rate, total_steps=max(total_steps, 8),
        pct_start=0.25, anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0,
    )


@dataclass(frozen=True)
class Consistency:
    """FixMatch's consistency loss on unlabelled images, as an option of `fit`
    (Sohn et al. 2020): each step draws `ratio` x batch of `images`; where the model's
    prediction on the weak view (`fit`'s augment) reaches `threshold`, that class is the
    cross-entropy target of `strong_augment`'s view, added to the loss at `weight`.

    Measured outside the chain (bench/unlabelled.py; README, "The served model", part
    5): no gain on dev val, where recipes are chosen, so the daemon does not train with
    it and no setting turns it on.
    """

    images: torch.Tensor
    strong_augment: Augment
    weight: float = 1.0
    threshold: float = 0.95
    ratio: int = 2

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 1 or self.images.shape[0] == 0:
            raise ValueError(f"consistency images must be [U>0, 1, S, S], got "
                             f"{tuple(self.images.shape)}")
        if not self.weight >= 0 or not 0.5 < self.threshold <= 1 or self.ratio < 1:
            raise ValueError("consistency needs weight >= 0, threshold in (0.5, 1] and "
                             "ratio >= 1")

    def loss(self, net: TriageNet, batch: int, weak: Augment | None,
             generator: torch.Generator) -> tuple[torch.Tensor, float]:
        """The unlabelled loss of one step and the share of images that passed the
        threshold."""
        u = self.images[torch.randint(self.images.shape[0], (self.ratio * batch,),
                                      generator=generator)]
        with torch.no_grad():
            probs = torch.softmax(net(weak(u, generator) if weak is not None else u), dim=1)
        confidence, target = probs.max(dim=1)
        mask = (confidence >= self.threshold).float()
        per_sample = F.cross_entropy(net(self.strong_augment(u, generator)), target,
                                     reduction="none")
        return (per_sample * mask).mean(), float(mask.mean())


def fit(
    net: TriageNet,
    loss_predictor: LossPredictor,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainSettings,
    *,
    val_images: torch.Tensor | None = None,
    val_labels: torch.Tensor | None = None,
    augment: Augment | None = None,
    sampler: Sampler | None = None,
    consistency: Consistency | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    shard: Shard | None = None,
) -> History:
    """Train classifier and loss predictor jointly, in place, as one run.

    One AdamW optimiser and one learning-rate schedule (`settings.schedule`: one-cycle
    by default, Smith & Topin 2019) cover the whole run of `planned_epochs` epochs, so
    the last epoch ends at a small learning rate and no epoch needs to be picked on
    validation data. Loss per batch = mean (optionally class-weighted) cross-entropy +
    ranking_weight * ranking loss of the loss predictor against the detached
    per-sample cross-entropies (+ the `consistency` loss on unlabelled images, when
    given). From epoch ceil(detach_after_fraction * epochs) on the loss predictor's
    input features are detached. Randomness (shuffling, dropout, `augment`, `sampler`,
    `consistency`) comes from `settings.seed`; the global torch RNG state is restored
    afterwards. Both modules are left in eval mode.

    With `shard`, this is one process of a data-parallel run (`triage.model.parallel`):
    every process draws the same sample, batches and augmentations, trains on its slice
    of each batch of `batch_size` images (the global batch stays `batch_size`), and the
    averaged gradient is the one-process gradient of the whole batch; records and
    forgetting counts are summed over the processes, so they mean what they mean in
    one process. Dropout masks are each process's own (seed + rank). Batches smaller
    than the number of processes are skipped, like batches of one image in one process.

    Args:
        net: The classifier (initialised by the caller; weights are updated).
        loss_predictor: The loss predictor for `net`'s stages.
        images: Float [N, 1, S, S] in [0, 1].
        labels: Class indices [N], torch.long.
        settings: Training settings.
        val_images: Optional validation images [M, 1, S, S] (metrics per epoch only).
        val_labels: Optional validation labels [M]; required with `val_images`.
        augment: Optional hook applied to every training batch.
        sampler: Optional hook giving each epoch's indices (e.g. coverage-weighted
            draws); default a fresh permutation of all images.
        consistency: Optional FixMatch loss on unlabelled images (`Consistency`); its
            weak view is `augment`.
        on_epoch_end: Optional callback(epoch_index, record) after each epoch.
        shard: This process's place in a data-parallel run (an initialised process
            group; every process calls `fit` with the same arguments); None: one process.

    Returns:
        The per-epoch `History`.
    """
    _check_data(images, labels, "", net.num_classes)
    if (val_images is None) != (val_labels is None):
        raise ValueError("val_images and val_labels must be given together")
    if val_images is not None:
        _check_data(val_images, val_labels, "val_", net.num_classes)
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 samples, got {images.shape[0]}")
    if consistency is not None and consistency.images.shape[1:] != images.shape[1:]:
        raise ValueError(f"consistency images must be shaped like images, got "
                         f"{tuple(consistency.images.shape)}")
    if shard is not None and consistency is not None:
        raise ValueError("consistency is not supported in a data-parallel run")
    if shard is not None and shard.world > settings.batch_size:
        raise ValueError(f"{shard.world} processes need a batch_size of at least as many "
                         f"images, got {settings.batch_size}")
    weight = class_weights(labels, net.num_classes) if settings.class_weighted else None
    params = [*net.parameters(), *loss_predictor.parameters()]
    optimiser = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    epochs = planned_epochs(images.shape[0], settings)
    steps_per_epoch = math.ceil(images.shape[0] / settings.batch_size)
    schedule = _scheduler(optimiser, settings, epochs * steps_per_epoch)
    detach_from = int(np.ceil(settings.detach_after_fraction * epochs))
    history = History()
    counter = ForgettingCounter(images.shape[0])
    smallest = 2 if shard is None else max(2, shard.world)
    with torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
        model = None if shard is None else stack.enter_context(shard.wrap(net, loss_predictor))
        torch.manual_seed(settings.seed if shard is None else settings.seed + shard.rank)
        generator = torch.Generator().manual_seed(settings.seed)
        for epoch in range(epochs):
            start = time.perf_counter()
            detach = epoch >= detach_from
            net.train()
            loss_predictor.train()
            if sampler is not None:
                order = sampler(epoch, generator)
            else:
                order = torch.randperm(images.shape[0], generator=generator)
            sums = {"loss": 0.0, "ce": 0.0, "rank": 0.0}
            if consistency is not None:
                sums.update(consistency=0.0, masked=0.0)
            batches = 0
            # sharded: where each batch trained begins, and 1 + correct at the positions
            # this process trained (0 elsewhere), for the forgetting counts
            trained: list[int] = []
            seen = None if shard is None else torch.zeros(order.shape[0])
            for first in range(0, order.shape[0], settings.batch_size):
                index = order[first : first + settings.batch_size]
                if index.numel() < smallest:
                    continue
                x = images[index]
                if augment is not None:
                    x = augment(x, generator)
                if shard is None:
                    logits, maps = net.forward_with_features(x)
                    per_sample = F.cross_entropy(logits, labels[index], weight=weight,
                                                 reduction="none")
                    counter.update(index, logits.detach().argmax(dim=1) == labels[index])
                    ce = per_sample.mean()
                    if detach:
                        maps = [m.detach() for m in maps]
                    rank = ranking_loss(loss_predictor(maps), per_sample,
                                        settings.ranking_margin)
                    loss = objective = ce + settings.ranking_weight * rank
                else:
                    objective, (loss, ce, rank), correct = shard.step(
                        model, x, labels[index], weight, detach, settings.ranking_margin,
                        settings.ranking_weight)
                    trained.append(first)
                    mine = slice(first + shard.rank, first + index.numel(), shard.world)
                    seen[mine] = 1.0 + correct.float()
                if consistency is not None:
                    term, share = consistency.loss(net, index.numel(), augment, generator)
                    loss = objective = loss + consistency.weight * term
                    sums["consistency"] += float(term.detach())
                    sums["masked"] += share
                optimiser.zero_grad(set_to_none=True)
                objective.backward()
                optimiser.step()
                if schedule is not None and schedule.last_epoch + 1 < getattr(
                        schedule, "total_steps", math.inf):
                    schedule.step()
                sums["loss"] += float(loss.detach())
                sums["ce"] += float(ce.detach())
                sums["rank"] += float(rank.detach())
                batches += 1
            if shard is not None:  # every process's shares and presentations, summed
                sums = _gather_epoch(shard, sums, seen, trained, order, settings.batch_size,
                                     counter)
            record = {k: v / max(batches, 1) for k, v in sums.items()}
            record["detached"] = float(detach)
            record["lr"] = float(optimiser.param_groups[0]["lr"])
            if val_images is not None:
                record.update(evaluate(net, loss_predictor, val_images, val_labels))
            record["seconds"] = time.perf_counter() - start
            history.epochs.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
    net.eval()
    loss_predictor.eval()
    history.forgetting, history.learned = counter.events, counter.learned
    return history
