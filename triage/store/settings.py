"""The store's sections of config.yaml. `store:`: where the database is (SQLite under
`paths.database` by default, or a PostgreSQL server). `studies:`: when a study counts as
complete (ingest) and when one whose stored images could not be read is tried again
(gate); it belongs to the study's life in the store, read by both stages. Imports
nothing from the stages.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreSettings(_Section):
    """Where the database is: unset, the SQLite file `paths.database`; a
    ``postgresql://user[:password]@host[:port]/dbname`` URL names a PostgreSQL server
    (the same schema and data; ``TRIAGE__STORE__URL`` sets it from the environment)."""

    url: str | None = None

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(POSTGRES_SCHEMES):
            raise ValueError("must be a postgresql:// URL, or unset for the SQLite file "
                             "paths.database")
        return value


ROLES = ("receiver", "ingest", "score", "review", "retrain")


class ReplicaSettings(_Section):
    """This daemon among replicas sharing one store (`triage.store.replicas`).

    `name` identifies it in the store, the status page and the metrics' `replica`
    label (default: the host name and a digest of the home directory). `roles` are the
    loops it runs: `receiver` (the DICOM node and STOW-RS), `ingest` (inbox and received
    instances into studies), `score` (the gate), `review` (the review API and web UI)
    and `retrain` (the scheduler; one replica at a time holds it). A replica whose
    heartbeat (every `heartbeat_seconds`) is older than `lease_seconds` is dead: the
    studies it was scoring are scored by another, the retrain lease passes on.
    """

    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    roles: list[str] = Field(default_factory=lambda: list(ROLES))
    heartbeat_seconds: float = Field(5.0, gt=0, le=30)
    lease_seconds: float = Field(30.0, gt=0, le=3600)

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: list[str]) -> list[str]:
        unknown = [role for role in value if role not in ROLES]
        if unknown or not value:
            raise ValueError(f"roles must be a non-empty subset of {list(ROLES)}"
                             + (f"; unknown: {unknown}" if unknown else ""))
        return [role for role in ROLES if role in value]  # one order, no duplicates

    @model_validator(mode="after")
    def _consistent(self) -> ReplicaSettings:
        if "receiver" in self.roles and "ingest" not in self.roles:
            raise ValueError("roles: a receiver must also ingest (what it receives is "
                             "kept in its own home's paths.received until read)")
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("lease_seconds must be at least twice heartbeat_seconds, "
                             "or a live replica could look dead between two heartbeats")
        return self


class StudySettings(_Section):
    """When a study counts as complete, and when one that failed is tried again."""

    stable_age_seconds: float = Field(30.0, gt=0, le=86400)
    check_seconds: float = Field(1.0, gt=0, le=60)
    # A study whose stored images cannot be read (`error`) is tried again after each of
    # these waits in turn (a passing disk or file-system fault heals), then left `error`
    # for an operator: len + 1 attempts in all. [] never retries.
    error_retry_seconds: list[float] = Field(default_factory=lambda: [60.0, 300.0, 1800.0])

    @field_validator("error_retry_seconds")
    @classmethod
    def _retry_waits_positive(cls, value: list[float]) -> list[float]:
        if any(not 0 < wait <= 7 * 86400 for wait in value):
            raise ValueError("each wait must be more than 0 and at most a week (604800 s)")
        return value
