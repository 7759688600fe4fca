"""config.yaml validation, environment overrides and the state directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from triage.config import load_settings
from triage.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _triage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage", *args], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )


def test_shipped_config_is_valid_and_matches_defaults() -> None:
    shipped = load_settings(REPO / "config.yaml", environ={})
    defaults = load_settings(None, environ={}, home=shipped.home)
    # The one deliberate difference: the shipped config turns the DICOM node on, for
    # modalities and PACS on the network; the embedded defaults leave it off.
    assert (shipped.dicom.port, shipped.dicom.host) == (11112, "0.0.0.0")
    assert defaults.dicom.port is None
    assert shipped.model_copy(update={"dicom": defaults.dicom}) == defaults
    assert shipped.home == (REPO / "var").resolve()


@pytest.mark.parametrize(
    ("yaml_text", "env", "key"),
    [
        ("ingest:\n  settle_secnds: 3\n", {}, "ingest.settle_secnds: unknown key"),
        ("studies:\n  stable_age_seconds: -1\n", {}, "studies.stable_age_seconds"),
        ("server:\n  port: 99999\n", {}, "server.port"),
        ("", {"TRIAGE__INGEST__RESCAN_SECONDS": "often"}, "ingest.rescan_seconds"),
        ("", {"TRIAGE__NOSUCH__KEY": "1"}, "nosuch: unknown key"),
        ("log:\n  level: LOUD\n", {}, "log.level"),
        ("ingest:\n  percentile_window: [99, 1]\n", {}, "ingest.percentile_window"),
        ("dicom:\n  ae_title: A_TITLE_LONGER_THAN_16\n", {}, "dicom.ae_title"),
        ("", {"TRIAGE__DICOM__ALLOWED_HOSTS": "[10.0.0.0/8, pacs]"}, "dicom.allowed_hosts"),
        ("dicom:\n  port: 0\n", {}, "dicom.port"),
        ("dicom:\n  idle_timeout_seconds: 0\n", {}, "dicom.idle_timeout_seconds"),
        ("", {"TRIAGE__DICOM__IDLE_TIMEOUT_SECONDS": "soon"}, "dicom.idle_timeout_seconds"),
        ("dicom:\n  idle_timeout_seconds: 90\n", {}, "dicom.idle_timeout_seconds (90) must "
         "be shorter than dicom.network_timeout_seconds (60)"),
        ("scope:\n  modalities: CR\n", {}, "scope.modalities"),
    ],
)
def test_bad_value_names_the_key_and_exits_2(
    tmp_path: Path, yaml_text: str, env: dict[str, str], key: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml_text)
    result = _triage("status", "--config", str(config), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_environment_overrides_yaml_and_reports_its_origin(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("studies:\n  stable_age_seconds: 30\n")
    settings = load_settings(config, environ={"TRIAGE__STUDIES__STABLE_AGE_SECONDS": "5"})
    assert settings.studies.stable_age_seconds == 5
    with pytest.raises(ConfigError, match=r"from TRIAGE__STUDIES__STABLE_AGE_SECONDS"):
        load_settings(config, environ={"TRIAGE__STUDIES__STABLE_AGE_SECONDS": "0"})


def test_home_moves_all_state_and_cli_flag_wins(tmp_path: Path) -> None:
    settings = load_settings(None, environ={"TRIAGE_HOME": str(tmp_path / "a")})
    assert settings.path("inbox") == tmp_path / "a" / "inbox"
    assert settings.path("database") == tmp_path / "a" / "triage.db"
    settings = load_settings(
        None, home=tmp_path / "b", environ={"TRIAGE_HOME": str(tmp_path / "a")}
    )
    assert settings.path("quarantine") == tmp_path / "b" / "quarantine"
    result = _triage("status", "--json", "--config", str(REPO / "config.yaml"),
                     "--home", str(tmp_path / "c"))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["home"] == str(tmp_path / "c")
    assert status["files"]["total"] == 0 and status["inbox_waiting"] == 0


def test_unreadable_and_malformed_config_files(tmp_path: Path) -> None:
    result = _triage("status", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [unclosed\n")
    result = _triage("status", "--config", str(bad))
    assert result.returncode == 2 and "not valid YAML at line" in result.stderr
