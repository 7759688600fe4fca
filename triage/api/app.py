"""Build the FastAPI application around a running :class:`~triage.daemon.Daemon`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from triage import __version__
from triage.api import dicomweb_routes, docs, images, ops, ops_status, review, viewer
from triage.api.security import SecurityHeadersMiddleware
from triage.api.throttle import AuthThrottle
from triage.errors import TriageError
from triage.review.queue import QueueError
from triage.store.db import DATABASE_ERRORS
from triage.telemetry.logs import event

if TYPE_CHECKING:
    from triage.daemon import Daemon

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("triage.api")


def create_app(daemon: Daemon) -> FastAPI:
    """The app serves the daemon; starting and stopping the daemon is the caller's.

    /docs is this package's page over Swagger UI assets shipped in a wheel
    (:mod:`triage.api.docs`), not FastAPI's, which loads a CDN and runs inline script that
    the content security policy (and a hospital network) refuses. No /redoc: ReDoc needs
    inline styles, which the policy refuses too. The schema is at /openapi.json.

    Health, metrics and the ops status are always served; the review API, its images,
    the viewer, QIDO/WADO and the web UI with the `review` role, STOW-RS with the
    `receiver` role (`replica.roles`); a route of a role this replica lacks is 404.
    """
    app = FastAPI(title="triage", version=__version__,
                  description="Needs-label gate and radiologist review queue for DICOM studies.",
                  docs_url=None, redoc_url=None)
    app.state.daemon = daemon
    app.state.settings = daemon.settings
    server = daemon.settings.server
    app.state.auth_throttle = AuthThrottle(server.auth_max_failures,
                                           server.auth_failure_window_seconds)
    app.add_middleware(SecurityHeadersMiddleware)
    roles = daemon.settings.replica.roles
    app.include_router(ops.router)
    app.include_router(ops_status.router)
    app.include_router(docs.router)
    if "review" in roles:
        app.include_router(review.router)
        app.include_router(images.router)
        app.include_router(viewer.router)
        app.include_router(dicomweb_routes.router)
    if "receiver" in roles:
        app.include_router(dicomweb_routes.stow_router)

    @app.exception_handler(QueueError)
    async def queue_error(request: Request, exc: QueueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    async def store_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # The store cannot be reached or is busy beyond its timeout (a database server
        # restarting, a lock held too long): a named, retryable answer, not a traceback.
        route = request.scope.get("route")  # its template: no UID from the URL
        event(log, "api_store_unavailable", logging.WARNING,
              route=getattr(route, "path", None), error_type=type(exc).__name__)
        return JSONResponse({"detail": "the store is unavailable; try again shortly"},
                            status_code=503, headers={"Retry-After": "5"})

    for error in DATABASE_ERRORS:
        app.add_exception_handler(error, store_unavailable)

    @app.exception_handler(TriageError)
    async def triage_error(request: Request, exc: TriageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    if STATIC.is_dir() and "review" in roles:
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(STATIC / "review.html")

    return app
