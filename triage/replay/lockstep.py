"""The learning loop in lockstep: the daemon's own parts, in one process, deterministic.

`triage replay` drives the real daemon over DICOM and HTTP: the end-to-end check, but
asynchronous, so its outcome moves with machine load. This module runs the same parts
the daemon runs, in lockstep, over a labelled image stream (PneumoniaMNIST), to compare
acquisition strategies on equal terms:

* the scorer (`score_study`: MC dropout, loss predictor, the model's operating point),
  the gate (`BudgetGate`, with the window rescored at each promotion as `GateScorer`
  does) and cold start (`ColdStartSelector`);
* label splits (`choose_split`), the retrain trigger (`due_trigger`), training,
  calibration and the promotion rule (`train_and_judge`), and coverage queries
  (`pick_coverage`) after each promotion, charged to the label budget.

There is no DICOM, HTTP, SQLite or clock: study ``i`` arrives at ``i * seconds_per_study``,
is scored only after study ``i - 1`` was decided (under the `batch` budget manager: after
it joined the batch, which is decided as the daemon's scorer decides it: full, aged,
or before a study of a new model), a routed study's label comes back
``label_delay`` studies later (in routing order), and a due retrain runs to completion
before the next study. Every random draw is seeded from the run's seed, so the same
seed gives the same labels and the same AUROC on one machine; within a seed every
strategy sees the same stream and starts from the same state.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from triage.gate import BatchEntry, BudgetGate, uniform_pair
from triage.gate.coldstart import ColdStartSelector, coldstart_embedding
from triage.gate.queries import SEED_FACTOR, pick_coverage
from triage.gate.strategies import STRATEGIES, AuditOutcome
from triage.model.checkpoint import Checkpoint
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.training import classifier_auroc, fit
from triage.replay.stream import order_indices
from triage.training.augment import make_augment
from triage.training.dataset import LabeledSet
from triage.training.evaluate import (
    embed,
    expected_calibration_error,
    study_probabilities,
)
from triage.training.pipeline import train_and_judge
from triage.training.scheduler import due_trigger
from triage.training.splits import choose_split
from triage.training.train import TrainingFailed

if TYPE_CHECKING:
    from triage.config import Settings

Stream = Literal["uniform", "drift"]
STREAMS: tuple[str, ...] = ("uniform", "drift")
START = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
TAIL_STUDIES = 200
"""`labels_returned_by_tail` counts the labels back before the last this many studies."""
FRESH_SEED_OFFSET = 1000
"""Fresh model j > 0 trains with the run's seeds plus j times this."""
LAST_K = (2, 3)
"""Ensembles of the last k promoted models scored at the end of a run."""


@dataclass(frozen=True)
class Data:
    """Tensors of one data set, already at the model's input size.

    Attributes:
        stream_images: The stream, float [N, 1, S, S] (dev `train_*`).
        stream_labels: Their true classes, long [N].
        val_images / val_labels: Dev `val_*`, for learning curves only.
        holdout_images / holdout_labels: The holdout, for the final figures only.
    """

    stream_images: torch.Tensor
    stream_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    holdout_images: torch.Tensor
    holdout_labels: torch.Tensor


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run.

    Attributes:
        stream: `uniform` (shuffled) or `drift` (the rarer class scarce in the first half).
        budget: Share of the stream the gate may route (`gate.label_rate`).
        strategy: Name in the JSON (`default` for the shipped configuration, else the
            `gate.strategy`; `random_b` is `random` with other gate draws: the null).
        seed: Seeds the stream order, the oracle's noise, training and the gate.
        noise: Probability that the oracle returns the wrong class.
        label_delay: Studies between routing and the label's return.
        length: Studies in the stream (None: all).
        overrides: ``section.key=value`` settings applied to the configuration before
            the run (`triage.config.override_environ`), recorded in the run's JSON.
        fresh_seeds: Training seeds of the fresh model (`fresh_holdout_auroc` is the mean
            over them, so that it measures the labels rather than one draw of the
            training noise); more than one also scores their deep ensemble.
    """

    stream: str
    budget: float
    strategy: str
    seed: int
    noise: float = 0.0
    label_delay: int = 50
    length: int | None = None
    overrides: tuple[str, ...] = ()
    fresh_seeds: int = 1


@dataclass
class _Labelled:
    """The labels returned so far, as the store would hold them."""

    positions: dict[str, list[int]] = field(default_factory=lambda: {"train": [],
                                                                      "validation": []})
    classes: dict[str, list[int]] = field(default_factory=lambda: {"train": [],
                                                                    "validation": []})
    counts: dict[int, list[int]] = field(default_factory=dict)  # class -> [total, validation]

    def add(self, position: int, label: int, reason: str, settings: Settings) -> None:
        total, val = self.counts.setdefault(label, [0, 0])
        split = choose_split(settings.model.labels[label], reason, total, val, settings)
        if split is None:
            return
        self.counts[label][0] += 1
        self.counts[label][1] += split == "validation"
        self.positions[split].append(position)
        self.classes[split].append(label)

    def as_set(self, split: str, images: torch.Tensor) -> LabeledSet:
        positions = self.positions[split]
        n = len(positions)
        labels = torch.tensor(self.classes[split], dtype=torch.long)
        return LabeledSet(
            images[positions] if n else images[:0], labels, torch.arange(n),
            list(positions), list(range(n)), list(self.classes[split]),
        )

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.positions.values())


# the recipe bench/recipe.py measured best (shipped since 2026-12-03): the loss predictor's
# gradient kept out of the trunk from the start, augmentation by whole-pixel shifts
_RECIPE: dict[str, dict[str, Any]] = {"training": {"detach_after_fraction": 0.0},
                                      "retrain": {"rotate_degrees": 0.0, "zoom": 0.0}}

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    # the recipe before the learning-loop work: 5 warm-started epochs at a constant rate
    "old_recipe": {"training": {"epochs": 5, "min_steps": 0, "schedule": "constant",
                                "class_weighted": False},
                   "retrain": {"warm_start": True}},
    "warm_start": {"retrain": {"warm_start": True}},
    "mixed_validation": {"retrain": {"validation_source": "mixed"}},
    "no_rebalance": {"retrain": {"rebalance": False}},
    # the coverage rebalancing the chain shipped with until 2026-12-03
    "rebalance": {"retrain": {"rebalance": True}},
    "no_coverage_queries": {"retrain": {"coverage_queries": 0}},
    "delong_promotion": {"retrain": {"promotion_test": "delong"}},
    # the promotion rule shipped until 2026-12-03: best of three, the tolerance alone
    "best_of_three": {"retrain": {"reference_models": 3, "promotion_test": "none"}},
    # T predictive samples from the last-layer Laplace posterior instead of head dropout
    "laplace": {"model": {"epistemic": "laplace"}},
    # the promoted candidate refit on the training and audit labels together
    "refit": {"retrain": {"refit_on_all_labels": True}},
    "recipe": _RECIPE,
    "recipe_refit": {**_RECIPE, "retrain": {**_RECIPE["retrain"], "refit_on_all_labels": True}},
    # the candidate compared with the serving model alone, paired on the same audits and
    # allowed their DeLong noise, instead of with the best of the last three
    "paired_promotion": {"retrain": {"reference_models": 1, "promotion_test": "delong"}},
    # both: raw training set, and promotion against the serving model within noise
    "no_rebalance_paired": {"retrain": {"rebalance": False, "reference_models": 1,
                                        "promotion_test": "delong"}},
    # `badge+batch`: BADGE as the paper has it, a k-means++ batch of buffered studies
    # (`gate.budget_manager: batch`) instead of each study's gradient norm on arrival
    "batch": {"gate": {"budget_manager": "batch"}},
}
"""Ablations of the shipped configuration: strategy ``default+<name>``."""


def run_settings(base: Settings, spec: RunSpec) -> Settings:
    """The configuration of a run: `base` with the budget, strategy and seeds of `spec`.

    The daily cap is lifted (a stream day here is not a hospital day) and the model's
    input size is the data's native 28 px (the daemon resamples to `model.input_size`
    at ingest; upsampling 28 px images adds no information). `default` is `base` as it
    is; `default+<variant>` applies one of `VARIANTS`; any other name sets
    `gate.strategy` (`random_b`: the random strategy with other draws, the null).
    """
    name, _, variant = spec.strategy.partition("+")
    if variant and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    gate: dict[str, Any] = {"label_rate": spec.budget, "daily_cap": 10**9,
                            "seed": spec.seed + (7919 if name == "random_b" else 0)}
    if name != "default":
        gate["strategy"] = "random" if name == "random_b" else name
    gate["exploration_rate"] = min(base.gate.exploration_rate, spec.budget)
    changes = VARIANTS.get(variant, {})
    gate.update(changes.get("gate", {}))
    training = base.model.training.model_copy(update={"seed": spec.seed,
                                                      **changes.get("training", {})})
    model = base.model.model_copy(update={"input_size": 28, "training": training,
                                          **changes.get("model", {})})
    retrain = base.retrain.model_copy(update=changes.get("retrain", {}))
    return base.model_copy(update={
        "gate": base.gate.model_copy(update=gate), "model": model, "retrain": retrain,
    })


def stream_order(labels: torch.Tensor, spec: RunSpec) -> np.ndarray:
    """Positions of the stream's images in arrival order (same for every strategy)."""
    order = order_indices(labels.numpy(), "shuffled" if spec.stream == "uniform" else "drift",
                          spec.seed)
    return order if spec.length is None else order[: spec.length]


def oracle(true_label: int, position: int, spec: RunSpec, num_classes: int) -> int:
    """The reader's label: the truth, or with probability `noise` another class."""
    if spec.noise <= 0:
        return true_label
    flip, pick = uniform_pair(spec.seed * 104729 + 17, position)
    if flip >= spec.noise:
        return true_label
    return (true_label + 1 + int(pick * (num_classes - 1))) % num_classes


class Lockstep:
    """One run of the learning loop; `run()` returns the run's JSON object."""

    def __init__(self, base: Settings, data: Data, spec: RunSpec) -> None:
        if spec.stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {spec.stream!r}")
        if not 0 < spec.budget <= 1:
            raise ValueError(f"budget must lie in (0, 1], got {spec.budget}")
        if not 0 <= spec.noise < 1:
            raise ValueError(f"noise must lie in [0, 1), got {spec.noise}")
        if spec.fresh_seeds < 1:
            raise ValueError(f"fresh_seeds must be at least 1, got {spec.fresh_seeds}")
        self.spec = spec
        self.settings = run_settings(base, spec)
        self.data = data
        self.order = stream_order(data.stream_labels, spec)
        self.images = data.stream_images[self.order]
        self.truth = data.stream_labels[self.order]
        self.gate = BudgetGate(self.settings.gate)
        gate = self.settings.gate
        self.cold = ColdStartSelector(max(self.gate.score_rate, 1e-6), gate.seed,
                                      window=gate.window, warmup=gate.warmup,
                                      feedback_gain=gate.feedback_gain,
                                      typical_neighbours=gate.cold_start_neighbours)
        self.labelled = _Labelled()
        self.serving: list[tuple[str, Checkpoint]] = []  # newest first
        self.window_version: str | None = None
        self.pending: list[tuple[int, int, str]] = []  # (due at, position, reason)
        self.routed: dict[int, str] = {}
        self.scored_unrouted: list[int] = []
        self.curve: list[dict[str, float]] = []
        self.runs: list[dict[str, Any]] = []
        self.new_labels = 0
        self.last_start: float | None = None
        self.returned_by_tail = 0
        self.served_train_labels = 0
        # `auto`: each audit's quantiles and served probabilities until its label is back,
        # then what it told the experts (the store's `audit_outcomes`)
        self.audit_context: dict[int, tuple[dict[str, float], list[float]]] = {}
        self.audit_outcomes: list[AuditOutcome] = []
        self.routed_by_expert: dict[str, int] = {}
        # forgetting events of each labelled position in each run (the store's table)
        self.forgetting: dict[int, list[tuple[int, bool]]] = {}
        # `batch` manager: the waiting studies (position, arrival, entry), the model
        # that scored them, and each decided study's wait (seconds)
        self.batch: list[tuple[int, float, BatchEntry]] = []
        self.batch_version: str | None = None
        self.batch_waits: list[float] = []
        self.batches = 0

    # -- the stream ------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.perf_counter()
        seconds = 60.0
        n = len(self.order)
        for i in range(n):
            now = START + i * seconds
            self._return_labels(i)
            if i == n - TAIL_STUDIES:
                self.returned_by_tail = self.labelled.total
            self._maybe_retrain(i, now)
            self._flush_due(now)
            self._decide(i, now)
        if self.batch:  # the stream goes quiet: the last batch ages out
            self._flush_batch(self.batch[0][1] + self.settings.gate.batch_seconds)
        # the stream goes quiet: the last labels come back, and with nothing new for
        # `retrain.idle_minutes` the waiting ones start a final run (the `idle` trigger)
        self._return_labels(n + self.spec.label_delay)
        quiet = START + (n + self.spec.label_delay) * seconds
        self._maybe_retrain(n, quiet + self.settings.retrain.idle_minutes * 60,
                            since_last_label=self.settings.retrain.idle_minutes * 60)
        return self._report(started)

    def _checkpoint(self) -> Checkpoint | None:
        return self.serving[0][1] if self.serving else None

    def _score(self, position: int, checkpoint: Checkpoint) -> dict[str, float]:
        return self._score_result(position, checkpoint)[0]

    def _score_result(self, position: int, checkpoint: Checkpoint
                      ) -> tuple[dict[str, float], list[float]]:  # fmt: skip
        """The gate's components of one study and the served probabilities."""
        scores, probs, _ = self._score_full(position, checkpoint)
        return scores, probs

    def _score_full(self, position: int, checkpoint: Checkpoint
                    ) -> tuple[dict[str, float], list[float], np.ndarray | None]:  # fmt: skip
        """`_score_result` and the study's batch embedding (`Strategy.batch_embedding`)."""
        result = score_study(
            checkpoint.network, checkpoint.loss_predictor, self.images[position : position + 1],
            self.settings.model, seed=position * SEED_FACTOR,
            operating_point=checkpoint.operating_point, epistemic=checkpoint.epistemic,
        )
        # as the daemon's scorer: the uncertainty stands in for what the model lacks
        strategy = self.gate.strategy
        embedding = strategy.batch_embedding(result) if self.gate.manager.buffered else None
        return strategy.components_with_fallback(result)[0], list(result.probs), embedding

    def _decide(self, i: int, now: float) -> None:
        when = datetime.fromtimestamp(now, UTC)
        checkpoint = self._checkpoint()
        if checkpoint is None:
            embedding = coldstart_embedding(self.images[i : i + 1])
            wants = self.cold.wants(embedding, self.gate.sequence)
            decision = self.gate.decide(None, when, cold_start=wants)
            self.cold.record(embedding, decision.reason)
        else:
            version = self.serving[0][0]
            if self.batch and self.batch_version != version:
                self._flush_batch(now)  # the buffer's scores are the old model's
            if self.window_version != version:
                keys = self.gate.window_keys()
                self.gate.rescore({k: self._score(k, checkpoint) for k in keys})
                self.window_version = version
            if self.gate.manager.buffered:
                scores, _, embedding = self._score_full(i, checkpoint)
                self.batch.append((i, now, BatchEntry(scores, i, embedding)))
                self.batch_version = version
                self._flush_due(now)  # the batch may be full now
                return
            scores, probs = self._score_result(i, checkpoint)
            decision = self.gate.decide(scores, when, key=i)
            if decision.reason == "audit" and decision.quantiles and self.gate.mix is not None:
                self.audit_context[i] = (decision.quantiles, probs)
            if decision.needs_label and decision.expert is not None:
                self.routed_by_expert[decision.expert] = (
                    self.routed_by_expert.get(decision.expert, 0) + 1)
        self.gate.commit(decision)
        if decision.needs_label:
            self._route(i, decision.reason)
        elif checkpoint is not None:
            self.scored_unrouted.append(i)

    def _flush_due(self, now: float) -> None:
        """Decide the waiting batch when it is due (`BudgetGate.batch_due`), as the
        daemon's scorer does before each study and after each buffered one."""
        if self.batch and self.gate.batch_due(len(self.batch), self.batch[0][1], now):
            self._flush_batch(now)

    def _flush_batch(self, now: float) -> None:
        """Decide the waiting batch at `now` (`BudgetGate.decide_batch`)."""
        decisions = self.gate.decide_batch([entry for _, _, entry in self.batch],
                                           datetime.fromtimestamp(now, UTC))
        for (position, arrived, _), decision in zip(self.batch, decisions, strict=True):
            self.gate.commit(decision)
            self.batch_waits.append(now - arrived)
            if decision.needs_label:
                self._route(position, decision.reason)
            else:
                self.scored_unrouted.append(position)
        self.batch = []
        self.batches += 1

    def _route(self, position: int, reason: str) -> None:
        self.routed[position] = reason
        self.pending.append((position + self.spec.label_delay, position, reason))

    def _return_labels(self, i: int) -> None:
        while self.pending and self.pending[0][0] <= i:
            _, position, reason = self.pending.pop(0)
            label = oracle(int(self.truth[position]), int(self.order[position]), self.spec,
                           len(self.settings.model.labels))
            self.labelled.add(position, label, reason, self.settings)
            self.new_labels += 1
            if position in self.audit_context:  # `auto`: the mix moves with each audit
                quantiles, probs = self.audit_context.pop(position)
                self.audit_outcomes.append(AuditOutcome(quantiles, probs[label]))
                self.gate.set_mix(self.gate.strategy.mix(self.audit_outcomes))

    # -- retraining ------------------------------------------------------------------

    def _maybe_retrain(self, i: int, now: float, since_last_label: float | None = None) -> None:
        since = None if self.last_start is None else now - self.last_start
        trigger = due_trigger(self.new_labels, since, self.settings, since_last_label)
        if trigger is None:
            return
        self.last_start, self.new_labels = now, 0
        train = self.labelled.as_set("train", self.images)
        validation = self.labelled.as_set("validation", self.images)
        references = self.serving[: self.settings.retrain.reference_models]
        record: dict[str, Any] = {"at": i, "trigger": trigger, "train": train.num_studies,
                                  "validation": validation.num_studies}
        try:
            judged = train_and_judge(train, validation, self.settings, references,
                                     unlabelled=self._unlabelled_images(),
                                     unforgettable=self._unforgettable())
        except TrainingFailed as exc:
            self.runs.append({**record, "state": "failed", "why": str(exc)})
            return
        for position, events, learned in judged.forgetting:
            self.forgetting.setdefault(position, []).append((events, learned))
        record.update(state="promoted" if judged.promote else "rejected",
                      val_auroc=judged.candidate["auroc"], reason=judged.reason,
                      refit={"studies": judged.refit["studies"]} if judged.refit else None)
        self.runs.append(record)
        if not judged.promote:
            return
        self.served_train_labels = (judged.refit["studies"] if judged.refit
                                    else train.num_studies)
        version = f"v{len(self.runs):04d}"
        checkpoint = judged.checkpoint(self.settings.model)
        self.serving.insert(0, (version, checkpoint))
        labels_bought = len(self.routed)
        point = {"studies": i, "labels": labels_bought,
                 "val_auroc": self._auroc(checkpoint, self.data.val_images,
                                          self.data.val_labels)}
        if self.gate.mix is not None:
            point["mix"] = self.gate.mix
        self.curve.append(point)
        if i < len(self.order):  # the final idle run has no stream left to query
            self._coverage_queries(i, now, checkpoint)

    def _never_forgotten(self) -> set[int]:
        """Positions every earlier run learned and never forgot (`unforgettable_studies`)."""
        return {p for p, runs in self.forgetting.items()
                if all(events == 0 and learned for events, learned in runs)}

    def _unforgettable(self) -> set[int]:
        """`_never_forgotten` when `retrain.unforgettable_weight` uses them, else none."""
        return self._never_forgotten() if self.settings.retrain.unforgettable_weight < 1 else set()

    def _unlabelled_pool(self) -> list[int]:
        """Stream positions of the recent scored studies not routed (`unlabelled_pool`)."""
        return [p for p in self.scored_unrouted[-self.settings.retrain.pool_max :]
                if p not in self.routed]

    def _unlabelled_images(self) -> torch.Tensor | None:
        """The pool's images when the strategy needs `dal`'s classifier, else None."""
        if not STRATEGIES[self.settings.gate.strategy].fits_discriminator:
            return None
        return self.images[self._unlabelled_pool()]

    def _coverage_queries(self, i: int, now: float, checkpoint: Checkpoint) -> None:
        budget = self.settings.retrain.coverage_queries
        if budget < 1 or not self.gate.manager.uses_scores:  # the random baseline: a coin
            return
        pool = self._unlabelled_pool()
        centres = sorted(self.routed)
        if not pool:
            return
        net = checkpoint.network
        picks = pick_coverage(embed(net, self.images[centres]), embed(net, self.images[pool]),
                              budget, self.settings.retrain.coverage_outlier_fraction)
        for k in picks:
            self._route(pool[k], "coverage")
        day = self.gate.day_of(datetime.fromtimestamp(now, UTC))
        self.gate.note_routed(day, len(picks))

    # -- results ---------------------------------------------------------------------

    @staticmethod
    def _auroc(checkpoint: Checkpoint, images: torch.Tensor, labels: torch.Tensor) -> float:
        probs = study_probabilities(checkpoint.network, images, torch.arange(images.shape[0]),
                                    images.shape[0])
        return classifier_auroc(probs, labels)

    def _report(self, started: float) -> dict[str, Any]:
        spec = self.spec
        out: dict[str, Any] = {
            "stream": spec.stream, "budget": spec.budget, "strategy": spec.strategy,
            "seed": spec.seed, "noise": spec.noise, "label_delay": spec.label_delay,
            "studies": len(self.order), "labels": len(self.routed),
            "overrides": list(spec.overrides), "fresh_seeds": spec.fresh_seeds,
        }
        reasons: dict[str, int] = {}
        for reason in self.routed.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        out["labels_by_reason"] = dict(sorted(reasons.items()))
        # the class mix of what was bought (true classes): a batch that is diverse in the
        # model's gradient space should buy fewer labels of one kind
        routed = list(self.routed)
        out["labels_positive_share"] = (float(self.truth[routed].float().mean())
                                        if routed else None)
        if self.batches:
            waits = np.array(self.batch_waits)
            out["batch"] = {"batches": self.batches, "studies": len(waits),
                            "wait_seconds_mean": float(waits.mean()),
                            "wait_seconds_p95": float(np.percentile(waits, 95)),
                            "wait_seconds_max": float(waits.max())}
        out["labels_returned"] = self.labelled.total
        final = self._checkpoint()
        out["final_val_auroc"] = (self._auroc(final, self.data.val_images, self.data.val_labels)
                                  if final is not None else float("nan"))
        out.update(self._final_scores())
        out["fresh_is_served"] = self._served_is_fresh()
        out.update(self._fresh_scores(out["holdout_auroc"] if out["fresh_is_served"] else None))
        out.update(self._last_k_scores())
        out["promotions"] = sum(r["state"] == "promoted" for r in self.runs)
        out["rejections"] = sum(r["state"] == "rejected" for r in self.runs)
        out["served_train_labels"] = self.served_train_labels
        out["labels_returned_by_tail"] = self.returned_by_tail
        out["served_minus_fresh"] = out["holdout_auroc"] - out["fresh_holdout_auroc"]
        for k in LAST_K:
            if out.get(f"served_last{k}_holdout_auroc") is not None:
                out[f"served_last{k}_minus_served"] = (out[f"served_last{k}_holdout_auroc"]
                                                       - out["holdout_auroc"])
        if out.get("fresh_ensemble_holdout_auroc") is not None:
            out["fresh_ensemble_minus_served"] = (out["fresh_ensemble_holdout_auroc"]
                                                  - out["holdout_auroc"])
        if self.gate.mix is not None:
            out["auto_mix"] = self.gate.mix
            out["auto_audits"] = len(self.audit_outcomes)
            out["routed_by_expert"] = dict(sorted(self.routed_by_expert.items()))
        trained = len(self.forgetting)
        out["unforgettable_share"] = (len(self._never_forgotten()) / trained if trained
                                      else None)
        out["retrains"] = self.runs
        out["curve"] = self.curve
        out["seconds"] = round(time.perf_counter() - started, 2)
        return out

    def _final_scores(self) -> dict[str, Any]:
        checkpoint = self._checkpoint()
        nan = float("nan")
        if checkpoint is None:
            return {"holdout_auroc": nan, "holdout_accuracy": nan, "holdout_ece": nan,
                    "holdout_ece_uncalibrated": nan, "operating_point": None}
        x, y = self.data.holdout_images, self.data.holdout_labels
        groups = torch.arange(x.shape[0])
        point = checkpoint.operating_point
        calibrated = study_probabilities(checkpoint.network, x, groups, x.shape[0],
                                         temperature=point.temperature).double().numpy()
        raw = study_probabilities(checkpoint.network, x, groups, x.shape[0]).double().numpy()
        truth = y.numpy()
        return {
            "holdout_auroc": classifier_auroc(torch.from_numpy(calibrated), y),
            "holdout_accuracy": float((point.predict(calibrated) == truth).mean()),
            "holdout_accuracy_argmax": float((raw.argmax(1) == truth).mean()),
            "holdout_ece": expected_calibration_error(calibrated, truth),
            "holdout_ece_uncalibrated": expected_calibration_error(raw, truth),
            "operating_point": point.to_json(),
        }

    def _served_is_fresh(self) -> bool:
        """Whether the served model already is the fresh model: the last run was promoted
        and refit from scratch (no warm start, no rebalanced draws), with the same seed
        and recipe, on exactly every label that came back. Training it again would give
        the same weights (tests/test_lockstep.py checks this), so it is not repeated: one
        training less per run. The holdout AUROC does not depend on the temperature."""
        last = self.runs[-1] if self.runs else None
        retrain = self.settings.retrain
        return bool(last and last["state"] == "promoted" and last.get("refit")
                    and last["refit"]["studies"] == self.labelled.total
                    and not retrain.warm_start and not retrain.rebalance)

    def _holdout_probabilities(self, checkpoint: Checkpoint) -> torch.Tensor:
        x = self.data.holdout_images
        return study_probabilities(checkpoint.network, x, torch.arange(x.shape[0]), x.shape[0])

    def _fresh_checkpoint(self, member: int = 0) -> Checkpoint | None:
        """A model trained from scratch, with the run's own network and training settings,
        on every label this run bought (both splits): the quality of the labelled set
        apart from the chain of retrains. `member` j > 0 shifts the initialisation and
        training seeds by j * FRESH_SEED_OFFSET. None when a class is missing."""
        positions = self.labelled.positions["train"] + self.labelled.positions["validation"]
        labels = self.labelled.classes["train"] + self.labelled.classes["validation"]
        if len(set(labels)) < 2:
            return None
        model = self.settings.model
        shift = member * FRESH_SEED_OFFSET
        recipe = model.training.model_copy(update={"seed": model.training.seed + shift})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.spec.seed + shift)
            net, loss_predictor = build_network(model), build_loss_predictor(model)
        fit(net, loss_predictor, self.images[positions], torch.tensor(labels), recipe,
            augment=make_augment(self.settings.retrain, model.input_size))
        return Checkpoint(model, net, loss_predictor)

    def _fresh_auroc(self, member: int = 0) -> float:
        """Holdout AUROC of fresh model `member` (`_fresh_checkpoint`); NaN without it."""
        checkpoint = self._fresh_checkpoint(member)
        if checkpoint is None:
            return float("nan")
        return self._auroc(checkpoint, self.data.holdout_images, self.data.holdout_labels)

    def _fresh_scores(self, served_auroc: float | None) -> dict[str, Any]:
        """`fresh_holdout_auroc`: the mean over `spec.fresh_seeds` fresh models, each
        member's AUROC, and with several members the AUROC of their mean probabilities
        (a deep ensemble on the run's labels). `served_auroc`: given when the served model
        already is fresh member 0, which is then not trained again."""
        nan = float("nan")
        y = self.data.holdout_labels
        probs = []
        for member in range(self.spec.fresh_seeds):
            checkpoint = (self._checkpoint() if member == 0 and served_auroc is not None
                          else self._fresh_checkpoint(member))
            if checkpoint is None:
                return {"fresh_holdout_auroc": nan}
            probs.append(self._holdout_probabilities(checkpoint))
        members = [classifier_auroc(p, y) for p in probs]
        if served_auroc is not None:  # the same ranks; the stored figure to the last digit
            members[0] = served_auroc
        out: dict[str, Any] = {"fresh_holdout_auroc": float(np.mean(members))}
        if len(members) > 1:
            out["fresh_holdout_auroc_members"] = members
            out["fresh_ensemble_holdout_auroc"] = classifier_auroc(
                torch.stack(probs).mean(0), y)
        return out

    def _last_k_scores(self) -> dict[str, float]:
        """Holdout AUROC of the mean eval-mode probabilities of the last k promoted models
        (the serving one included), for each k in LAST_K that the run promoted."""
        out: dict[str, float] = {}
        probs = [self._holdout_probabilities(c) for _, c in self.serving[: max(LAST_K)]]
        for k in LAST_K:
            if len(probs) >= k:
                out[f"served_last{k}_holdout_auroc"] = classifier_auroc(
                    torch.stack(probs[:k]).mean(0), self.data.holdout_labels)
        return out


def run_one(base: Settings, data: Data, spec: RunSpec) -> dict[str, Any]:
    """Run `spec` and return its JSON object (one torch thread: runs go in parallel)."""
    torch.set_num_threads(1)
    result = Lockstep(base, data, spec).run()
    return {k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in result.items()}


__all__ = ["Data", "Lockstep", "RunSpec", "STREAMS", "run_one", "run_settings"]
