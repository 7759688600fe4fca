"""The "Open in viewer" link of the review page: where a study opens in a DICOMweb viewer.

``review.viewer_url`` is a URL template (an OHIF viewer with this server as its
DICOMweb data source, say) with ``{study_uid}`` and ``{dicomweb}`` placeholders. The
study's UID is given to readers only, like the images.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request

from triage.api.deps import DbDep, Reader, SettingsDep
from triage.api.dicomweb_routes import dicomweb_root

router = APIRouter(prefix="/api", tags=["review"])

_SCHEMES = ("https://", "http://", "weasis://")


def viewer_link(template: str | None, study_uid: str, dicomweb: str) -> str | None:
    """``template`` with its placeholders filled; None when there is none or it is not an
    http(s) or weasis URL (never a ``javascript:`` link in the page)."""
    if not template or not template.strip().lower().startswith(_SCHEMES):
        return None
    return template.strip().replace("{study_uid}", study_uid).replace("{dicomweb}", dicomweb)


@router.get("/studies/{study_id}/viewer",
            summary="The study's DICOMweb URL and its link in the configured viewer")
def viewer(study_id: int, who: Reader, db: DbDep, settings: SettingsDep,
           request: Request) -> dict[str, Any]:
    row = db.execute("SELECT study_uid FROM studies WHERE id = ?", [study_id]).fetchone()
    if row is None:
        raise HTTPException(404, f"no study {study_id}")
    root = dicomweb_root(request)
    template = getattr(settings.review, "viewer_url", None)
    return {
        "study_uid": row[0],
        "dicomweb_url": f"{root}/studies/{row[0]}",
        "viewer_url": viewer_link(template, row[0], root),
    }
