"""The interactive API documentation, ``/docs`` (Swagger UI), from packaged assets only.

FastAPI's own page loads its script and style from a CDN and starts them with inline
script, which the content security policy refuses (and a hospital network may not
reach). Here the page is a static HTML file of this package that loads the Swagger UI
bundle shipped in the ``fastapi-offline`` wheel (Swagger UI 5, which reads the OpenAPI
3.1 schema FastAPI writes; served at ``/docs-assets/``) and starts it with a script file
of this package: no external URL, no inline script, the same security headers as every
other answer. It reads the schema at ``/openapi.json``.

No ``/redoc``: ReDoc's bundle (in the same wheel) writes its styles as inline
``<style>`` elements, which ``style-src 'self'`` refuses, and then fails to render; it
would need ``'unsafe-inline'`` styles, which this policy does not give any page.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC = Path(__file__).parent / "static"
ASSETS = Path(fastapi_offline.__file__).parent / "static"
ASSET_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
"""What ``/docs-assets/`` serves (only these; not ReDoc's bundle beside them)."""

router = APIRouter()


@router.get("/docs", include_in_schema=False)
def swagger_ui() -> FileResponse:
    """Swagger UI over ``/openapi.json`` (the page: ``static/docs.html``)."""
    return FileResponse(STATIC / "docs.html")


@router.get("/docs-assets/{name}", include_in_schema=False)
def asset(name: str) -> FileResponse:
    """One of :data:`ASSET_FILES`, from the installed wheel."""
    media_type = ASSET_FILES.get(name)
    if media_type is None:
        raise HTTPException(404, "no such asset")
    return FileResponse(ASSETS / name, media_type=media_type)
