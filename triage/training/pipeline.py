"""One retrain run, start to finish (runs inside the worker process).

1. Load the labelled studies: `train` and the fixed `validation` split.
2. `train_and_judge` (pure: no store, no files; the lockstep benchmark calls it too):
   a. rebalance: coverage weights of the training images in the serving model's
      embedding space (robust k-center cells, so outliers cannot capture cells);
   b. train a candidate from scratch (or warm-started with `retrain.warm_start`), one
      run with one optimiser and schedule (`train_candidate`);
   c. fit its operating point (temperature, threshold) on the validation set;
   d. compare it with the reference: the best of the serving model and its recent
      promoted ancestors, all re-evaluated on the same, current validation set.
3. Register the candidate with its metrics, operating point, data summary and parent.
4. Promote (one transaction with the run's final row, then re-score the pending queue) or
   reject with the reason, per `triage.model.registry.promotion_decision`. A promoted run also
   chooses its coverage queries here, in the worker process, and stores them in the
   run's metrics (`coverage_picks`); the daemon's scoring thread only routes them.

Any error leaves the serving model untouched; the worker marks the run `failed`.

With `retrain.nproc` > 1 this runs in rank 0 of the worker's processes (`shard`): each
training in 2b (and the refit) is shared with the other ranks (`train_candidate`,
`triage.training.distributed`); everything else, evaluation and decision included, runs
here alone on the plain modules, and the other ranks are let go once training is over.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlite_utils
import torch

from triage.gate.queries import coverage_queries, rescore_pending, unlabelled_pool_images
from triage.gate.strategies import STRATEGIES
from triage.model.calibration import OperatingPoint, fit_operating_point
from triage.model.checkpoint import Checkpoint, save_checkpoint
from triage.model.discriminator import fit_discriminator
from triage.model.epistemic import EpistemicHead, fit_epistemic, pooled_features
from triage.model.inference import embed
from triage.model.lossnet import LossPredictor, build_loss_predictor
from triage.model.network import TriageNet, build_network
from triage.model.parallel import Shard
from triage.model.registry import ModelError, ModelRegistry, ModelVersion, promotion_decision
from triage.store.db import transaction
from triage.telemetry.logs import event
from triage.training import distributed
from triage.training.dataset import LabeledSet, load_split
from triage.training.delong import paired_auroc_difference
from triage.training.evaluate import image_logits, study_probabilities, validation_metrics
from triage.training.runs import (
    finish_or_abort,
    finish_run,
    record_forgetting,
    unforgettable_studies,
    update_progress,
)
from triage.training.sampling import coverage_plan
from triage.training.train import EpochCallback, TrainingFailed, TrainOutcome, train_candidate

if TYPE_CHECKING:
    from triage.config import Settings
    from triage.model.settings import ModelSettings

log = logging.getLogger("triage.retrain")

TRAIN_SHARE = 0.8  # progress from 0.05 to 0.85 is training


@dataclass
class Judgement:
    """A trained candidate and the verdict on it (see `train_and_judge`).

    Attributes:
        network: The candidate classifier (eval mode).
        loss_predictor: Its loss predictor.
        outcome: The training run's records.
        operating_point: Temperature and threshold fitted on the validation set.
        candidate: The candidate's validation metrics at its operating point, plus
            `ece_uncalibrated` (temperature 1, argmax).
        reference: Validation metrics of the reference model (None for a first model).
        reference_version: Which model the reference is.
        promote: Whether the candidate may replace the serving model.
        reason: One line saying why.
        coverage: What rebalancing did (radius, cells, class mix before/after).
        epistemic: The candidate's last-layer Laplace posterior and feature density
            (`triage.model.epistemic`), or None when they could not be fitted.
        judge: With `retrain.refit_on_all_labels` and a promotion: the candidate that was
            judged, while `network` is its refit on the training and validation labels.
        refit: What the refit did (`studies`, `seconds`), empty without one.
        forgetting: (study id, forgetting events, learned) of each study the served
            network trained on, from its run (the refit's, else the candidate's):
            `TrainOutcome.per_study`.
    """

    network: TriageNet
    loss_predictor: LossPredictor
    outcome: TrainOutcome
    operating_point: OperatingPoint
    candidate: dict[str, float]
    reference: dict[str, float] | None
    reference_version: str | None
    promote: bool
    reason: str
    coverage: dict[str, Any] = field(default_factory=dict)
    epistemic: EpistemicHead | None = None
    judge: TriageNet | None = None
    refit: dict[str, Any] = field(default_factory=dict)
    forgetting: list[tuple[int, int, bool]] = field(default_factory=list)

    def checkpoint(self, settings: ModelSettings) -> Checkpoint:
        """The model to serve as an in-memory checkpoint (operating point, epistemic
        head and, after a refit, the judged candidate)."""
        return Checkpoint(settings, self.network, self.loss_predictor,
                          {"operating_point": self.operating_point.to_json()}, self.epistemic,
                          self.judge)


def check_labels(train: LabeledSet, validation: LabeledSet, settings: Settings) -> None:
    """Raise `TrainingFailed` unless there are enough labels to train and to judge.

    Both sets need every class: a model judged without one of them has no AUROC."""
    retrain = settings.retrain
    classes = len(settings.model.labels)
    if train.num_studies < retrain.min_train_studies:
        raise TrainingFailed(f"too few labelled training studies: {train.num_studies} < "
                             f"retrain.min_train_studies {retrain.min_train_studies}")
    if validation.num_studies < retrain.min_validation_studies:
        raise TrainingFailed(
            f"too few validation studies: {validation.num_studies} < "
            f"retrain.min_validation_studies {retrain.min_validation_studies}")
    for name, part in (("training", train), ("validation", validation)):
        present = len(set(part.study_labels))
        if present < classes:
            raise TrainingFailed(f"the {name} set holds {present} of {classes} classes")


def train_and_judge(
    train: LabeledSet,
    validation: LabeledSet,
    settings: Settings,
    references: list[tuple[str, Checkpoint]],
    on_epoch: EpochCallback | None = None,
    unlabelled: torch.Tensor | None = None,
    unforgettable: Collection[int] = frozenset(),
    shard: Shard | None = None,
) -> Judgement:
    """Train a candidate on `train` and judge it on `validation` against `references`.

    Args:
        train: Training studies (`check_labels` must pass).
        validation: The fixed validation studies.
        settings: The configuration (`model`, `retrain`).
        references: (version, checkpoint) of the serving model first, then its recent
            promoted ancestors; empty for a first model. The serving model embeds the
            training images for rebalancing and is the warm start.
        on_epoch: Progress callback.
        unlabelled: Images of the recent unlabelled studies [M, 1, S, S] when the gate's
            strategy needs the labelled-versus-unlabelled classifier (`dal`): a promoted
            model's head then holds one fitted on every labelled image and these.
        unforgettable: Study ids learned and never forgotten in every earlier run that
            trained on them: with `retrain.unforgettable_weight` below 1 their images are
            drawn that much less often.
        shard: Rank 0 of a run of several processes: the trainings are shared with the
            other ranks (which run `triage.training.train.follow`); None: one process.
    """
    check_labels(train, validation, settings)
    retrain = settings.retrain
    champion = references[0][1] if references else None
    net, loss_predictor, outcome, coverage = _train(train, settings, champion, on_epoch,
                                                    unforgettable, shard)
    point = fit_operating_point(image_logits(net, validation.images), validation.labels)
    epistemic = _epistemic(net, train, validation, settings)
    args = (validation.images, validation.groups, validation.study_labels)
    candidate = validation_metrics(net, *args, point)
    candidate["ece_uncalibrated"] = validation_metrics(net, *args)["ece"]
    reference, reference_version, reference_net = None, None, None
    for version, checkpoint in references:  # judged by networks that never saw validation
        held_out = checkpoint.held_out_network
        metrics = validation_metrics(held_out, *args, checkpoint.operating_point)
        if reference is None or metrics["auroc"] > reference["auroc"]:
            reference, reference_version = metrics, version
            reference_net = held_out
    noise = 0.0
    if retrain.promotion_test == "delong" and reference_net is not None:
        noise = _auroc_noise(net, reference_net, validation)
        candidate["auroc_noise"] = noise
    promote, reason = promotion_decision(candidate, reference, retrain.promotion_tolerance,
                                         noise)
    if reference_version is not None:
        reason = f"{reason} (reference {reference_version})"
    judged = Judgement(net, loss_predictor, outcome, point, candidate, reference,
                       reference_version, promote, reason, coverage, epistemic,
                       forgetting=outcome.per_study(train))
    if promote and retrain.refit_on_all_labels:
        judged = _refit(judged, train, validation, settings, champion, unforgettable, shard)
    if promote and unlabelled is not None:
        judged = _with_discriminator(judged, train.plus(validation), unlabelled)
    return judged


def _with_discriminator(judged: Judgement, labelled: LabeledSet,
                        unlabelled: torch.Tensor) -> Judgement:  # fmt: skip
    """The judged model with `dal`'s classifier in its head, fitted on the pooled
    features of every labelled image against the unlabelled images'; unchanged (a
    warning) when either set is empty or the model has no head."""
    if judged.epistemic is None or len(unlabelled) == 0 or len(labelled.images) == 0:
        event(log, "retrain_discriminator_skipped", logging.WARNING,
              head=judged.epistemic is not None, unlabelled=len(unlabelled))
        return judged
    discriminator = fit_discriminator(pooled_features(judged.network, labelled.images),
                                      pooled_features(judged.network, unlabelled))
    return replace(judged, epistemic=replace(judged.epistemic, discriminator=discriminator))


def _train(train: LabeledSet, settings: Settings, champion: Checkpoint | None,
           on_epoch: EpochCallback | None = None, unforgettable: Collection[int] = (),
           shard: Shard | None = None,
           ) -> tuple[TriageNet, LossPredictor, TrainOutcome, dict[str, Any]]:  # fmt: skip
    """One training run on `train` (rebalanced with the champion's embeddings when
    `retrain.rebalance`; the `unforgettable` studies' images drawn
    `retrain.unforgettable_weight` times as often): network, loss predictor, records,
    what rebalancing did."""
    retrain = settings.retrain
    plan, coverage = None, {"rebalanced": False}
    if retrain.rebalance and champion is not None:
        plan = coverage_plan(
            embed(champion.network, train.images), train.labels, list(settings.model.labels),
            n_cells=retrain.coverage_cells, power=retrain.coverage_power,
            outlier_fraction=retrain.coverage_outlier_fraction,
            seed=settings.model.training.seed,
        )
        coverage = {"rebalanced": True, **plan.to_json()}
    elif retrain.rebalance:
        coverage["why"] = "no serving model to embed with"
    image_weights = None
    if retrain.unforgettable_weight < 1 and unforgettable:
        keep = set(unforgettable)
        image_weights = np.array([retrain.unforgettable_weight
                                  if train.study_ids[g] in keep else 1.0
                                  for g in train.groups.tolist()])
        coverage["unforgettable_images"] = int((image_weights < 1).sum())
    net, loss_predictor = _initial_model(settings, champion)
    outcome = train_candidate(net, loss_predictor, train, settings.model, retrain, plan,
                              on_epoch, image_weights, shard)
    return net, loss_predictor, outcome, coverage


def _epistemic(net: TriageNet, train: LabeledSet, validation: LabeledSet,
               settings: Settings) -> EpistemicHead | None:
    try:
        return fit_epistemic(net, train.images, train.labels, validation.images,
                             validation.labels, samples=settings.model.mc_samples,
                             seed=settings.model.training.seed)  # fmt: skip
    except (ValueError, RuntimeError) as exc:  # a degenerate fit: score by MC dropout
        event(log, "retrain_epistemic_failed", logging.WARNING, error=str(exc)[:200])
        return None


def _refit(judged: Judgement, train: LabeledSet, validation: LabeledSet, settings: Settings,
           champion: Checkpoint | None, unforgettable: Collection[int] = (),
           shard: Shard | None = None) -> Judgement:
    """The promoted candidate trained again, same recipe and seed, on every label.

    The operating point stays the candidate's (fitted on held-out labels). The refit's
    epistemic head is fitted with the validation labels among its training data, so its
    prior precision and OOD threshold are chosen in-sample (the threshold is then a
    little lower: slightly more studies are flagged unlike the training data).
    """
    started = time.monotonic()
    both = train.plus(validation)
    net, loss_predictor, outcome, _ = _train(both, settings, champion,
                                             unforgettable=unforgettable, shard=shard)
    refit = {"studies": both.num_studies, "seconds": round(time.monotonic() - started, 2)}
    event(log, "retrain_refit", **refit)
    return replace(judged, network=net, loss_predictor=loss_predictor, judge=judged.network,
                   epistemic=_epistemic(net, both, validation, settings), refit=refit,
                   forgetting=outcome.per_study(both))


def run_retrain(settings: Settings, db: sqlite_utils.Database, run_id: int,
                shard: Shard | None = None) -> str:
    """Run retrain `run_id` (a `running` row) to its final state; return that state.

    With `shard` (rank 0 of several processes), the trainings are shared with the other
    ranks, which are released as soon as the last one ended.

    Raises:
        TrainingFailed: Too few labels, no validation study, or a non-finite loss.
        ModelError: The candidate checkpoint could not be registered.
    """
    started = time.monotonic()
    names = list(settings.model.labels)
    retrain = settings.retrain
    registry = ModelRegistry(db, settings.path("models"), settings.model)
    update_progress(db, run_id, 0.01, "loading labels")
    train = load_split(db, "train", settings.model)
    validation = load_split(db, "validation", settings.model)
    update_progress(db, run_id, 0.04, "labels loaded",
                    labels_used=train.num_studies + validation.num_studies)
    event(log, "retrain_data", run_id=run_id, train_studies=train.num_studies,
          validation_studies=validation.num_studies)
    check_labels(train, validation, settings)

    serving = registry.serving()
    references = _references(registry, serving, retrain.reference_models, run_id)

    def on_epoch(epoch: int, planned: int, record: dict[str, float]) -> None:
        message = f"epoch {epoch + 1}/{planned}: loss {record['loss']:.4f}"
        update_progress(db, run_id, 0.05 + TRAIN_SHARE * (epoch + 1) / planned, message)
        event(log, "retrain_epoch", run_id=run_id, epoch=epoch + 1, planned=planned,
              loss=round(record["loss"], 5))

    unlabelled = (unlabelled_pool_images(db, settings)
                  if STRATEGIES[settings.gate.strategy].fits_discriminator else None)
    unforgettable = unforgettable_studies(db) if retrain.unforgettable_weight < 1 else set()
    update_progress(db, run_id, 0.045, "training")
    judged = train_and_judge(train, validation, settings, references, on_epoch, unlabelled,
                             unforgettable, shard)
    distributed.release(shard)  # no training follows: the other ranks may exit
    if judged.coverage.get("rebalanced"):
        event(log, "retrain_coverage", run_id=run_id, radius=round(judged.coverage["radius"], 4),
              cells=judged.coverage["cells"])
    update_progress(db, run_id, 0.87, "evaluating")
    candidate, promote, reason = judged.candidate, judged.promote, judged.reason
    champion_metrics = judged.reference
    outcome = judged.outcome
    parent = references[0][0] if references else None
    model_metrics = {
        "validation": candidate, "champion_validation": champion_metrics,
        "reference_version": judged.reference_version,
        "operating_point": judged.operating_point.to_json(),
        "epochs_run": len(outcome.epochs), "steps": outcome.steps,
        "decision": reason, "run_id": run_id,
    }
    summary: dict[str, Any] = {
        "train": train.summary(names), "validation": validation.summary(names),
        "coverage": judged.coverage, "warm_start": parent is not None and retrain.warm_start,
    }
    net, loss_predictor = judged.network, judged.loss_predictor
    if judged.refit:
        model_metrics["refit"] = judged.refit
        summary["served_train"] = train.plus(validation).summary(names)
    entry = _register(settings, registry, net, loss_predictor, run_id, parent,
                      model_metrics, summary, judged.operating_point, judged.epistemic,
                      judged.judge)
    record_forgetting(db, run_id, judged.forgetting)
    update_progress(db, run_id, 0.9, "deciding", candidate_version=entry.version)
    run_metrics = {**outcome.summary(), "candidate": candidate, "champion": champion_metrics,
                   "decision": reason, "coverage": judged.coverage, "version": entry.version,
                   "seconds": time.monotonic() - started}
    event(log, "retrain_decision", run_id=run_id, version=entry.version, promote=promote,
          auroc=candidate["auroc"],
          champion_auroc=champion_metrics["auroc"] if champion_metrics else None)
    if not retrain.auto_promote:
        message = f"candidate {entry.version} awaits an admin: {reason}"
        with transaction(db):
            finish_run(db, run_id, "succeeded", message, run_metrics)
        return "succeeded"
    if not promote:
        registry.reject(entry.version, reason, also=lambda d: finish_or_abort(
            d, run_id, "rejected", f"{entry.version} rejected: {reason}", run_metrics))
        return "rejected"
    run_metrics["coverage_picks"] = _coverage_picks(settings, db, judged, run_id)
    registry.promote(entry.version, note=reason, also=lambda d: finish_or_abort(
        d, run_id, "promoted", f"{entry.version} promoted: {reason}", run_metrics))
    try:
        rescored = rescore_pending(db, registry.load(entry.version), settings)
        event(log, "retrain_rescored", run_id=run_id, items=rescored)
    except Exception as exc:  # the promotion stands; the queue keeps its old order
        event(log, "retrain_rescore_failed", logging.ERROR, run_id=run_id,
              error_type=type(exc).__name__)
    return "promoted"


ONE_SIDED_95 = 1.645


def _auroc_noise(net: TriageNet, reference: TriageNet, validation: LabeledSet) -> float:
    """1.645 DeLong standard errors of the paired AUROC difference on `validation`
    (0 when it cannot be estimated: a class with fewer than two studies)."""
    n = validation.num_studies
    labels = np.asarray(validation.study_labels) == 1
    scores = [study_probabilities(m, validation.images, validation.groups, n)[:, 1].numpy()
              for m in (net, reference)]
    _, se = paired_auroc_difference(scores[0], scores[1], labels)
    return ONE_SIDED_95 * se if math.isfinite(se) else 0.0


def _coverage_picks(settings: Settings, db: sqlite_utils.Database, judged: Judgement,
                    run_id: int) -> list[int]:  # fmt: skip
    """The coverage queries of a model about to be promoted, computed here in the worker
    process (embedding thousands of pool studies would stall the daemon's scoring thread);
    the scoring thread routes those still unlabelled within the gate's cap."""
    if not settings.gate.uses_scores or settings.retrain.coverage_queries < 1:
        return []
    try:
        checkpoint = judged.checkpoint(settings.model)
        return coverage_queries(db, checkpoint, settings, settings.retrain.coverage_queries)
    except Exception as exc:  # noqa: BLE001 - the promotion stands without queries
        event(log, "retrain_coverage_failed", logging.ERROR, run_id=run_id,
              error_type=type(exc).__name__)
        return []


def _initial_model(settings: Settings, champion: Checkpoint | None
                   ) -> tuple[TriageNet, LossPredictor]:
    if settings.retrain.warm_start and champion is not None:
        net = copy.deepcopy(champion.network)
        if champion.loss_predictor is not None:
            return net, copy.deepcopy(champion.loss_predictor)
        return net, build_loss_predictor(settings.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.model.training.seed)
        return build_network(settings.model), build_loss_predictor(settings.model)


def _references(registry: ModelRegistry, serving: ModelVersion | None, count: int,
                run_id: int) -> list[tuple[str, Checkpoint]]:
    """The serving model and up to ``count - 1`` promoted ancestors that still load."""
    out: list[tuple[str, Checkpoint]] = []
    entry = serving
    seen: set[str] = set()
    while entry is not None and len(out) < count and entry.version not in seen:
        seen.add(entry.version)
        if entry.promoted_at is not None:
            try:
                out.append((entry.version, registry.load(entry.version)))
            except ModelError as exc:
                event(log, "retrain_reference_unusable", logging.WARNING, run_id=run_id,
                      version=entry.version, error=str(exc))
        try:
            entry = registry.get(entry.parent) if entry.parent else None
        except ModelError:
            entry = None
    return out


def _register(
    settings: Settings, registry: ModelRegistry, net: TriageNet, loss_predictor: LossPredictor,
    run_id: int, parent: str | None, metrics: dict[str, Any], summary: dict[str, Any],
    operating_point: OperatingPoint, epistemic: EpistemicHead | None,
    judge: TriageNet | None = None,
) -> ModelVersion:
    folder = settings.path("models")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".retrain-{run_id}.pt"
    save_checkpoint(partial, net, loss_predictor, settings.model,
                    metadata={"run_id": run_id, "parent": parent,
                              "operating_point": operating_point.to_json()},
                    epistemic=epistemic, judge=judge)
    try:
        return registry.add(partial, source=f"retrain:{run_id}", parent=parent,
                            metrics=metrics, data_summary=summary)
    finally:
        partial.unlink(missing_ok=True)


