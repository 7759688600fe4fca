"""`triage serve` binds beyond loopback only with TLS, or when plain HTTP is allowed."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import FAST_ENV, REPO, free_port

from triage.api.transport import server_transport
from triage.config import load_settings
from triage.errors import ConfigError


def _settings(tmp_path: Path, **server: str):
    env = {f"TRIAGE__SERVER__{key.upper()}": value for key, value in server.items()}
    return load_settings(None, home=tmp_path, environ=env)


def _serve(tmp_path: Path, host: str, env: dict[str, str], timeout: float = 20):
    return subprocess.run(
        [sys.executable, "-m", "triage", "serve", "--config", str(REPO / "config.yaml"),
         "--host", host, "--port", str(free_port())],
        # the shipped config turns the DICOM receiver on at 11112: tests never bind it
        env={**os.environ, "TRIAGE_HOME": str(tmp_path / "home"), "TRIAGE__DICOM__PORT": "null",
             **env},
        capture_output=True, text=True, timeout=timeout,
    )


def test_serve_refuses_plain_http_beyond_loopback(tmp_path: Path) -> None:
    result = _serve(tmp_path, "0.0.0.0", FAST_ENV)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for key in ("server.ssl_certfile", "server.ssl_keyfile", "server.allow_plain_http"):
        assert key in lines[0]
    assert not (tmp_path / "home" / "triage.db").exists(), "refused before the daemon started"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "localhost"])
def test_loopback_needs_no_tls(tmp_path: Path, host: str) -> None:
    assert server_transport(_settings(tmp_path), host) == {}


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "pacs-gw.hospital.local"])
def test_other_addresses_are_refused_without_tls(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="server.allow_plain_http"):
        server_transport(_settings(tmp_path), host)


def test_allow_plain_http_binds_with_a_warning(tmp_path: Path, caplog) -> None:
    settings = _settings(tmp_path, allow_plain_http="true")
    with caplog.at_level(logging.WARNING, logger="triage"):
        assert server_transport(settings, "0.0.0.0") == {}
    assert [r.getMessage() for r in caplog.records] == ["plain_http_beyond_loopback"]


def test_tls_settings_come_in_pairs_and_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.ssl_keyfile"):
        _settings(tmp_path, ssl_certfile="/etc/triage/cert.pem")
    settings = _settings(tmp_path, ssl_certfile="cert.pem", ssl_keyfile="key.pem")
    with pytest.raises(ConfigError, match="server.ssl_certfile"):
        server_transport(settings, "0.0.0.0")


def _self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_settings_serve_https(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    assert server_transport(
        _settings(tmp_path, ssl_certfile=str(cert), ssl_keyfile=str(key)), "0.0.0.0"
    ) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    port = free_port()
    env = {**os.environ, **FAST_ENV, "TRIAGE_HOME": str(tmp_path / "home"),
           "TRIAGE__SERVER__SSL_CERTFILE": str(cert), "TRIAGE__SERVER__SSL_KEYFILE": str(key)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "triage", "serve", "--config", str(REPO / "config.yaml"),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                answer = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=str(cert),
                                   timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "no HTTPS answer in 60 s"
                time.sleep(0.3)
        assert answer.status_code == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
