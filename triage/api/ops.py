"""Routes for operations: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triage.api.deps import current_principal, get_db

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness of the ingest and scoring loops")
def healthz(request: Request) -> JSONResponse:
    """200 when both loops are alive and beating, 503 otherwise."""
    health = request.app.state.daemon.health()
    return JSONResponse(health, status_code=200 if health["ok"] else 503)


@router.get("/metrics", summary="Prometheus metrics (token with role ops or admin if "
            "review.metrics_require_token)")
def metrics(request: Request) -> Response:
    if request.app.state.settings.review.metrics_require_token:
        _require_ops(request)
    registry = request.app.state.daemon.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _require_ops(request: Request) -> None:
    db = next(get_db(request))
    try:
        who = current_principal(request, db)
    finally:
        db.close()
    if who.role not in ("ops", "admin"):
        raise HTTPException(403, f"this needs the role ops or admin; your token has {who.role}")
