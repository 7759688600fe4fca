"""One retrain run, start to finish (runs inside the worker process).

1. Load the labelled studies: `train` and the fixed `validation` split.
2. Start from the serving model's weights (`retrain.warm_start`) or from scratch.
3. Rebalance: coverage weights of the training images in the serving model's embedding
   space (without a serving model there is no trained embedding: the raw set is used).
4. Train with early stopping on validation AUROC (`train_candidate`).
5. Evaluate candidate and serving model on the same, current validation set; register the
   candidate with its metrics, data summary and parent.
6. Promote (one transaction with the run's final row, then re-score the pending queue) or
   reject with the reason, per `triage.registry.promotion_decision`.

Any error leaves the serving model untouched; the worker marks the run `failed`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any

import sqlite_utils
import torch

from triage.db import transaction
from triage.logs import event
from triage.model.checkpoint import Checkpoint, save_checkpoint
from triage.model.lossnet import LossPredictor, build_loss_predictor
from triage.model.network import TriageNet, build_network
from triage.registry import ModelError, ModelRegistry, ModelVersion, promotion_decision
from triage.retrain.dataset import load_split
from triage.retrain.evaluate import embed, validation_metrics
from triage.retrain.queries import rescore_pending
from triage.retrain.runs import finish_run, update_progress
from triage.retrain.sampling import coverage_plan
from triage.retrain.train import TrainingFailed, train_candidate

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger("triage.retrain")

TRAIN_SHARE = 0.8  # progress from 0.05 to 0.85 is training


def run_retrain(settings: Settings, db: sqlite_utils.Database, run_id: int) -> str:
    """Run retrain `run_id` (a `running` row) to its final state; return that state.

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
    if train.num_studies < retrain.min_train_studies:
        raise TrainingFailed(f"too few labelled training studies: {train.num_studies} < "
                             f"retrain.min_train_studies {retrain.min_train_studies}")
    if validation.num_studies == 0:
        raise TrainingFailed("the validation set is empty")

    serving = registry.serving()
    champion: Checkpoint | None = None
    if serving is not None:
        try:
            champion = registry.load(serving.version)
        except ModelError as exc:
            event(log, "retrain_champion_unusable", logging.WARNING, run_id=run_id,
                  version=serving.version, error=str(exc))
    net, loss_predictor = _initial_model(settings, champion)

    plan, coverage = None, {"rebalanced": False}
    if retrain.rebalance and champion is not None:
        update_progress(db, run_id, 0.045, "core-set rebalancing")
        plan = coverage_plan(
            embed(champion.network, train.images), train.labels, names,
            n_cells=retrain.coverage_cells, power=retrain.coverage_power,
            seed=settings.model.training.seed,
        )
        coverage = {"rebalanced": True, **plan.to_json()}
        event(log, "retrain_coverage", run_id=run_id, radius=round(plan.radius, 4),
              cells=plan.n_cells)
    elif retrain.rebalance:
        coverage["why"] = "no serving model to embed with"

    def on_epoch(epoch: int, planned: int, record: dict[str, float]) -> None:
        message = (f"epoch {epoch + 1}/{planned}: loss {record['loss']:.4f}, "
                   f"val AUROC {record.get('val_auroc', float('nan')):.4f}")
        update_progress(db, run_id, 0.05 + TRAIN_SHARE * (epoch + 1) / planned, message)
        event(log, "retrain_epoch", run_id=run_id, epoch=epoch + 1, planned=planned,
              loss=round(record["loss"], 5), val_auroc=record.get("val_auroc"))

    outcome = train_candidate(net, loss_predictor, train, validation, settings.model, retrain,
                              plan, on_epoch)
    update_progress(db, run_id, 0.87, "evaluating")
    candidate = validation_metrics(net, validation.images, validation.groups,
                                   validation.study_labels)
    champion_metrics = None
    if champion is not None:
        champion_metrics = validation_metrics(champion.network, validation.images,
                                              validation.groups, validation.study_labels)
    promote, reason = promotion_decision(
        candidate, champion_metrics if champion is not None else None,
        retrain.promotion_tolerance,
    )
    parent = serving.version if serving is not None and champion is not None else None
    model_metrics = {
        "validation": candidate, "champion_validation": champion_metrics,
        "best_epoch": outcome.best_epoch, "epochs_run": len(outcome.epochs),
        "decision": reason, "run_id": run_id,
    }
    summary: dict[str, Any] = {
        "train": train.summary(names), "validation": validation.summary(names),
        "coverage": coverage, "warm_start": parent is not None and retrain.warm_start,
    }
    entry = _register(settings, registry, net, loss_predictor, run_id, parent,
                      model_metrics, summary)
    update_progress(db, run_id, 0.9, "deciding", candidate_version=entry.version)
    run_metrics = {**outcome.summary(), "candidate": candidate, "champion": champion_metrics,
                   "decision": reason, "coverage": coverage, "version": entry.version,
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
        registry.reject(entry.version, reason, also=lambda d: finish_run(
            d, run_id, "rejected", f"{entry.version} rejected: {reason}", run_metrics))
        return "rejected"
    registry.promote(entry.version, note=reason, also=lambda d: finish_run(
        d, run_id, "promoted", f"{entry.version} promoted: {reason}", run_metrics))
    try:
        rescored = rescore_pending(db, registry.load(entry.version), settings)
        event(log, "retrain_rescored", run_id=run_id, items=rescored)
    except Exception as exc:  # the promotion stands; the queue keeps its old order
        event(log, "retrain_rescore_failed", logging.ERROR, run_id=run_id,
              error_type=type(exc).__name__)
    return "promoted"


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


def _register(
    settings: Settings, registry: ModelRegistry, net: TriageNet, loss_predictor: LossPredictor,
    run_id: int, parent: str | None, metrics: dict[str, Any], summary: dict[str, Any],
) -> ModelVersion:
    folder = settings.path("models")
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".retrain-{run_id}.pt"
    save_checkpoint(partial, net, loss_predictor, settings.model,
                    metadata={"run_id": run_id, "parent": parent})
    try:
        return registry.add(partial, source=f"retrain:{run_id}", parent=parent,
                            metrics=metrics, data_summary=summary)
    finally:
        partial.unlink(missing_ok=True)


