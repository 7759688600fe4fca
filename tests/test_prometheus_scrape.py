"""The real Prometheus server scrapes the real daemon and evaluates the alert rules."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import FAST_ENV, REPO, DaemonProcess, free_port, make_image

PROMETHEUS = Path("/usr/bin/prometheus")
ALERTS = REPO / "service" / "prometheus" / "alerts.yml"


def _query(client: httpx.Client, expr: str) -> list[dict]:
    response = client.get("/api/v1/query", params={"query": expr})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait_ready(client: httpx.Client, prometheus: subprocess.Popen[bytes], log: Path,
                deadline: float) -> None:
    """Until /-/ready answers 200, Prometheus answers its API with a plain-text 503
    (the TSDB is still opening), which is not JSON; a loaded machine takes seconds."""
    while time.monotonic() < deadline:
        assert prometheus.poll() is None, log.read_text()[-2000:]
        try:
            if client.get("/-/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"Prometheus not ready in time: {log.read_text()[-2000:]}")


def test_prometheus_scrapes_the_daemon_and_evaluates_the_rules(tmp_path: Path) -> None:
    if not PROMETHEUS.exists():
        pytest.skip("/usr/bin/prometheus not found (Debian package `prometheus`)")
    daemon = DaemonProcess(tmp_path / "home", {**FAST_ENV, "TRIAGE__RETRAIN__ENABLED": "false"},
                           []).start()
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        for i in range(2):
            make_image(daemon.inbox / f"{i}.dcm", study_uid=f"2.25.{600 + i}", seed=i)
        daemon.wait_for(lambda s: s["files"]["archived"] == 2, 30, "two archived files")
        shutil.copy(ALERTS, tmp_path / "alerts.yml")
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "triage",
                                "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            prometheus = subprocess.Popen(
                [str(PROMETHEUS), f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=out, cwd=tmp_path)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            archived: list[dict] = []
            deadline = time.monotonic() + 40
            _wait_ready(client, prometheus, log, deadline)
            while time.monotonic() < deadline:
                assert prometheus.poll() is None, log.read_text()[-2000:]
                try:
                    archived = _query(client, 'triage_ingest_files_total{outcome="archived"}')
                except httpx.HTTPError:
                    archived = []
                if archived:
                    break
                time.sleep(0.5)
            assert archived, f"no sample scraped in 40 s: {log.read_text()[-2000:]}"
            [sample] = archived
            assert sample["metric"]["job"] == "triage"
            assert float(sample["value"][1]) == 2.0
            assert [float(r["value"][1]) for r in _query(client, 'up{job="triage"}')] == [1.0]
            groups: list[dict] = []
            while time.monotonic() < deadline + 10:
                response = client.get("/api/v1/rules")
                response.raise_for_status()
                groups = response.json()["data"]["groups"]
                rules = [rule for group in groups for rule in group["rules"]]
                never = "0001-01-01"  # Prometheus' lastEvaluation of a rule not yet run
                if rules and not any(rule.get("lastEvaluation", never).startswith(never)
                                     for rule in rules):
                    break
                time.sleep(0.5)
            rules = [rule for group in groups for rule in group["rules"]]
            assert len(rules) == sum(
                len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
            assert all(rule["health"] == "ok" for rule in rules), [
                (rule["name"], rule.get("lastError")) for rule in rules]
            firing = {rule["name"] for rule in rules if rule["state"] == "firing"}
            assert not firing & {"TriageDown", "TriageIngestPaused"}, firing
    finally:
        if prometheus is not None and prometheus.poll() is None:
            prometheus.terminate()
            try:
                prometheus.wait(timeout=15)
            except subprocess.TimeoutExpired:
                prometheus.kill()
                prometheus.wait(timeout=15)
        daemon.stop(signal.SIGKILL)
