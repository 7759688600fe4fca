"""Uses of a freshly trained model on the pool: coverage queries and queue re-ordering.

* :func:`coverage_queries`: unlabelled scored studies farthest (in the model's embedding
  space) from every labelled or queued study, by k-center with outliers with those as
  existing centres (`pick_coverage`), so the labelled set covers the stream rather than
  only its dense regions, and a handful of corrupt or exotic studies cannot take them.
* :func:`rescore_pending`: after a promotion, pending queue items are scored with the new
  model and their priority replaced, so the queue re-orders.
* :func:`audit_outcomes` and :func:`auto_mix`: what the labelled audits tell `auto`'s
  candidates, and the mix it draws them from (the scorer, the status page and the
  metric read the same function).
* :func:`batch_waiting`: the studies waiting in `gate.budget_manager: batch`'s buffer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import sqlite_utils
import torch

from triage.coreset import robust_centres
from triage.gate import make_strategy
from triage.gate.strategies import AuditOutcome, AutoStrategy
from triage.model.checkpoint import Checkpoint
from triage.model.inference import embed, pick_images, score_study
from triage.store.db import transaction
from triage.store.images import load_study_images

if TYPE_CHECKING:
    from triage.config import Settings

SEED_FACTOR = 1009  # MC-dropout seed = study_id * 1009 + round, as the gate scorer does


def scored_images(db: sqlite_utils.Database, study_id: int, size: int,
                  max_images: int) -> torch.Tensor | None:  # fmt: skip
    """The images of a study the scorer would score: at most `max_images`, evenly spaced,
    [K, 1, S, S]; None when it has none of the model's `size`."""
    images = load_study_images(db, study_id)
    if images.shape[0] == 0 or tuple(images.shape[2:]) != (size, size):
        return None
    return images[pick_images(images.shape[0], max_images)]


def study_embeddings(
    db: sqlite_utils.Database, checkpoint: Checkpoint, study_ids: list[int], max_images: int
) -> tuple[list[int], torch.Tensor]:
    """Mean penultimate embedding of each study's images.

    Returns:
        (the study ids that had images of the model's size, float [M, F]).
    """
    size = checkpoint.settings.input_size
    kept, rows = [], []
    for study_id in study_ids:
        images = scored_images(db, study_id, size, max_images)
        if images is None:
            continue
        rows.append(embed(checkpoint.network, images).mean(dim=0))
        kept.append(int(study_id))
    if not rows:
        return [], torch.zeros(0, checkpoint.network.stage_channels[-1])
    return kept, torch.stack(rows)


_AUDITS = (
    "FROM queue_items q JOIN decisions d ON d.id = q.decision_id "
    "JOIN labels l ON l.study_id = q.study_id AND l.superseded_by IS NULL "
    "WHERE q.reason = 'audit' AND d.strategy = 'auto' AND d.quantiles IS NOT NULL "
    "AND d.prediction IS NOT NULL"
)


def audit_signature(db: sqlite_utils.Database) -> tuple[int, int]:
    """(count, newest label id) of the labelled `auto` audits: changes whenever an audit
    label arrives or is corrected, so the scorer recomputes the mix only then."""
    count, newest = db.execute(f"SELECT COUNT(*), COALESCE(MAX(l.id), 0) {_AUDITS}").fetchone()
    return int(count), int(newest)


def audit_outcomes(db: sqlite_utils.Database, class_names: list[str]) -> list[AuditOutcome]:
    """The labelled audits decided under `auto`, oldest first: every component's window
    quantile at the decision, and the served model's probability of the reader's current
    label (one of `class_names`; `skip` and `not-diagnostic` do not count). Audits are the
    uniform sample of scored studies, so these are unbiased for the stream."""
    rows = db.execute(
        f"SELECT d.quantiles, d.prediction, l.label {_AUDITS} ORDER BY d.id"
    ).fetchall()
    out = []
    for quantiles, prediction, label in rows:
        if label not in class_names:
            continue
        probabilities = json.loads(prediction).get("probabilities", {})
        if label not in probabilities:
            continue
        out.append(AuditOutcome(json.loads(quantiles), float(probabilities[label])))
    return out


def auto_mix(db: sqlite_utils.Database, settings: Settings) -> dict[str, float] | None:
    """The mix `gate.strategy: auto` draws its candidates from, after every labelled
    audit in the store; None under another strategy."""
    strategy = make_strategy(settings.gate)
    if not isinstance(strategy, AutoStrategy):
        return None
    return strategy.mix(audit_outcomes(db, settings.model.labels))


def batch_waiting(db: sqlite_utils.Database, now: float) -> dict[str, float | int | None]:
    """Scored studies waiting for their batch (`gate_buffer`) and how long the oldest has
    waited at `now` (None when none waits)."""
    count, oldest = db.execute("SELECT COUNT(*), MIN(scored_at) FROM gate_buffer").fetchone()
    return {"waiting": int(count),
            "oldest_wait_seconds": None if oldest is None else max(0.0, now - float(oldest))}


def unlabelled_pool(db: sqlite_utils.Database, settings: Settings) -> list[int]:
    """The unlabelled scored studies retraining looks at: state `scored`, never labelled,
    not in the queue, the most recent `retrain.pool_max`, newest first."""
    return [row[0] for row in db.execute(
        "SELECT id FROM studies s WHERE state = 'scored' "
        "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.study_id = s.id) "
        "AND NOT EXISTS (SELECT 1 FROM queue_items q WHERE q.study_id = s.id) "
        "ORDER BY completed_at DESC, id DESC LIMIT ?",
        [settings.retrain.pool_max],
    ).fetchall()]


def unlabelled_pool_images(db: sqlite_utils.Database, settings: Settings) -> torch.Tensor:
    """The scored images (at most `model.max_images_per_study` per study, evenly spaced)
    of the `unlabelled_pool`, [M, 1, S, S]; studies whose images are gone or of another
    size are left out."""
    size = settings.model.input_size
    parts = []
    for study_id in unlabelled_pool(db, settings):
        try:
            images = scored_images(db, study_id, size, settings.model.max_images_per_study)
        except Exception:  # noqa: BLE001 - an unreadable study is left out of the pool
            continue
        if images is not None:
            parts.append(images)
    return torch.cat(parts) if parts else torch.zeros(0, 1, size, size)


def coverage_queries(
    db: sqlite_utils.Database, checkpoint: Checkpoint, settings: Settings, budget: int
) -> list[int]:
    """Unlabelled scored studies that best extend the labelled set's coverage.

    Candidates: studies in state `scored`, never labelled and not in the queue (the most
    recent `retrain.pool_max`). Existing centres: every labelled study (any label) and
    every queued one. Picks are made by `pick_coverage` (farthest first), so the first
    id is the study farthest from all centres.

    Args:
        db: The store.
        checkpoint: The model whose embeddings define distances (the serving one).
        settings: The configuration (`retrain.pool_max`, `model.max_images_per_study`).
        budget: Most studies to return (>= 0).

    Returns:
        Study ids, farthest first, at most `budget`.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0, got {budget!r}")
    if budget == 0:
        return []
    pool = unlabelled_pool(db, settings)
    if not pool:
        return []
    centres = [row[0] for row in db.execute(
        "SELECT study_id FROM labels UNION SELECT study_id FROM queue_items ORDER BY 1"
    ).fetchall()]
    max_images = settings.model.max_images_per_study
    pool_ids, pool_x = study_embeddings(db, checkpoint, pool, max_images)
    centre_ids, centre_x = study_embeddings(db, checkpoint, centres, max_images)
    if not pool_ids:
        return []
    picks = pick_coverage(centre_x, pool_x, budget, settings.retrain.coverage_outlier_fraction)
    return [pool_ids[i] for i in picks]


def pick_coverage(centres: torch.Tensor, pool: torch.Tensor, budget: int,
                  outlier_fraction: float) -> list[int]:
    """Positions in `pool` [P, F] that best extend the coverage of `centres` [C, F].

    k-Center-Greedy with the centres fixed, farthest first, among the pool's inliers:
    the ``outlier_fraction`` of the pool that k-center with outliers (Charikar et al.
    2001) leaves uncovered is never picked, so a corrupt or exotic study does not take a
    query that plain farthest-first would give it (`robust_centres`).
    """
    if budget < 1 or pool.shape[0] == 0:
        return []
    k = min(budget, pool.shape[0])
    features = torch.cat([centres, pool])
    fixed = list(range(centres.shape[0]))
    picks, _ = robust_centres(features, fixed, k, outlier_fraction)
    return [int(i) - centres.shape[0] for i in picks]


def rescore_pending(db: sqlite_utils.Database, checkpoint: Checkpoint, settings: Settings) -> int:
    """Score pending queue items with `checkpoint` and replace their priority.

    Priority = the gate's strategy on the new scores, each component turned
    into its quantile within the pending pool and weighted (`Strategy.score_pool`),
    divided by the weights' sum: in [0, 1] like a decision's `combined` score, larger
    first. MC-dropout seeds follow the gate scorer (study id, round), and the studies are
    scored at the model's operating point (`Checkpoint.operating_point`: its temperature
    enters every MC sample, hence the uncertainty measures), as the gate scorer does.
    Audit items keep their audit priority. With the `coin` budget manager (the random
    baseline) nothing changes.

    Returns:
        Number of queue items whose priority was updated.
    """
    if not settings.gate.uses_scores:  # the random baseline
        return 0
    strategy = make_strategy(settings.gate)
    rows = db.execute(
        "SELECT q.id, q.study_id, s.round FROM queue_items q JOIN studies s "
        "ON s.id = q.study_id WHERE q.state = 'pending' AND q.reason != 'audit' ORDER BY q.id"
    ).fetchall()
    size = settings.model.input_size
    operating_point = checkpoint.operating_point
    items, results = [], []
    for item_id, study_id, round_ in rows:
        images = load_study_images(db, study_id)
        if images.shape[0] == 0 or tuple(images.shape[2:]) != (size, size):
            continue
        results.append(score_study(
            checkpoint.network, checkpoint.loss_predictor, images, settings.model,
            seed=study_id * SEED_FACTOR + round_, operating_point=operating_point,
            epistemic=checkpoint.epistemic,
        ))
        items.append(item_id)
    if not items:
        return 0
    scores = strategy.score_pool(results) / sum(strategy.weights.values())
    updated = 0
    with transaction(db):
        for item_id, score in zip(items, scores.tolist(), strict=True):
            cursor = db.execute(
                "UPDATE queue_items SET priority = ? WHERE id = ? AND state = 'pending'",
                [score, item_id],
            )
            updated += cursor.rowcount
    return updated
