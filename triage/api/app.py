"""Build the FastAPI application around a running :class:`~triage.daemon.Daemon`."""

from __future__ import annotations

from fastapi import FastAPI

from triage import __version__
from triage.api import ops
from triage.daemon import Daemon


def create_app(daemon: Daemon) -> FastAPI:
    """The app serves the daemon; starting and stopping the daemon is the caller's."""
    app = FastAPI(title="triage", version=__version__)
    app.state.daemon = daemon
    app.include_router(ops.router)
    return app
