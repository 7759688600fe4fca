"""A real study flows from the inbox to a stored, explainable gate decision."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
from conftest import FAST_ENV, REPO, DaemonProcess, make_image

from triage.config import load_settings
from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network


def _decisions(proc: DaemonProcess) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{proc.home / 'triage.db'}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM decisions ORDER BY id").fetchall()
    finally:
        conn.close()


def test_cold_start_routes_up_to_the_daily_cap(tmp_path: Path) -> None:
    env = {**FAST_ENV, "TRIAGE__GATE__DAILY_CAP": "3", "TRIAGE__GATE__EXPLORATION_RATE": "0"}
    proc = DaemonProcess(tmp_path / "home", env, []).start()
    try:
        for i in range(5):
            make_image(proc.inbox / f"{i}.dcm", study_uid=f"2.25.{i + 10}", seed=i)
        proc.wait_for(lambda s: s["studies"]["scored"] == 5, 40, "five studies scored")
        rows = _decisions(proc)
        assert [r["reason"] for r in rows] == ["cold_start"] * 3 + ["cap_reached"] * 2
        assert [r["needs_label"] for r in rows] == [1, 1, 1, 0, 0]
        assert all(r["model_version"] is None and r["scores"] is None for r in rows)
        metrics = httpx.get(f"{proc.url}/metrics", timeout=5).text
        assert 'triage_gate_decisions_total{reason="cold_start"} 3.0' in metrics
        assert 'triage_gate_decisions_total{reason="cap_reached"} 2.0' in metrics
    finally:
        proc.stop(signal.SIGKILL)


def test_imported_model_scores_studies_and_every_decision_is_explained(tmp_path: Path) -> None:
    settings = load_settings(REPO / "config.yaml", environ={})
    net, lossnet = build_network(settings.model), build_loss_predictor(settings.model)
    checkpoint = save_checkpoint(tmp_path / "init.pt", net, lossnet, settings.model,
                                 {"note": "untrained, for the test"})
    env = {**FAST_ENV, "TRIAGE__GATE__WARMUP": "3", "TRIAGE__GATE__WINDOW": "20"}
    proc = DaemonProcess(tmp_path / "home", env, [])
    proc.home.mkdir(parents=True)
    imported = subprocess.run(
        [sys.executable, "-m", "triage", "models", "import", str(checkpoint), "--promote",
         "--config", str(REPO / "config.yaml")],
        env=proc.env, capture_output=True, text=True,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "v0001 serving"
    proc.start()
    try:
        for i in range(8):
            make_image(proc.inbox / f"{i}.dcm", study_uid=f"2.25.{i + 50}", seed=i)
        # a two-image study: both images scored, the result is per study
        make_image(proc.inbox / "x1.dcm", study_uid="2.25.99", seed=20)
        make_image(proc.inbox / "x2.dcm", study_uid="2.25.99", seed=21)
        proc.wait_for(lambda s: s["studies"]["scored"] == 9, 60, "nine studies scored")
        rows = _decisions(proc)
        assert len(rows) == 9
        for row in rows:
            assert row["model_version"] == "v0001"
            scores = json.loads(row["scores"])
            assert set(scores) == {"uncertainty", "predicted_loss"}
            probabilities = json.loads(row["prediction"])["probabilities"]
            assert set(probabilities) == {"normal", "pneumonia"}
            assert abs(sum(probabilities.values()) - 1) < 1e-5
            assert set(json.loads(row["uncertainty"])) >= {"entropy", "bald", "margin"}
            assert json.loads(row["decision"])["reason"] == row["reason"]
        assert [r["sequence"] for r in rows] == list(range(9))
        assert max(r["images_scored"] for r in rows) == 2
        scored = [r for r in rows if r["quantiles"] is not None]
        assert scored and all(r["threshold"] is not None for r in scored)
        metrics = httpx.get(f"{proc.url}/metrics", timeout=5).text
        for stage in ("trunk", "mc", "lossnet"):
            assert f'triage_inference_seconds_count{{stage="{stage}"}} 9.0' in metrics
        assert "triage_gate_label_rate_target 0.2" in metrics
    finally:
        proc.stop(signal.SIGKILL)


def test_a_checkpoint_that_does_not_fit_is_refused_by_name(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "triage", "models", "import", str(bad), "--home",
         str(tmp_path / "home"), "--config", str(REPO / "config.yaml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "bad.pt" in result.stderr and "Traceback" not in result.stderr
