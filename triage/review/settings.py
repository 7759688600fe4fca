"""The `review:` section of config.yaml: the review queue and its web UI.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReviewSettings(_Section):
    """The radiologist review queue and its web UI."""

    lease_minutes: float = Field(15.0, gt=0, le=24 * 60)
    show_prediction: bool = False
    show_phi: bool = False
    audit_every: int = Field(5, ge=1, le=1000)
    metrics_require_token: bool = False
    image_cache_instances: int = Field(16, ge=0, le=1024)
    # "Open in viewer" link of the review page: a URL template with {study_uid} and
    # {dicomweb} (this server's DICOMweb root), e.g. an OHIF viewer configured with
    # triage as its DICOMweb data source. None: the link opens nothing but the DICOMweb URL.
    viewer_url: str | None = None
