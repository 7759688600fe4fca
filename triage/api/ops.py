"""Routes for operations: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Liveness of the ingest and scoring loops")
def healthz(request: Request) -> JSONResponse:
    """200 when both loops are alive and beating, 503 otherwise."""
    health = request.app.state.daemon.health()
    return JSONResponse(health, status_code=200 if health["ok"] else 503)


@router.get("/metrics", summary="Prometheus metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.daemon.registry), media_type=CONTENT_TYPE_LATEST)
