"""Configuration: `config.yaml`, overridden by `TRIAGE__SECTION__KEY` variables, validated once.

The command line builds one frozen :class:`Settings` and passes it down; no module reads
configuration on its own. Relative paths are resolved against the state directory
(``home``), which ``TRIAGE_HOME`` or ``--home`` moves as a whole.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from triage.errors import ConfigError
from triage.gate.settings import GateSettings
from triage.model.settings import ModelSettings
from triage.retrain.settings import RetrainSettings

ENV_PREFIX = "TRIAGE__"
HOME_ENV = "TRIAGE_HOME"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathSettings(_Section):
    """Where run-time state lives; relative paths are under ``home``."""

    inbox: Path = Path("inbox")
    archive: Path = Path("archive")
    quarantine: Path = Path("quarantine")
    database: Path = Path("triage.db")
    models: Path = Path("models")
    logs: Path = Path("logs")
    received: Path = Path("received")  # network arrivals, durable before they are read


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
    network_timeout_seconds: float = Field(60.0, gt=0, le=3600)
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


class ServerSettings(_Section):
    """The HTTP server: health, metrics, the review API and web UI.

    Tokens and PHI cross it, so beyond loopback it speaks TLS (``ssl_certfile`` and
    ``ssl_keyfile``, PEM; relative to home) unless ``allow_plain_http`` says a TLS proxy
    in front does it. Failed token attempts are throttled per client address.
    """

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    allow_plain_http: bool = False
    auth_max_failures: int = Field(10, ge=1, le=10_000)
    auth_failure_window_seconds: float = Field(300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            missing = "ssl_keyfile" if self.ssl_keyfile is None else "ssl_certfile"
            raise ValueError(f"set server.{missing} too: TLS takes a certificate and its key")
        return self


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


class LogSettings(_Section):
    """Structured logs: one JSON event per line, to stderr and to ``paths.logs``."""

    level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    file_max_bytes: int = Field(20 * 1024**2, gt=0)
    file_backups: int = Field(5, ge=0)


class Settings(_Section):
    """The whole configuration. Build it with :func:`load_settings`."""

    home: Path = Path("var")
    paths: PathSettings = PathSettings()
    ingest: IngestSettings = IngestSettings()
    studies: StudySettings = StudySettings()
    server: ServerSettings = ServerSettings()
    dicom: DicomSettings = DicomSettings()
    scope: ScopeSettings = ScopeSettings()
    review: ReviewSettings = ReviewSettings()
    log: LogSettings = LogSettings()
    model: ModelSettings = ModelSettings()
    gate: GateSettings = GateSettings()
    retrain: RetrainSettings = RetrainSettings()

    def path(self, name: str) -> Path:
        """Absolute path of a ``paths`` entry, resolved against ``home``."""
        return self.home / getattr(self.paths, name)


def load_settings(
    config_path: Path | None,
    *,
    home: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read, overlay and validate the configuration.

    Args:
        config_path: YAML file; None for the embedded defaults.
        home: State directory from ``--home``; wins over ``TRIAGE_HOME`` and ``home:``.
        environ: Environment to read overrides from (default ``os.environ``).

    Raises:
        ConfigError: with one line naming the key, for any unknown key or bad value.
    """
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    base_dir = Path.cwd()
    if config_path is not None:
        raw = _read_yaml(config_path)
        base_dir = config_path.resolve().parent
    sources: dict[tuple[str, ...], str] = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            keys = tuple(part.lower() for part in name[len(ENV_PREFIX) :].split("__"))
            _set_nested(raw, keys, _parse_env_value(value), name)
            sources[keys] = name
    if home is not None:
        raw["home"] = str(home)
    elif env.get(HOME_ENV):
        raw["home"] = env[HOME_ENV]
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, config_path)) from None
    resolved = settings.home if settings.home.is_absolute() else base_dir / settings.home
    return settings.model_copy(update={"home": resolved.resolve()})


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def override_environ(pairs: Iterable[str]) -> dict[str, str]:
    """``section.key=value`` overrides (the CLI's and the benches' ``--set``) as the
    ``TRIAGE__SECTION__KEY`` variables `load_settings` reads; values are YAML.

    Raises:
        ConfigError: an override without ``=`` or without a section.
    """
    env: dict[str, str] = {}
    for text in pairs:
        key, sep, value = text.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not sep or len(parts) < 2:
            raise ConfigError(f"--set expects section.key=value (got {text!r})")
        env[ENV_PREFIX + "__".join(p.upper() for p in parts)] = value
    return env


def _parse_env_value(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _set_nested(raw: dict[str, Any], keys: tuple[str, ...], value: Any, name: str) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{name}: '{key}' is not a section, it cannot hold '{keys[-1]}'")
        node = child
    node[keys[-1]] = value


def _describe(
    exc: ValidationError, sources: dict[tuple[str, ...], str], config_path: Path | None
) -> str:
    lines = []
    for error in exc.errors():
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc)
        origin = next(
            (env for keys, env in sources.items() if loc[: len(keys)] == keys),
            str(config_path) if config_path is not None else "defaults",
        )
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = error["msg"]
            if "input" in error and not isinstance(error["input"], dict | list):
                message += f" (got {error['input']!r})"
        lines.append(f"config error: {key}: {message} [from {origin}]")
    return "\n".join(lines)
