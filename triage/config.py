"""Configuration: `config.yaml`, overridden by `TRIAGE__SECTION__KEY` variables, validated once.

The command line builds one frozen :class:`Settings` and passes it down; no module reads
configuration on its own. Relative paths are resolved against the state directory
(``home``), which ``TRIAGE_HOME`` or ``--home`` moves as a whole.

Each stage's section is a pydantic model in that stage's package (`triage.ingest.settings`,
`triage.gate.settings`, ...) that imports nothing from other stages; this module composes
them (and re-exports them) with the entry points' own sections (`paths`, `server`). So it
sits above the stages: the entry points, the API and replay import it; a stage names
:class:`Settings` only in type hints, and is handed the composed object.
"""

from __future__ import annotations

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
    model_validator,
)

from triage.errors import ConfigError
from triage.gate.settings import GateSettings
from triage.ingest.settings import DicomSettings, IngestSettings, ScopeSettings
from triage.model.settings import ModelSettings
from triage.review.settings import ReviewSettings
from triage.store.replicas import default_name, stored_name
from triage.store.settings import ReplicaSettings, StoreSettings, StudySettings
from triage.telemetry.settings import LogSettings
from triage.training.settings import RetrainSettings

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


class Settings(_Section):
    """The whole configuration. Build it with :func:`load_settings`."""

    home: Path = Path("var")
    paths: PathSettings = PathSettings()
    store: StoreSettings = StoreSettings()
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
    replica: ReplicaSettings = ReplicaSettings()

    def path(self, name: str) -> Path:
        """Absolute path of a ``paths`` entry, resolved against ``home``."""
        return self.home / getattr(self.paths, name)

    def database(self) -> Path | str:
        """The store to open: ``store.url`` when set, else the SQLite file
        ``paths.database``."""
        return self.store.url or self.path("database")

    def replica_name(self) -> str:
        """This daemon's name among replicas: `replica.name`; else the name its home's
        daemon ran under before (kept in the home); else the host name and a digest of
        the home directory."""
        return self.replica.name or stored_name(self.home) or default_name(self.home)


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
