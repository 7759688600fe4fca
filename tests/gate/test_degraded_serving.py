"""Degraded serving, loud and safe: a serving checkpoint that cannot be loaded (a file
corrupted on disk) never sends the daemon back to cold start. The last promoted version
that loads serves, and the store, status, status page data, metrics and log say which
and why; when none loads, studies wait unscored and unrouted until one loads again. A
restart keeps the gate's pending budget offset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from test_scorer import TINY, Home

from triage.api.app import create_app
from triage.api.ops_status import build_summary
from triage.daemon import Daemon
from triage.gate.worker import ScoringWorker
from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelError
from triage.model.serving import LOAD_FAILURE_REASONS, RETRY_SECONDS, failure_reason
from triage.model.serving_state import read_serving_status
from triage.model.settings import ModelSettings
from triage.ops.status import collect_status, format_status
from triage.review.auth import create_token


def _checkpoint(home: Home, version: str) -> Path:
    return home.settings.path("models") / version / "checkpoint.pt"


def _corrupt(path: Path) -> bytes:
    """Damage a checkpoint file on disk as a failed write or disk error would: its second
    half (with the zip directory) becomes garbage. Returns the good bytes."""
    good = path.read_bytes()
    half = len(good) // 2
    path.write_bytes(good[:half] + b"\x00garbage" * ((len(good) - half) // 8))
    return good


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


def _rows(home: Home, sql: str, params: list | None = None) -> list[dict]:
    return list(home.db.query(sql, params or []))


def test_a_corrupt_serving_checkpoint_falls_back_to_the_last_promoted_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, exploration_rate=0.0)
    older = home.promote(seed=1)
    newer = home.promote(seed=2)
    good = _corrupt(_checkpoint(home, newer))

    rows = home.score(home.scorer(), 6)  # a restart: the scorer loads the model afresh
    assert [r["model_version"] for r in rows] == [older] * 6
    assert "cold_start" not in {r["reason"] for r in rows}
    assert all(r["status"] != "error" for r in rows)

    (failed,) = _events(caplog, "model_load_failed")  # retries (each minute) log at DEBUG
    assert (failed.version, failed.reason, failed.levelno) == (newer, "corrupt", logging.ERROR)
    (degraded,) = _events(caplog, "serving_degraded")
    assert (degraded.registry_version, degraded.served_version) == (newer, older)
    for record in (failed, degraded):  # ids and codes only: no path in the log
        assert str(tmp_path) not in json.dumps(record.__dict__, default=str)
    assert home.prometheus.get_sample_value("triage_serving_model_ok") == 0
    # one attempt at the restart, then one per RETRY_SECONDS (the test clock: 60 s a study)
    assert home.prometheus.get_sample_value(
        "triage_serving_model_load_failures_total", {"reason": "corrupt"}) == 6

    stored = read_serving_status(home.db)
    assert (stored.registry_version, stored.served_version, stored.ok, stored.reason) == (
        newer, older, False, "corrupt")
    assert f"{newer} cannot be loaded (corrupt" in stored.detail and str(tmp_path) not in (
        stored.detail)
    status = collect_status(home.settings)
    assert status["serving"]["served_version"] == older and not status["serving"]["ok"]
    assert "DEGRADED" in format_status(status) and "corrupt" in format_status(status)
    summary = build_summary(home.db, home.settings, {}, home.now)
    assert summary["model"]["serving"]["reason"] == "corrupt"
    assert summary["model"]["serving"]["served_version"] == older

    # the file is restored: after the retry delay the registry's version serves again
    _checkpoint(home, newer).write_bytes(good)
    home.now += RETRY_SECONDS
    again = home.score(home.scorer(), 2)
    assert [r["model_version"] for r in again] == [newer] * 2
    assert home.prometheus.get_sample_value("triage_serving_model_ok") == 1
    assert _events(caplog, "serving_restored")
    assert read_serving_status(home.db).ok


def test_when_no_promoted_version_loads_studies_wait_then_are_scored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, exploration_rate=0.0)
    version = home.promote(seed=1)
    good = _corrupt(_checkpoint(home, version))
    scorer = home.scorer()
    worker = ScoringWorker(home.db, scorer, home.metrics, clock=lambda: home.now)
    ids = [home.add_study() for _ in range(4)]
    for study_id in ids:
        assert worker.run_once() == study_id
        home.now += 1
    assert worker.run_once() is None

    states = _rows(home, "SELECT state FROM studies ORDER BY id")
    assert [r["state"] for r in states] == ["waiting_model"] * 4
    for table in ("decisions", "queue_items", "study_results"):  # neither scored nor routed
        assert home.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table
    assert home.prometheus.get_sample_value("triage_serving_model_ok") == 0
    assert home.prometheus.get_sample_value(
        "triage_scoring_studies_total", {"status": "waiting_model"}) == 4
    (unavailable,) = _events(caplog, "serving_unavailable")
    assert unavailable.served_version is None and unavailable.reason == "corrupt"
    stored = read_serving_status(home.db)
    assert (stored.served_version, stored.ok) == (None, False)
    assert "studies wait" in stored.detail
    assert collect_status(home.settings)["studies"]["waiting_model"] == 4

    _checkpoint(home, version).write_bytes(good)  # the operator restores the file
    home.now += RETRY_SECONDS
    assert [worker.run_once() for _ in ids] == ids  # oldest first
    rows = _rows(home, "SELECT model_version, reason FROM decisions ORDER BY id")
    assert [r["model_version"] for r in rows] == [version] * 4
    assert "cold_start" not in {r["reason"] for r in rows}
    states = _rows(home, "SELECT state FROM studies ORDER BY id")
    assert [r["state"] for r in states] == ["scored"] * 4
    assert _events(caplog, "studies_released_model_available")[0].studies == 4
    assert home.prometheus.get_sample_value("triage_serving_model_ok") == 1


def test_a_model_load_is_retried_after_the_wall_clock_stepped_back(tmp_path: Path) -> None:
    """A failed load is retried RETRY_SECONDS later; a backward step of the wall clock
    must not add its size to that wait while studies wait for a model."""
    home = Home(tmp_path, exploration_rate=0.0)
    version = home.promote(seed=1)
    good = _corrupt(_checkpoint(home, version))
    worker = ScoringWorker(home.db, home.scorer(), home.metrics, clock=lambda: home.now)
    study = home.add_study()
    assert worker.run_once() == study
    assert home.db.execute("SELECT state FROM studies").fetchone() == ("waiting_model",)
    _checkpoint(home, version).write_bytes(good)  # the operator restores the file...
    home.now -= 3600  # ...and NTP steps the clock back an hour
    assert worker.run_once() == study
    assert home.db.execute("SELECT state FROM studies").fetchone() == ("scored",)


def _offset_run(home: Home, *, restart: bool) -> tuple[list[tuple[str, int]], int]:
    """Score, route three coverage queries, (restart,) score on; decisions after."""
    home.promote(seed=1)
    scorer = home.scorer()
    first = home.score(scorer, 12)
    picks = [r["study_id"] for r in first if not r["needs_label"]][:3]
    home.db.execute(
        "INSERT INTO retrain_runs (trigger, state, started_at, metrics) "
        "VALUES ('manual', 'promoted', ?, ?)",
        [home.now, json.dumps({"coverage_picks": picks})])
    assert scorer.route_coverage() == 3
    assert scorer.gate.pending_offset == 3
    if restart:
        scorer = home.scorer()
    pending = scorer.gate.pending_offset
    rows = home.score(scorer, 30)
    return [(r["reason"], r["needs_label"]) for r in rows], pending


def test_a_restart_keeps_the_pending_budget_offset(tmp_path: Path) -> None:
    gate = {"exploration_rate": 0.0, "label_rate": 0.3, "warmup": 5, "window": 20}
    straight, _ = _offset_run(Home(tmp_path / "one", **gate), restart=False)
    restarted, pending = _offset_run(Home(tmp_path / "two", **gate), restart=True)
    assert pending == 3
    assert [reason for reason, _ in straight].count("budget_offset") == 3
    assert restarted == straight  # same studies, same decisions across the restart


def test_load_failures_are_named_by_a_closed_set_of_reasons(tmp_path: Path) -> None:
    home = Home(tmp_path)
    missing, corrupt, incompatible = (home.promote(seed=s) for s in (1, 2, 3))
    _checkpoint(home, missing).unlink()
    _corrupt(_checkpoint(home, corrupt))
    other = ModelSettings(input_size=32, channels=(4, 8, 8), subunits=1, lossnet_width=8)
    torch.manual_seed(0)
    save_checkpoint(_checkpoint(home, incompatible), build_network(other),
                    build_loss_predictor(other), other)
    for version, expected in ((missing, "missing"), (corrupt, "corrupt"),
                              (incompatible, "incompatible")):
        with pytest.raises(ModelError) as caught:
            home.models.load(version)
        assert failure_reason(caught.value) == expected, version
        assert expected in LOAD_FAILURE_REASONS


def _promote_with(home: Home, seed: int, auroc: float, point: dict) -> str:
    """Promote an untrained model with a recorded validation AUROC and operating point."""
    torch.manual_seed(seed)
    path = save_checkpoint(home.settings.home / f"m{seed}.pt", build_network(TINY),
                           build_loss_predictor(TINY), TINY, {"operating_point": point})
    version = home.models.add(path, source="test",
                              metrics={"validation": {"auroc": auroc}}).version
    home.models.promote(version)
    return version


def test_status_page_summary_and_gauges_show_the_served_model_beside_the_registrys(
    tmp_path: Path
) -> None:
    """The registry's serving checkpoint is corrupt, so an older version serves: the
    summary, the gauges and the status page show the served version with its own AUROC
    and operating point, and the registry's version beside it; once the file is restored
    the two agree again and the registry's version is no longer shown apart."""
    home = Home(tmp_path, exploration_rate=0.0)
    older = _promote_with(home, 1, 0.81, {"temperature": 1.5, "threshold": 0.3})
    newer = _promote_with(home, 2, 0.93, {"temperature": 0.5, "threshold": 0.7})
    good = _corrupt(_checkpoint(home, newer))
    rows = home.score(home.scorer(), 2)
    assert [r["model_version"] for r in rows] == [older] * 2  # for real: the older serves
    promoted = {v: home.models.get(v).promoted_at for v in (older, newer)}

    _, token = create_token(home.db, name="Ops", role="ops")
    client = TestClient(create_app(Daemon(home.settings)))
    client.headers["Authorization"] = f"Bearer {token}"
    model = client.get("/api/ops/summary").json()["model"]
    assert model["serving_version"] == older and model["registry_version"] == newer
    assert model["validation_auroc"] == 0.81 and model["promoted_at"] == promoted[older]
    assert model["operating_point"] == {"temperature": 1.5, "threshold": 0.3}
    assert (model["serving"]["served_version"], model["serving"]["ok"]) == (older, False)
    assert build_summary(home.db, home.settings, {}, home.now)["model"] == model

    gauges = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(client.get("/metrics").text)
              for s in f.samples if s.name.startswith("triage_model")}
    assert gauges[("triage_model_info", (("version", older),))] == 1
    assert gauges[("triage_model_registry_info", (("version", newer),))] == 1
    assert ("triage_model_info", (("version", newer),)) not in gauges
    assert gauges[("triage_model_validation_auroc", ())] == 0.81
    assert gauges[("triage_model_temperature", ())] == 1.5
    assert gauges[("triage_model_decision_threshold", ())] == 0.3
    assert gauges[("triage_model_promoted_timestamp_seconds", ())] == promoted[older]

    shown = _status_page(client, token)
    assert shown["serving_version"] == older
    assert shown["registry_version"] == newer and shown["registry_visible"]
    assert shown["validation_auroc"] == "0.810"
    assert shown["operating_point"] == "threshold 0.300, temperature 1.50"

    _checkpoint(home, newer).write_bytes(good)  # restored: the registry's version serves
    home.now += RETRY_SECONDS
    assert [r["model_version"] for r in home.score(home.scorer(), 1)] == [newer]
    model = client.get("/api/ops/summary").json()["model"]
    assert model["serving_version"] == model["registry_version"] == newer
    assert model["validation_auroc"] == 0.93
    assert model["operating_point"] == {"temperature": 0.5, "threshold": 0.7}
    metrics = client.get("/metrics").text
    assert f'triage_model_info{{version="{newer}"}} 1.0' in metrics
    assert f'triage_model_registry_info{{version="{newer}"}} 1.0' in metrics
    shown = _status_page(client, token)
    assert shown["serving_version"] == newer and not shown["registry_visible"]


def _status_page(client: TestClient, token: str) -> dict[str, object]:
    """The status page in Chromium, every request answered by the app in process."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium not found (make test installs the Debian package)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    base = "http://triage.test"

    def answer(route) -> None:
        request = route.request
        got = client.request(request.method, request.url.removeprefix(base),
                             headers={k: v for k, v in request.headers.items()
                                      if k.lower() == "authorization"})
        route.fulfill(status=got.status_code, body=got.content,
                      headers={k: v for k, v in got.headers.items()
                               if k.lower() not in ("content-length", "content-encoding")})

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.route(f"{base}/**", answer)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/status")
            page.wait_for_selector("#sign-in:not([hidden])")
            page.fill("#token", token)
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("body[data-loaded=true]", timeout=15000)
            shown: dict[str, object] = {key: page.text_content(f'[data-k="{key}"]') for key in (
                "serving_version", "registry_version", "validation_auroc", "operating_point")}
            shown["registry_visible"] = page.is_visible('[data-k="registry_version"]')
            assert not errors, errors
            return shown
        finally:
            browser.close()
