"""The review queue API: list, claim, release, label, correct, explain.

Queue items and the study view carry ``unlike_training_data``: whether the model that
made the study's decision found its images unlike its training data (the feature-density
flag, `triage.gate.scorer`): true or false, or null when unknown (cold start, or a model
without a density threshold). It is for the reader; routing never depends on it.
With it, ``unlike_training_term`` says what was unlike, for a flagged study of a model
with an input-quality term: ``features`` (what the image shows), ``sharpness`` (blurred,
or magnified), ``contrast`` (washed out) or ``brightness``; null otherwise.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from triage.api.deps import Admin, Anyone, DbDep, Reader, SettingsDep, client_address
from triage.api.study_view import explain_routing, study_view
from triage.review.queue import ReviewQueue
from triage.training.splits import assign_split

router = APIRouter(prefix="/api", tags=["review"])


class LabelIn(BaseModel):
    label: str = Field(description="a configured class, or 'skip' / 'not-diagnostic'")
    comment: str | None = Field(None, max_length=2000)


class ClaimOut(BaseModel):
    study_id: int
    lease_expires_at: float


def _queue(db: Any, settings: Any) -> ReviewQueue:
    return ReviewQueue(db, lease_seconds=settings.review.lease_minutes * 60,
                       audit_every=settings.review.audit_every, labels=settings.model.labels)


@router.get("/me", summary="Who am I, and my tally today")
def me(who: Anyone, db: DbDep, settings: SettingsDep) -> dict[str, Any]:
    zone = ZoneInfo(settings.gate.timezone)
    midnight = datetime.now(zone).replace(hour=0, minute=0, second=0, microsecond=0)
    tally = _queue(db, settings).tally(who, midnight.timestamp())
    return {"name": who.name, "role": who.role, "tally": tally}


@router.get("/config", summary="What the web UI needs to know")
def ui_config(who: Anyone, settings: SettingsDep) -> dict[str, Any]:
    return {
        "labels": settings.model.labels,
        "extra_labels": ["skip", "not-diagnostic"],
        "show_prediction": settings.review.show_prediction,
        "show_phi": settings.review.show_phi,
        "lease_seconds": settings.review.lease_minutes * 60,
    }


@router.get("/queue", summary="Queue items, filtered by state and reason")
def list_queue(
    who: Anyone, db: DbDep, settings: SettingsDep,
    state: Annotated[Literal["pending", "claimed", "labeled"] | None, Query()] = None,
    reason: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> dict[str, Any]:
    items = _queue(db, settings).list(state=state, reason=reason, limit=limit)
    flags = _ood_flags(db, [item["study_id"] for item in items])
    return {"items": [{**item, **_unlike(flags, item["study_id"])} for item in items]}


@router.post("/queue/next", summary="Claim the next study (204 when the queue is empty)",
             response_model=ClaimOut)
def claim_next(who: Reader, db: DbDep, settings: SettingsDep, request: Request) -> Any:
    claim = _queue(db, settings).claim_next(who, client_address(request))
    if claim is None:
        return Response(status_code=204)
    return ClaimOut(study_id=claim.study_id, lease_expires_at=claim.lease_expires_at)


@router.post("/studies/{study_id}/claim", response_model=ClaimOut, summary="Claim a study")
def claim(study_id: int, who: Reader, db: DbDep, settings: SettingsDep,
          request: Request) -> ClaimOut:
    result = _queue(db, settings).claim(study_id, who, client_address(request))
    return ClaimOut(study_id=result.study_id, lease_expires_at=result.lease_expires_at)


@router.post("/studies/{study_id}/release", summary="Give a claimed study back")
def release(study_id: int, who: Reader, db: DbDep, settings: SettingsDep,
            request: Request) -> dict[str, str]:
    _queue(db, settings).release(study_id, who, client_address(request))
    return {"status": "released"}


@router.post("/studies/{study_id}/label", status_code=201, summary="Label a claimed study")
def label(study_id: int, body: LabelIn, who: Reader, db: DbDep, settings: SettingsDep,
          request: Request) -> dict[str, Any]:
    stored = _queue(db, settings).label(
        study_id, who, body.label, body.comment, client_address(request),
        split_for=lambda conn, sid, value, reason: assign_split(conn, sid, value, reason, settings),
    )
    metrics = request.app.state.daemon.metrics
    metrics.labels.labels(body.label, who.role).inc()
    metrics.label_turnaround_seconds.observe(stored.turnaround_seconds)
    return {"label_id": stored.label_id, "study_id": study_id, "label": body.label}


@router.post("/studies/{study_id}/correction", status_code=201,
             summary="Correct a study's label (admin); the history is kept")
def correct(study_id: int, body: LabelIn, who: Admin, db: DbDep, settings: SettingsDep,
            request: Request) -> dict[str, Any]:
    label_id = _queue(db, settings).correct(study_id, who, body.label, body.comment,
                                            client_address(request))
    return {"label_id": label_id, "study_id": study_id, "label": body.label}


@router.get("/studies/{study_id}", summary="A study for reading: images, why routed, labels")
def get_study(study_id: int, who: Reader, db: DbDep, settings: SettingsDep,
              request: Request) -> dict[str, Any]:
    view = study_view(db, settings, study_id, who, client_address(request))
    view.update(_unlike(_ood_flags(db, [study_id]), study_id))
    return view


@router.get("/studies/{study_id}/why", summary="Why this study was routed, and the model's "
            "operating point (temperature, threshold)")
def why(study_id: int, who: Anyone, db: DbDep) -> dict[str, Any]:
    return explain_routing(db, study_id)


@router.get("/studies/{study_id}/labels", summary="Label history of a study")
def label_history(study_id: int, who: Anyone, db: DbDep, settings: SettingsDep) -> dict:
    return {"labels": _queue(db, settings).history(study_id), "at": time.time()}


def _unlike(flags: dict[int, tuple[bool | None, str | None]], study_id: int
            ) -> dict[str, Any]:  # fmt: skip
    flag, term = flags.get(study_id, (None, None))
    return {"unlike_training_data": flag, "unlike_training_term": term if flag else None}


def _ood_flags(db: Any, study_ids: list[int]) -> dict[int, tuple[bool | None, str | None]]:
    """The ``ood_flag`` stored with each queued study's decision (None: unknown) and the
    ``ood_term`` that gave its score (None: the model has no input-quality term)."""
    flags: dict[int, tuple[bool | None, str | None]] = {}
    for start in range(0, len(study_ids), 500):  # within SQLite's bound-parameter limit
        chunk = study_ids[start:start + 500]
        marks = ", ".join("?" * len(chunk))
        for study_id, stored in db.execute(
            "SELECT queue_items.study_id, decisions.uncertainty FROM queue_items "
            "JOIN decisions ON decisions.id = queue_items.decision_id "
            f"WHERE queue_items.study_id IN ({marks})", chunk,
        ).fetchall():
            found = json.loads(stored) if stored else {}
            flag, term = found.get("ood_flag"), found.get("ood_term")
            flags[int(study_id)] = (flag if isinstance(flag, bool) else None,
                                    term if isinstance(term, str) else None)
    return flags
