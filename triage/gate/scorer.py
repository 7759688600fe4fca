"""Score a complete study with the serving model and ask the gate whether it needs a label.

Scoring: the serving version is read before every study, so a promotion takes effect at
the next study. MC-dropout masks are seeded by (study id, round): the same study scored
by the same model gives the same numbers, so a decision can be explained and replayed.
Predictions are made at the model's operating point (`Checkpoint.operating_point`).

Window rescoring: the gate ranks a study's raw scores against its window of recent
studies, and a new model's raw scores have a scale of their own (the predicted loss has
no fixed scale at all). So when the serving version differs from the one that scored
the window (a promotion, a rollback, the first model, or a restart whose window mixes
versions), the window's studies are scored again with the serving model before the
next decision (`BudgetGate.rescore`; event `gate_window_rescored`, histogram
`triage_gate_rescore_seconds`). Studies whose images cannot be loaded or scored are
left out of the window. This costs one inference per window study, once per change.

No loss predictor: a model without one gives no predicted loss; the uncertainty stands
in for it (`Strategy.components_with_fallback`), so such a model ranks by
uncertainty alone instead of failing every study. The first such study of a version
logs a WARNING event `gate_fallback_uncertainty`; the counter
`triage_gate_fallback_total{reason="no_loss_predictor"}` counts the studies. The same
for a strategy that scores the study's embedding (`badge`, `emoc`, `alfa_mix`) and a
model without an epistemic head: reason `no_epistemic_head`.

Degraded serving (`triage.model.serving.ServingLoader`): when the serving checkpoint cannot be
loaded, the most recently promoted version that loads serves instead; when none loads,
`score` raises `ModelUnavailable` and the study waits (`waiting_model`) until one does.

Out-of-distribution flag: a model whose feature density has a flag threshold
(`triage.model.epistemic`) flags a study whose `ood` score is above it as unlike the
training data. The flag is stored beside `ood` in the decision's `uncertainty` JSON
(`ood_flag`: true, false, or null when the model has no threshold), and in the study
result's detail, counted by `triage_studies_ood_flagged_total` and logged with the
study's `study_scored` event. It is for the reader (the review API shows it as
`unlike_training_data`); it never changes routing.

Online choice (`gate.strategy: auto`): before each scored study the mix among the
candidates is recomputed from the labelled audits when one has come back or been
corrected since (`triage.gate.queries.audit_outcomes`; event `gate_mix_updated`, gauge
`triage_gate_auto_mix{strategy}`). The mix is a function of the store, so a restart
resumes it.

Batches (`gate.budget_manager: batch`): a scored study is not decided on arrival but
waits, state `batched`, in the store's `gate_buffer` (its scores, batch embedding and
result columns, written by the worker in the transaction that scores it). `flush_due`,
asked by the worker before each study and after each buffered one, decides the buffer
together (`BudgetGate.decide_batch`) when it holds `gate.batch_size` studies or its
oldest has waited `gate.batch_seconds`, and before a study is scored by another model
than the buffer's; each study then gets its result and decision in one transaction, as
if decided alone (event `gate_batch_decided`, metrics `triage_gate_batches_total`,
`triage_gate_batch_wait_seconds`, `triage_gate_batch_pending`). The buffer survives a
restart; one left by a configuration without batching goes back to `complete` and is
scored again (event `gate_batch_requeued`).

Cold start: while no version was ever promoted, `triage.gate.coldstart.ColdStartSelector` chooses
the studies to route, at `gate.label_rate` and for coverage of the stream (farthest
first on a label-free thumbnail embedding); the gate routes them as `cold_start` within
the daily cap and skips the others as `not_sampled`. The study's novelty is stored as
the decision's scores (`{"novelty": x}`). After a restart the selector is rebuilt, when
first needed, from the stored cold-start decisions (those without a model version):
their novelty and outcome, and the embeddings of the routed studies, recomputed from
their images.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import sqlite_utils
import torch

from triage.gate import NOVELTY, BatchEntry, BudgetGate, Decision
from triage.gate.coldstart import ColdStartSelector, coldstart_embedding
from triage.gate.queries import audit_outcomes, audit_signature, coverage_queries
from triage.gate.worker import ScoreResult, StudyToScore, store_decided
from triage.model.checkpoint import Checkpoint
from triage.model.inference import StudyResult, score_study
from triage.model.registry import ModelRegistry
from triage.model.serving import ModelUnavailable, ServingLoader
from triage.review.queue import enqueue
from triage.store.db import transaction
from triage.store.images import load_study_images
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from triage.config import Settings

log = logging.getLogger("triage.gate")


@dataclass(frozen=True)
class _Pending:
    """What `commit` needs: the decision, and a cold-start study's embedding; `redo`
    decides the study again from the gate's current state (`settle`)."""

    decision: Decision
    embedding: np.ndarray | None = None
    ood_flag: bool | None = None
    redo: Callable[[], ScoreResult] | None = None


@dataclass(frozen=True)
class _Buffered:
    """A scored study waiting for its batch, as its `gate_buffer` row keeps it.

    Attributes:
        study_id: The study.
        round: Its round when scored.
        version: The model that scored it.
        scored_at: When it was scored (the batch's age counts from the oldest).
        scores: Its raw component scores.
        embedding: Its batch embedding (`Strategy.batch_embedding`), or None.
        detail: Its result's detail, without the decision's reason.
        columns: Its decision row's columns that the result gives (`_result_columns`).
    """

    study_id: int
    round: int
    version: str
    scored_at: float
    scores: dict[str, float]
    embedding: np.ndarray | None
    detail: dict[str, Any]
    columns: dict[str, Any]

    def row(self) -> dict[str, Any]:
        """Its `gate_buffer` columns, less the study and round the worker adds."""
        return {"model_version": self.version, "scored_at": self.scored_at,
                "scores": json.dumps(self.scores),
                "embedding": None if self.embedding is None else self.embedding.tobytes(),
                "result": json.dumps({"detail": self.detail, "columns": self.columns})}

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> _Buffered:
        """Inverse of `row`, from (study_id, round, model_version, scored_at, scores,
        embedding, result)."""
        study_id, round_, version, scored_at, scores, embedding, result = row
        stored = json.loads(result)
        vector = (None if embedding is None
                  else np.frombuffer(bytes(embedding), dtype=np.float32).copy())
        return cls(int(study_id), int(round_), str(version), float(scored_at),
                   json.loads(scores), vector, stored["detail"], stored["columns"])


class GateScorer:
    """The daemon's scorer: model inference, acquisition scores, the budget gate."""

    def __init__(
        self,
        settings: Settings,
        db: sqlite_utils.Database,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        replica: str = "local",
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._replica = replica  # the `gate_buffer` rows this scorer owns
        self._registry = ModelRegistry(db, settings.path("models"), settings.model)
        self._db = db
        # the last decision and coverage route the gate has seen (`_observe_others`)
        self._seen_decision = int(db.execute(
            "SELECT COALESCE(MAX(id), 0) FROM decisions").fetchone()[0])
        self._seen_coverage = _last_coverage_id(db)
        recent = _recent_decisions(db, settings, clock())
        self._gate = BudgetGate.restore(settings.gate, [decision for decision, _ in recent],
                                        pending_offset=_pending_offset(db))
        # the model that scored the window; None (unknown or mixed) rescores it
        self._window_version = _window_version(self._gate, recent, settings.gate.window)
        for (routed_at,) in db.execute(
            "SELECT routed_at FROM queue_items WHERE reason = 'coverage' AND routed_at >= ?",
            [clock() - 2 * 86400],
        ).fetchall():
            # the cap's share; the budget offset still pending is restored above
            day = self._gate.day_of(datetime.fromtimestamp(routed_at, UTC))
            self._gate.note_routed(day, 1, against_budget=False)
        self._serving = ServingLoader(db, self._registry, metrics, clock)
        self._buffer: list[_Buffered] = self._restore_buffer()
        self._selector: ColdStartSelector | None = None  # built when first needed
        self._fallback_logged: set[str] = set()
        self._audits_seen: tuple[int, int] | None = None  # `auto`: audits the mix counts
        metrics.gate_label_rate_target.set(settings.gate.label_rate)

    @property
    def gate(self) -> BudgetGate:
        """The budget gate (read it; `score` and `commit` change it)."""
        return self._gate

    def ready(self) -> bool:
        """Whether a study can be decided now: a model loads, or none was ever promoted
        (cold start). Asked by the worker before each study; refreshes the serving state
        and `triage_serving_model_ok`."""
        try:
            self._serving.resolve()
        except ModelUnavailable:
            return False
        return True

    def score(self, study: StudyToScore) -> ScoreResult:
        """Decide for one study (the gate moves on at `commit`).

        With a serving model the study is scored and the gate decides on its scores,
        after the window is rescored if the model changed; while none was ever promoted
        the cold-start selector chooses.

        Raises:
            ModelUnavailable: Models were promoted but none loads (the study waits).
        """
        checkpoint, version = self._serving_model()
        clock = self._clock()
        now = datetime.fromtimestamp(clock, tz=UTC)
        if checkpoint is None or version is None:
            return self._score_cold_start(study, now)
        if self._buffer and self._buffer[0].version != version:
            self._flush("model")  # the buffer's scores are the old model's: decide them
        if version != self._window_version:
            self._rescore_window(checkpoint, version)
        result = self._score_images(checkpoint, study.images, study.study_id, study.round)
        for stage, seconds in result.durations.items():
            self._metrics.inference_seconds.labels(stage).observe(seconds)
        scores = self._components(result, version, count=True)
        ood_flag = (checkpoint.epistemic.unlike_training(result.ood)
                    if checkpoint.epistemic is not None else None)
        columns = _result_columns(result, version, self._settings.model.labels, ood_flag)
        detail = {"predicted": self._settings.model.labels[result.predicted_index],
                  "ood_flag": ood_flag}
        if self._gate.manager.buffered:  # decided with its batch (`flush_due`)
            entry = _Buffered(study.study_id, study.round, version, clock, scores,
                              self._gate.strategy.batch_embedding(result), detail, columns)
            return ScoreResult("batched", version, detail, pending=entry,
                               buffer_row={**entry.row(), "replica": self._replica})

        def decide() -> ScoreResult:
            if self._gate.mix is not None:
                self._refresh_mix()
            decision = self._gate.decide(scores, now, key=study.study_id)
            status = "routed" if decision.needs_label else "not_routed"
            return ScoreResult(status, version, {"reason": decision.reason, **detail},
                               decision_row={**_decision_columns(decision), **columns},
                               pending=_Pending(decision, ood_flag=ood_flag, redo=decide))

        return decide()

    def settle(self, result: ScoreResult) -> ScoreResult:
        """Called by the worker inside the transaction that stores `result`, holding the
        store's write lock: when other replicas decided meanwhile, the gate observes
        their decisions and the study is decided again from that state, so replicas
        share one budget, window and sequence. Alone on its store, the result stands."""
        pending = result.pending
        if not isinstance(pending, _Pending) or pending.redo is None:
            return result
        if not self._observe_others():
            return result
        settled = pending.redo()
        event(log, "gate_decision_settled", sequence=settled.pending.decision.sequence,
              was=pending.decision.sequence)
        return settled

    def _observe_others(self) -> bool:
        """The gate observes what other replicas on this store stored since it last
        looked: their decisions (in id order; its own are behind its sequence already),
        their coverage routes, and the pending budget offset they leave. Call holding
        the store's write lock. Returns whether there was any."""
        rows = self._db.execute(
            "SELECT id, decision, model_version, study_id FROM decisions WHERE id > ? "
            "ORDER BY id", [self._seen_decision],
        ).fetchall()
        others = 0
        for row_id, stored, version, study_id in rows:
            self._seen_decision = int(row_id)
            decision = Decision.from_dict(json.loads(stored))
            if decision.sequence < self._gate.sequence:
                continue  # this scorer's own, committed already
            if decision.key is None:
                decision = replace(decision, key=int(study_id))
            self._gate.observe(decision)
            if self._gate.enters_window(decision) and version != self._window_version:
                self._window_version = None  # mixed scales: rescored before the next study
            others += 1
        routes = self._db.execute(
            "SELECT id, routed_at FROM queue_items WHERE reason = 'coverage' AND id > ? "
            "ORDER BY id", [self._seen_coverage],
        ).fetchall()
        for row_id, routed_at in routes:
            self._seen_coverage = int(row_id)
            day = self._gate.day_of(datetime.fromtimestamp(routed_at, UTC))
            self._gate.note_routed(day, 1, against_budget=False)
        if others or routes:
            self._gate.set_pending_offset(_pending_offset(self._db))
        return bool(others or routes)

    def commit(self, result: ScoreResult) -> None:
        """Called after the decision (or the study's buffer row) is stored: the gate's
        state (or the buffer) moves on."""
        pending = result.pending
        if isinstance(pending, _Buffered):
            self._buffer.append(pending)
            self._metrics.gate_batch_pending.set(len(self._buffer))
            if pending.detail.get("ood_flag"):
                self._metrics.ood_flagged.inc()
            return
        decision = pending.decision
        self._committed(decision)
        if pending.embedding is not None and self._selector is not None:
            novelty = decision.scores[NOVELTY] if decision.scores else None
            self._selector.record(pending.embedding, decision.reason, novelty=novelty)
        if pending.ood_flag:
            self._metrics.ood_flagged.inc()

    def _committed(self, decision: Decision) -> None:
        """A stored decision: the gate moves on, and its metrics."""
        self._gate.commit(decision)
        self._metrics.gate_decisions.labels(decision.reason).inc()
        if decision.threshold is not None:
            self._metrics.gate_threshold.set(decision.threshold)
        realised = self._gate.realised_rate()
        if realised is not None:
            self._metrics.gate_routed_fraction.set(realised)

    @property
    def batch_pending(self) -> int:
        """Scored studies waiting for their batch."""
        return len(self._buffer)

    def flush_due(self) -> int:
        """Decide the waiting batch when it is due (`BudgetGate.batch_due`: full, or its
        oldest study waited `gate.batch_seconds`); returns how many studies were decided."""
        if not self._buffer:
            return 0
        trigger = self._gate.batch_due(len(self._buffer), self._buffer[0].scored_at,
                                       self._clock())
        return self._flush(trigger) if trigger is not None else 0

    def _flush(self, trigger: str) -> int:
        """Decide every buffered study together and store each result and decision (one
        transaction; a study reopened meanwhile keeps its new state, as when decided
        alone), then commit the decisions to the gate."""
        buffer, now = self._buffer, self._clock()
        with transaction(self._db):
            self._observe_others()  # decided from the budget shared with other replicas
            decisions = self._gate.decide_batch(
                [BatchEntry(b.scores, b.study_id, b.embedding) for b in buffer],
                datetime.fromtimestamp(now, tz=UTC),
            )
            for entry, decision in zip(buffer, decisions, strict=True):
                waited = round(now - entry.scored_at, 3)
                result = ScoreResult(
                    "routed" if decision.needs_label else "not_routed", entry.version,
                    {"reason": decision.reason, **entry.detail, "batch_wait_seconds": waited},
                    decision_row={**_decision_columns(decision), **entry.columns},
                )  # fmt: skip
                store_decided(self._db, entry.study_id, entry.round, result, now)
                self._db.execute(
                    "UPDATE studies SET state = 'scored' WHERE id = ? AND state = 'batched' "
                    "AND round = ?", [entry.study_id, entry.round],
                )
                self._db.execute("DELETE FROM gate_buffer WHERE study_id = ? AND round = ?",
                                 [entry.study_id, entry.round])
        self._buffer = []
        for entry, decision in zip(buffer, decisions, strict=True):
            self._committed(decision)
            self._metrics.gate_batch_wait_seconds.observe(max(0.0, now - entry.scored_at))
        self._metrics.gate_batches.labels(trigger).inc()
        self._metrics.gate_batch_pending.set(0)
        event(log, "gate_batch_decided", trigger=trigger, studies=len(buffer),
              routed=sum(d.needs_label for d in decisions),
              audits=sum(d.reason == "audit" for d in decisions),
              longest_wait_seconds=round(max(now - b.scored_at for b in buffer), 3))
        return len(buffer)

    def _restore_buffer(self) -> list[_Buffered]:
        """The studies left waiting for their batch by the last run, oldest first.

        Under a configuration without batching they (and any `batched` study without a
        buffer row) go back to `complete`, to be scored and decided again.
        """
        mine = "(replica = ? OR replica IS NULL)"  # NULL: written before replicas
        rows = self._db.execute(
            "SELECT study_id, round, model_version, scored_at, scores, embedding, result "
            f"FROM gate_buffer WHERE {mine} ORDER BY id", [self._replica],
        ).fetchall()
        buffered = self._gate.manager.buffered
        requeued = 0
        if rows or self._db.execute(
            "SELECT 1 FROM studies WHERE state = 'batched' LIMIT 1"
        ).fetchone() is not None:  # the usual case, nothing batched: no write lock taken
            with transaction(self._db):
                if not buffered:
                    self._db.execute(f"DELETE FROM gate_buffer WHERE {mine}", [self._replica])
                else:
                    self._db.execute("UPDATE gate_buffer SET replica = ? WHERE replica IS NULL",
                                     [self._replica])
                requeued = self._db.execute(
                    "UPDATE studies SET state = 'complete' WHERE state = 'batched' AND NOT "
                    "EXISTS (SELECT 1 FROM gate_buffer b WHERE b.study_id = studies.id "
                    "AND b.round = studies.round)"
                ).rowcount
        if requeued:
            event(log, "gate_batch_requeued", logging.WARNING, studies=requeued,
                  manager=self._gate.manager.name)
        entries = [_Buffered.from_row(tuple(row)) for row in rows] if buffered else []
        self._metrics.gate_batch_pending.set(len(entries))
        if entries:
            event(log, "gate_batch_restored", studies=len(entries))
        return entries

    def _refresh_mix(self) -> None:
        """`auto`: recompute the mix from the labelled audits when one arrived or was
        corrected since the last study (`audit_outcomes`), and publish it."""
        seen = audit_signature(self._db)
        if seen == self._audits_seen:
            return
        mix = self._gate.strategy.mix(audit_outcomes(self._db, self._settings.model.labels))
        self._gate.set_mix(mix)
        self._audits_seen = seen
        for name, p in mix.items():
            self._metrics.gate_auto_mix.labels(name).set(p)
        event(log, "gate_mix_updated", audits=seen[0],
              mix={name: round(p, 4) for name, p in mix.items()})

    def _score_cold_start(self, study: StudyToScore, now: datetime) -> ScoreResult:
        """No usable model: the cold-start selector chooses, within the gate's cap."""
        selector = self._cold_start_selector()
        embedding = coldstart_embedding(study.images)
        novelty = selector.value(embedding)  # typicality-weighted when configured

        def decide() -> ScoreResult:
            wanted = selector.wants(embedding, self._gate.sequence)
            decision = self._gate.decide(
                None, now, key=study.study_id, cold_start=wanted, novelty=novelty
            )
            row = {**_decision_columns(decision),
                   **_result_columns(None, None, self._settings.model.labels)}
            status = "routed" if decision.needs_label else "not_routed"
            return ScoreResult(status, None, {"reason": decision.reason}, decision_row=row,
                               pending=_Pending(decision, embedding, redo=decide))

        return decide()

    def _score_images(
        self, checkpoint: Checkpoint, images: torch.Tensor, study_id: int, round_: int
    ) -> StudyResult:
        return score_study(
            checkpoint.network, checkpoint.loss_predictor, images, self._settings.model,
            seed=study_id * 1009 + round_, operating_point=checkpoint.operating_point,
            epistemic=checkpoint.epistemic,
        )  # fmt: skip

    def _components(self, result: StudyResult, version: str, *, count: bool) -> dict[str, float]:
        """The gate's raw scores of a result; the uncertainty stands in for a missing
        predicted loss (counted when ``count``, logged once per model version)."""
        strategy = self._gate.strategy
        scores, fallback = strategy.components_with_fallback(result)
        if fallback is not None:
            if count:
                self._metrics.gate_fallback.labels(fallback).inc()
            if version not in self._fallback_logged:
                self._fallback_logged.add(version)
                event(log, "gate_fallback_uncertainty", logging.WARNING, model=version,
                      reason=fallback, measure=strategy.fallback_measure)
        return scores

    def _rescore_window(self, checkpoint: Checkpoint, version: str) -> None:
        """Score the window's studies again with the serving model (see module doc)."""
        start = time.perf_counter()
        previous = self._window_version
        entries = self._gate.window_filled
        studies = list(dict.fromkeys(self._gate.window_keys()))  # unique, oldest first
        fresh: dict[int, dict[str, float]] = {}
        if self._gate.manager.uses_scores:
            for study_id in studies:
                scores = self._rescore_study(checkpoint, version, study_id)
                if scores is not None:
                    fresh[study_id] = scores
        else:  # the random strategy ranks nothing: keep the window's entries as they are
            fresh = {study_id: {} for study_id in studies}
        kept = self._gate.rescore(fresh)
        self._window_version = version
        seconds = time.perf_counter() - start
        self._metrics.gate_rescore_seconds.observe(seconds)
        event(log, "gate_window_rescored", model=version, previous=previous, entries=entries,
              studies=len(studies), rescored=len(fresh), failed=len(studies) - len(fresh),
              kept=kept, seconds=round(seconds, 3))

    def _rescore_study(
        self, checkpoint: Checkpoint, version: str, study_id: int
    ) -> dict[str, float] | None:
        """One window study's raw scores under the serving model; None if it cannot be
        loaded or scored (it then leaves the window)."""
        try:
            row = self._db.execute("SELECT round FROM studies WHERE id = ?", [study_id]).fetchone()
            if row is None:
                return None
            images = load_study_images(self._db, study_id)
            result = self._score_images(checkpoint, images, study_id, int(row[0]))
            scores = self._components(result, version, count=False)
        except Exception:  # noqa: BLE001 - a study that cannot be scored leaves the window
            return None
        return scores if all(math.isfinite(v) for v in scores.values()) else None

    def _cold_start_selector(self) -> ColdStartSelector:
        if self._selector is None:
            self._selector = self._rebuild_selector()
        return self._selector

    def _rebuild_selector(self) -> ColdStartSelector:
        """The selector as the stored cold-start decisions (no model version) left it.

        The last ``window`` of them are replayed with their stored novelty and outcome
        (only whether ``warmup`` <= ``window`` studies were seen matters, so older ones
        need not be counted); every routed one adds its embedding, recomputed from the
        study's current images (with `gate.cold_start_neighbours`, every one of the
        window's studies, whose embeddings the typicality is measured among). Decisions
        stored before the selector have no novelty: their routed studies only join the
        routed set.
        """
        gate = self._settings.gate
        selector = ColdStartSelector(max(self._gate.score_rate, 1e-6), gate.seed,
                                     window=gate.window,
                                     warmup=gate.warmup, feedback_gain=gate.feedback_gain,
                                     typical_neighbours=gate.cold_start_neighbours)
        recent = self._db.execute(
            "SELECT id, study_id, needs_label, reason, scores FROM decisions "
            "WHERE model_version IS NULL ORDER BY id DESC LIMIT ?",
            [gate.window],
        ).fetchall()[::-1]
        older = self._db.execute(
            "SELECT study_id FROM decisions WHERE model_version IS NULL AND needs_label = 1 "
            "AND id < ? ORDER BY id",
            [recent[0][0] if recent else 0],
        ).fetchall()
        for (study_id,) in older:
            embedding = self._stored_embedding(study_id)
            if embedding is not None:
                selector.add_selected(embedding)
        for _, study_id, needs_label, reason, scores in recent:
            novelty = json.loads(scores).get(NOVELTY) if scores else None
            # typicality needs every recent study's embedding, coverage the routed ones
            wanted = needs_label or selector.typical_neighbours
            embedding = self._stored_embedding(study_id) if wanted else None
            if novelty is None:
                if embedding is not None:
                    selector.add_selected(embedding)
                continue
            selector.record(embedding, reason, novelty=float(novelty))
        event(log, "cold_start_selector_restored", seen=selector.seen,
              selected=selector.selected)
        return selector

    def _stored_embedding(self, study_id: int) -> np.ndarray | None:
        try:
            return coldstart_embedding(load_study_images(self._db, study_id))
        except Exception:  # noqa: BLE001 - no usable image left: the study is left out
            return None

    def route_coverage(self) -> int:
        """After each promoted retrain, route the studies farthest from every labelled one.

        At most ``retrain.coverage_queries`` per run and never beyond today's cap; they
        count against the cap like the gate's own routes. Returns how many were routed.
        """
        runs = self._db.execute(
            "SELECT id, metrics FROM retrain_runs WHERE state = 'promoted' "
            "AND coverage_routed IS NULL ORDER BY id"
        ).fetchall()
        if not runs:
            return 0
        now = self._clock()
        day = self._gate.day_of(datetime.fromtimestamp(now, UTC))
        try:
            checkpoint, version = self._serving_model()
        except ModelUnavailable:  # the worker's precomputed picks need no model
            checkpoint, version = None, None
        budget = min(self._settings.retrain.coverage_queries, self._gate.remaining_on(day))
        if not self._gate.manager.uses_scores:  # the random baseline stays a coin
            budget = 0
        picked: list[int] = []
        precomputed = json.loads(runs[-1][1] or "{}").get("coverage_picks")
        if budget > 0 and precomputed is not None:
            # chosen by the retrain worker, off this thread: keep those still unlabelled
            # and not queued, farthest first
            picked = [int(i) for i in precomputed if self._still_unlabelled(int(i))][:budget]
        elif checkpoint is not None and budget > 0:  # runs recorded before the worker did
            picked = coverage_queries(self._db, checkpoint, self._settings, budget)
        with transaction(self._db):
            # another replica may have routed these runs' queries meanwhile, or spent
            # today's cap: decide again under the write lock
            self._observe_others()
            if self._db.execute(
                "SELECT 1 FROM retrain_runs WHERE id = ? AND coverage_routed IS NULL",
                [runs[-1][0]],
            ).fetchone() is None:
                return 0
            budget = min(budget, self._gate.remaining_on(day))
            picked = [i for i in picked if self._still_unlabelled(i)][:budget]
            for rank, study_id in enumerate(picked):
                latest = self._db.execute(
                    "SELECT id FROM decisions WHERE study_id = ? ORDER BY id DESC LIMIT 1",
                    [study_id],
                ).fetchone()
                # farthest first: priorities from 1 down, above most gate scores
                enqueue(self._db, study_id=study_id, decision_id=int(latest[0]),
                        reason="coverage", combined=1.0 - rank / (2 * len(picked)), now=now)
            for run_id, _ in runs:
                self._db.execute("UPDATE retrain_runs SET coverage_routed = ? WHERE id = ?",
                                 [len(picked) if run_id == runs[-1][0] else 0, run_id])
            self._seen_coverage = _last_coverage_id(self._db)  # its own: noted below
        self._gate.note_routed(day, len(picked))
        if picked:
            self._metrics.gate_decisions.labels("coverage").inc(len(picked))
        event(log, "coverage_routed", studies=len(picked), budget=budget, model=version)
        return len(picked)

    def _still_unlabelled(self, study_id: int) -> bool:
        return self._db.execute(
            "SELECT 1 FROM studies s WHERE s.id = ? AND s.state = 'scored' "
            "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.study_id = s.id) "
            "AND NOT EXISTS (SELECT 1 FROM queue_items q WHERE q.study_id = s.id)",
            [study_id],
        ).fetchone() is not None

    def _serving_model(self) -> tuple[Checkpoint | None, str | None]:
        """The checkpoint and version to score with; (None, None) in cold start only.

        Raises:
            ModelUnavailable: Models were promoted but none loads.
        """
        served = self._serving.resolve()
        if served is None:
            return None, None
        version, checkpoint = served
        return checkpoint, version


def _decision_columns(decision: Decision) -> dict[str, Any]:
    """The `decisions` row's columns that the gate's decision gives."""
    return {
        "sequence": decision.sequence,
        "strategy": decision.strategy,
        "needs_label": int(decision.needs_label),
        "reason": decision.reason,
        "combined": decision.combined,
        "threshold": decision.threshold,
        "scores": _json(decision.scores),
        "quantiles": _json(decision.quantiles),
        "decision": json.dumps(decision.to_dict()),
    }


def _result_columns(
    result: StudyResult | None, version: str | None, labels: list[str],
    ood_flag: bool | None = None,
) -> dict[str, Any]:
    """The `decisions` row's columns that the scored result gives (JSON-compatible: a
    batched study keeps them in its buffer row)."""
    prediction = None
    if result is not None:
        prediction = {"probabilities": dict(zip(labels, result.probs, strict=True)),
                      "label": labels[result.predicted_index]}
    return {
        "model_version": version,
        "prediction": _json(prediction),
        "uncertainty": _json(_uncertainty(result, ood_flag)),
        "predicted_loss": result.predicted_loss if result else None,
        "images_scored": result.num_images if result else None,
        "images_total": result.num_images_total if result else None,
    }


def _uncertainty(result: StudyResult | None, ood_flag: bool | None = None
                 ) -> dict[str, Any] | None:  # fmt: skip
    """The stored uncertainty: every measure, the T samples' source, and, when the model
    has a feature density, its `ood` score and `ood_flag` (above the model's threshold:
    unlike the training data; null when the model has no threshold), and with an
    input-quality reference `ood_term`, the term that gave the score."""
    if result is None:
        return None
    extra = {"ood": result.ood, "ood_flag": ood_flag} if result.ood is not None else {}
    if result.ood_term is not None:
        extra["ood_term"] = result.ood_term
    return {**result.uncertainty, **extra, "sampler": result.sampler}


def _json(value: object) -> str | None:
    return json.dumps(value) if value is not None else None


def _recent_decisions(
    db: sqlite_utils.Database, settings: Settings, now: float
) -> list[tuple[Decision, str | None]]:
    """Enough stored decisions, oldest first, to rebuild the gate after a restart: the
    last two windows' worth and everything from the last two days (the cap's day), each
    with the model version that scored it. Decisions stored before keys get their
    study id as key."""
    rows = db.execute(
        "SELECT decision, model_version, study_id FROM decisions WHERE id >= "
        "(SELECT COALESCE(MIN(id), 0) FROM "
        "(SELECT id FROM decisions ORDER BY id DESC LIMIT ?) AS recent) "
        "OR created_at >= ? ORDER BY id",
        [2 * settings.gate.window, now - 2 * 86400],
    ).fetchall()
    recent = []
    for stored, version, study_id in rows:
        decision = Decision.from_dict(json.loads(stored))
        if decision.key is None:
            decision = replace(decision, key=int(study_id))
        recent.append((decision, version))
    return recent


def _last_coverage_id(db: sqlite_utils.Database) -> int:
    """The newest coverage queue item's id (0 when none)."""
    return int(db.execute(
        "SELECT COALESCE(MAX(id), 0) FROM queue_items WHERE reason = 'coverage'"
    ).fetchone()[0])


def _pending_offset(db: sqlite_utils.Database) -> int:
    """Coverage routes not yet offset against the label budget (kept in the store by
    triggers, see triage/db.py migration 7), so a restart resumes the offset."""
    row = db.execute("SELECT value FROM gate_state WHERE name = 'budget_offset'").fetchone()
    return int(row[0]) if row is not None else 0


def _window_version(
    gate: BudgetGate, recent: list[tuple[Decision, str | None]], window: int
) -> str | None:
    """The model version that scored every decision in the restored window, or None when
    the window is empty or mixes versions (then the next scored study rescores it)."""
    versions = set()
    for decision, version in reversed(recent):
        if len(versions) > 1 or window == 0:
            break
        if gate.enters_window(decision):
            versions.add(version)
            window -= 1
    return versions.pop() if len(versions) == 1 else None
