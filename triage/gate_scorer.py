"""Score a complete study with the serving model and ask the gate whether it needs a label.

Without a usable serving model the gate routes studies as ``cold_start`` up to the daily
cap. The serving version is read before every study, so a promotion takes effect at the
next study. MC-dropout masks are seeded by (study id, round): the same study scored by
the same model gives the same numbers, so a decision can be explained and replayed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import sqlite_utils

from triage.config import Settings
from triage.db import transaction
from triage.gate import BudgetGate, Decision
from triage.logs import event
from triage.metrics import Metrics
from triage.model.checkpoint import Checkpoint
from triage.model.inference import StudyResult, score_study
from triage.queue import enqueue
from triage.registry import ModelError, ModelRegistry
from triage.retrain.queries import coverage_queries
from triage.scoring import ScoreResult, StudyToScore

log = logging.getLogger("triage.gate")


class GateScorer:
    """The daemon's scorer: model inference, acquisition scores, the budget gate."""

    def __init__(
        self,
        settings: Settings,
        db: sqlite_utils.Database,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._registry = ModelRegistry(db, settings.path("models"), settings.model)
        self._db = db
        self._gate = BudgetGate.restore(settings.gate, _recent_decisions(db, settings, clock()))
        for (routed_at,) in db.execute(
            "SELECT routed_at FROM queue_items WHERE reason = 'coverage' AND routed_at >= ?",
            [clock() - 2 * 86400],
        ).fetchall():
            # after a restart only the cap is known to be used; the budget offset is not
            day = self._gate.day_of(datetime.fromtimestamp(routed_at, UTC))
            self._gate.note_routed(day, 1, against_budget=False)
        self._model: tuple[str, Checkpoint] | None = None
        self._broken: str | None = None
        metrics.gate_label_rate_target.set(settings.gate.label_rate)

    def score(self, study: StudyToScore) -> ScoreResult:
        checkpoint, version = self._serving_model()
        result: StudyResult | None = None
        scores = None
        if checkpoint is not None:
            result = score_study(
                checkpoint.network, checkpoint.loss_predictor, study.images,
                self._settings.model, seed=study.study_id * 1009 + study.round,
            )
            for stage, seconds in result.durations.items():
                self._metrics.inference_seconds.labels(stage).observe(seconds)
            scores = self._gate.acquisition.components(result)
        decision = self._gate.decide(scores, datetime.fromtimestamp(self._clock(), tz=UTC))
        row = _decision_row(decision, result, version, self._settings.model.labels)
        status = "routed" if decision.needs_label else "not_routed"
        detail = {"reason": decision.reason}
        if result is not None:
            detail["predicted"] = self._settings.model.labels[result.predicted_index]
        return ScoreResult(status, version, detail, decision_row=row, pending=decision)

    def commit(self, result: ScoreResult) -> None:
        """Called after the decision is stored: the gate's state moves on."""
        decision: Decision = result.pending
        self._gate.commit(decision)
        self._metrics.gate_decisions.labels(decision.reason).inc()
        if decision.threshold is not None:
            self._metrics.gate_threshold.set(decision.threshold)
        realised = self._gate.realised_rate()
        if realised is not None:
            self._metrics.gate_routed_fraction.set(realised)

    def route_coverage(self) -> int:
        """After each promoted retrain, route the studies farthest from every labelled one.

        At most ``retrain.coverage_queries`` per run and never beyond today's cap; they
        count against the cap like the gate's own routes. Returns how many were routed.
        """
        runs = self._db.execute(
            "SELECT id FROM retrain_runs WHERE state = 'promoted' AND coverage_routed IS NULL "
            "ORDER BY id"
        ).fetchall()
        if not runs:
            return 0
        now = self._clock()
        day = self._gate.day_of(datetime.fromtimestamp(now, UTC))
        checkpoint, version = self._serving_model()
        budget = min(self._settings.retrain.coverage_queries, self._gate.remaining_on(day))
        picked = []
        if checkpoint is not None and budget > 0:
            picked = coverage_queries(self._db, checkpoint, self._settings, budget)
        with transaction(self._db):
            for rank, study_id in enumerate(picked):
                latest = self._db.execute(
                    "SELECT id FROM decisions WHERE study_id = ? ORDER BY id DESC LIMIT 1",
                    [study_id],
                ).fetchone()
                # farthest first: priorities from 1 down, above most gate scores
                enqueue(self._db, study_id=study_id, decision_id=int(latest[0]),
                        reason="coverage", combined=1.0 - rank / (2 * len(picked)), now=now)
            for (run_id,) in runs:
                self._db.execute("UPDATE retrain_runs SET coverage_routed = ? WHERE id = ?",
                                 [len(picked) if run_id == runs[-1][0] else 0, run_id])
        self._gate.note_routed(day, len(picked))
        if picked:
            self._metrics.gate_decisions.labels("coverage").inc(len(picked))
        event(log, "coverage_routed", studies=len(picked), budget=budget, model=version)
        return len(picked)

    def _serving_model(self) -> tuple[Checkpoint | None, str | None]:
        serving = self._registry.serving()
        if serving is None:
            return None, None
        if self._model is not None and self._model[0] == serving.version:
            return self._model[1], serving.version
        if self._broken == serving.version:
            return None, None
        try:
            checkpoint = self._registry.load(serving.version)
        except ModelError as exc:
            self._broken = serving.version
            event(log, "model_unavailable", logging.ERROR, version=serving.version,
                  error=str(exc))
            return None, None
        self._model = (serving.version, checkpoint)
        event(log, "model_loaded", version=serving.version)
        return checkpoint, serving.version


def _decision_row(
    decision: Decision, result: StudyResult | None, version: str | None, labels: list[str]
) -> dict[str, Any]:
    prediction = None
    if result is not None:
        prediction = {"probabilities": dict(zip(labels, result.probs, strict=True)),
                      "label": labels[result.predicted_index]}
    return {
        "sequence": decision.sequence,
        "model_version": version,
        "strategy": decision.strategy,
        "needs_label": int(decision.needs_label),
        "reason": decision.reason,
        "combined": decision.combined,
        "threshold": decision.threshold,
        "scores": _json(decision.scores),
        "quantiles": _json(decision.quantiles),
        "prediction": _json(prediction),
        "uncertainty": _json(result.uncertainty if result else None),
        "predicted_loss": result.predicted_loss if result else None,
        "images_scored": result.num_images if result else None,
        "images_total": result.num_images_total if result else None,
        "decision": json.dumps(decision.to_dict()),
    }


def _json(value: object) -> str | None:
    return json.dumps(value) if value is not None else None


def _recent_decisions(db: sqlite_utils.Database, settings: Settings, now: float) -> list[Decision]:
    """Enough stored decisions, oldest first, to rebuild the gate after a restart: the
    last two windows' worth and everything from the last two days (the cap's day)."""
    rows = db.execute(
        "SELECT decision FROM decisions WHERE id >= (SELECT COALESCE(MIN(id), 0) FROM "
        "(SELECT id FROM decisions ORDER BY id DESC LIMIT ?)) OR created_at >= ? ORDER BY id",
        [2 * settings.gate.window, now - 2 * 86400],
    ).fetchall()
    return [Decision.from_dict(json.loads(row[0])) for row in rows]
