"""The ops status summary and page against the real server, SQLite file and Chromium."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from conftest import FAST_ENV, DaemonProcess, make_image
from prometheus_client.parser import text_string_to_metric_families
from test_review_api import auth, make_token

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
KEYS = {"generated_at", "files", "quarantine", "inbox_pending", "studies", "queue", "gate",
        "decisions_24h", "model", "retrain", "disk", "series"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A daemon after real traffic: 3 studies routed (cold start), 1 labeled, 1 junk file."""
    home = tmp_path_factory.mktemp("ops_status") / "home"
    # label_rate 1: every cold-start study is routed (the queue numbers below rely on it)
    env = {**FAST_ENV, "TRIAGE__RETRAIN__ENABLED": "false", "TRIAGE__GATE__LABEL_RATE": "1.0"}
    proc = DaemonProcess(home, env, []).start()
    for i in range(3):
        make_image(proc.inbox / f"{i}.dcm", study_uid=f"2.25.{800 + i}", seed=i)
    (proc.inbox / "junk.dcm").write_bytes(b"\x00" * 300)
    proc.wait_for(lambda s: s["studies"]["scored"] == 3 and s["files"]["quarantined"] == 1,
                  45, "three scored studies and one quarantined file")
    tokens = {role: make_token(proc, role, f"{role} user")
              for role in ("ops", "radiologist", "admin")}
    client = httpx.Client(base_url=proc.url, timeout=10)
    claimed = client.post("/api/queue/next", headers=auth(tokens["radiologist"]))
    assert claimed.status_code == 200, claimed.text
    assert client.post(f"/api/studies/{claimed.json()['study_id']}/label",
                       json={"label": "pneumonia"},
                       headers=auth(tokens["radiologist"])).status_code == 201
    yield proc, client, tokens
    client.close()
    proc.stop(signal.SIGKILL)


def _metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_summary_needs_an_ops_or_admin_token(server) -> None:
    proc, client, tokens = server
    missing = client.get("/api/ops/summary")
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["detail"]
    assert client.get("/api/ops/summary", headers=auth("trg_nope")).status_code == 401
    refused = client.get("/api/ops/summary", headers=auth(tokens["radiologist"]))
    assert refused.status_code == 403 and "ops or admin" in refused.json()["detail"]
    assert client.get("/api/ops/summary", headers=auth(tokens["admin"])).status_code == 200
    page = client.get("/status")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/status.js", "/static/status.css"):
        assert client.get(asset).status_code == 200, asset


def test_summary_numbers_match_the_store_and_metrics(server) -> None:
    proc, client, tokens = server
    before = time.time()
    summary = client.get("/api/ops/summary", headers=auth(tokens["ops"])).json()
    status = proc.status()
    metrics = client.get("/metrics").text
    between = time.time() - before  # the summary and the scrape are this far apart at most
    assert KEYS <= set(summary)
    assert summary["generated_at"] >= before
    assert summary["files"] == status["files"]
    assert summary["files"]["archived"] == 3 and summary["files"]["quarantined"] == 1
    assert summary["quarantine"] == {"not_dicom": 1}
    assert _metric(metrics, "triage_quarantined_files", reason="not_dicom") == 1
    assert {k: v for k, v in summary["studies"].items()} == status["studies"]
    queue = summary["queue"]
    assert {k: queue[k] for k in ("pending", "claimed", "labeled")} == status["queue"]
    assert queue == {"pending": 2, "claimed": 0, "labeled": 1,
                     "oldest_pending_seconds": pytest.approx(queue["oldest_pending_seconds"])}
    assert 0 < queue["oldest_pending_seconds"] < 120
    # the same item's age, read twice: the later scrape sees it older by the time between
    aged = _metric(metrics, "triage_queue_oldest_pending_seconds") - queue["oldest_pending_seconds"]
    assert -1 <= aged <= between + 1
    decisions = summary["decisions_24h"]
    assert decisions["total"] == 3 and decisions["routed"] == 3
    assert decisions["by_reason"] == {"cold_start": 3}
    assert decisions["queued_by_reason"] == {"cold_start": 3}
    assert decisions["by_reason"]["cold_start"] == _metric(
        metrics, "triage_gate_decisions_total", reason="cold_start")
    gate = summary["gate"]
    assert gate["label_rate_target"] == 1.0 and gate["routed_fraction_24h"] == 1.0
    assert gate["routed_fraction"] == _metric(metrics, "triage_gate_routed_fraction")
    serving = summary["model"].pop("serving")  # cold start: nothing to load, nothing wrong
    assert serving | {"since": 0} == {"registry_version": None, "served_version": None,
                                      "ok": True, "reason": None, "detail": None, "since": 0}
    assert summary["model"] == {"serving_version": None, "registry_version": None,
                                "promoted_at": None, "validation_auroc": None,
                                "audit_accuracy": None, "audit_samples": 0,
                                "operating_point": None}
    assert summary["retrain"]["enabled"] is False and summary["retrain"]["last_run"] is None
    assert summary["retrain"]["labels_since_last_run"] in (0, 1)  # split set by retraining
    disk = summary["disk"]
    assert disk["ingest_paused"] is False and disk["free_bytes"] > 0
    assert disk["free_bytes"] == pytest.approx(
        _metric(metrics, "triage_state_dir_free_bytes"), rel=0.05)
    assert summary["inbox_pending"] == 0
    series = summary["series"]
    hours = series["hour_starts"]
    assert len(hours) == 24 and hours[-1] <= summary["generated_at"] < hours[-1] + 3600
    assert all(b - a == 3600 for a, b in zip(hours, hours[1:], strict=False))
    assert sum(series["files_ingested"]) == 3 and sum(series["files_quarantined"]) == 1
    assert sum(series["decisions"]) == 3 and sum(series["decisions_routed"]) == 3
    assert sum(series["labels"]) == 1
    assert series["files_ingested"][-1] + series["files_ingested"][-2] == 3  # this hour or last


def _browser():
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium not found (make test installs the Debian package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python Playwright not installed (pip install -e '.[test]')")
    return sync_playwright


def test_status_page_signs_in_and_shows_the_figures(server, tmp_path: Path) -> None:
    proc, client, tokens = server
    sync_playwright = _browser()
    shots = Path(os.environ.get("TRIAGE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda request: requests.append(request.url))
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{proc.url}/status")
            page.wait_for_selector("#sign-in:not([hidden])")
            page.fill("#token", tokens["radiologist"])
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("#sign-in-error:has-text('ops or admin')")
            page.fill("#token", tokens["ops"])
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("body[data-loaded=true]", timeout=15000)
            text = {key: page.text_content(f'[data-k="{key}"]') for key in (
                "files.archived", "files.quarantined", "queue.pending", "queue.labeled",
                "serving_version", "ingest_state", "label_rate_target", "decisions_total",
                "operating_point", "strategy")}
            assert text == {
                "files.archived": "3", "files.quarantined": "1", "queue.pending": "2",
                "queue.labeled": "1", "serving_version": "none (cold start)",
                "ingest_state": "running", "label_rate_target": "100.0 %",
                "decisions_total": "3 (3 routed)", "operating_point": "–",
                "strategy": "combined"}
            assert page.text_content("#who-name") == "ops user (ops)"
            assert "cold_start" in page.text_content("#reasons")
            assert page.text_content('[data-k="routed_fraction"]') == "– (cold start)"
            assert not page.is_visible('[data-k="registry_version"]')  # nothing differs
            assert page.locator("#flags .flag").count() == 0  # nothing wrong in cold start
            for chart in ("chart-files", "chart-decisions", "chart-labels"):
                assert page.locator(f"#{chart} svg rect.bar:not(.part)").count() == 24
            stored = page.evaluate("sessionStorage.getItem('triage.token')")
            assert stored == tokens["ops"]
            page.screenshot(path=str(shots / "status.png"), full_page=True)
            page.click("#sign-out")
            page.wait_for_selector("#sign-in:not([hidden])")
            assert page.evaluate("sessionStorage.getItem('triage.token')") is None
            assert not errors, errors
        finally:
            browser.close()
    assert all(url.startswith(proc.url) for url in requests), "the page reached off-host"
