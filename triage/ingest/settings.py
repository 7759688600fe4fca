"""The `ingest:`, `scope:` and `dicom:` sections of config.yaml: how files are read, which
instances are in scope, the DICOM receiver. Imports nothing from other stages
(`triage.config` composes the sections).
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IngestSettings(_Section):
    """How files in the inbox are recognised as complete and read."""

    settle_seconds: float = Field(2.0, gt=0, le=3600)
    closed_settle_seconds: float = Field(0.25, ge=0, le=60)
    rescan_seconds: float = Field(30.0, gt=0, le=86400)
    partial_patterns: list[str] = Field(default_factory=lambda: [".*", "*.part", "*.tmp"])
    abandon_after_seconds: float = Field(3600.0, gt=0)
    max_file_bytes: int = Field(2 * 1024**3, gt=0)
    max_pixels: int = Field(512 * 1024**2, gt=0)
    max_read_attempts: int = Field(2, ge=1, le=10)
    fsync: bool = True
    min_free_bytes: int = Field(1024**3, ge=0)
    unscored_modalities: list[str] = Field(
        default_factory=lambda: ["RTDOSE", "RTSTRUCT", "RTPLAN", "SEG", "SR", "KO", "PR", "REG"]
    )
    percentile_window: tuple[float, float] = (0.5, 99.5)

    @field_validator("percentile_window")
    @classmethod
    def _window_ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 <= low < high <= 100:
            raise ValueError("must be two percentiles with 0 <= low < high <= 100")
        return value


def _ae_title(value: str) -> str:
    """An AE title: 1 to 16 printable ASCII characters, not all spaces, no backslash."""
    title = value.strip()
    if not 0 < len(title) <= 16 or "\\" in title or not all(" " <= c <= "~" for c in title):
        raise ValueError(
            f"{value!r} is not an AE title (1 to 16 printable ASCII characters, no backslash)"
        )
    return title


class DicomSettings(_Section):
    """The DICOM node: a C-ECHO / C-STORE receiver, started by ``serve`` when ``port`` is set.

    An association is accepted only when it calls ``ae_title`` and, where the lists are
    not empty, comes from an allowed calling AE title and host (IP address or network in
    CIDR form). DICOM upper layer has no authentication of its own: restrict both lists
    beyond a trusted network segment.
    """

    port: int | None = Field(None, ge=1, le=65535)
    host: str = "127.0.0.1"
    ae_title: str = "TRIAGE"
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1, le=1000)
    max_pdu_bytes: int = Field(262_144, ge=0, le=2**32 - 1)
    acse_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    dimse_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    # pynetdicom's own: from the last PDU received, the receiver's time answering included
    network_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    # An association with no PDU either way for this long, while none of its requests is
    # being answered, is aborted and its slot freed (a sender that died mid-association).
    idle_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    # How long a C-STORE may wait for the database before it answers "out of resources"
    # (the sender retries later) instead of holding the association.
    store_timeout_seconds: float = Field(30.0, gt=0, le=600)
    # While a sender is mid-association, what it sent waits (at most this long) before it
    # is read, so that reading does not slow the sender down; 0 reads at once.
    defer_reading_seconds: float = Field(5.0, ge=0, le=300)

    @field_validator("ae_title")
    @classmethod
    def _title_valid(cls, value: str) -> str:
        return _ae_title(value)

    @field_validator("allowed_calling_ae_titles")
    @classmethod
    def _titles_valid(cls, value: list[str]) -> list[str]:
        return [_ae_title(title) for title in value]

    @model_validator(mode="after")
    def _idle_before_network_timeout(self) -> DicomSettings:
        if self.idle_timeout_seconds >= self.network_timeout_seconds:
            raise ValueError(
                f"dicom.idle_timeout_seconds ({self.idle_timeout_seconds:g}) must be shorter "
                f"than dicom.network_timeout_seconds ({self.network_timeout_seconds:g}), "
                "which would abort an idle association first")
        return self

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_valid(cls, value: list[str]) -> list[str]:
        for host in value:
            try:
                ipaddress.ip_network(host, strict=False)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or CIDR network") from None
        return value


class ScopeSettings(_Section):
    """What the model is for. Instances outside it are archived ``out_of_scope`` with the
    reason, never scored or routed. An empty list admits any value."""

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST", "THORAX", "LUNG"])
    accept_missing_body_part: bool = True
    photometric: list[str] = Field(default_factory=lambda: ["MONOCHROME1", "MONOCHROME2"])
    min_rows: int = Field(16, ge=1)
    min_cols: int = Field(16, ge=1)
