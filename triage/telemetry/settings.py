"""The `log:` section of config.yaml: structured logs.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSettings(_Section):
    """Structured logs: one JSON event per line, to stderr and to ``paths.logs``."""

    level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    file_max_bytes: int = Field(20 * 1024**2, gt=0)
    file_backups: int = Field(5, ge=0)
