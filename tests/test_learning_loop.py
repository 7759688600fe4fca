"""The whole loop through the real daemon: real X-rays in, labels back through the API,
an automatic retrain in a subprocess, promotion, scoring by the new model, coverage."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import FAST_ENV, DaemonProcess, store_rows, store_target
from test_review_api import auth, make_token

from triage.replay.datasets import find_data_dir, load_pneumoniamnist_dev
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store

LOOP_ENV = {
    **FAST_ENV,
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "1",
    "TRIAGE__MODEL__INPUT_SIZE": "32",
    "TRIAGE__MODEL__CHANNELS": "[8, 16]",
    "TRIAGE__MODEL__SUBUNITS": "1",
    "TRIAGE__MODEL__MC_SAMPLES": "5",
    "TRIAGE__MODEL__TRAINING__EPOCHS": "4",
    "TRIAGE__MODEL__TRAINING__MIN_STEPS": "0",
    "TRIAGE__MODEL__TRAINING__BATCH_SIZE": "16",
    "TRIAGE__GATE__DAILY_CAP": "48",
    # cold start routes at label_rate: all of the first 40 studies, so they can be labelled
    "TRIAGE__GATE__LABEL_RATE": "1.0",
    "TRIAGE__GATE__EXPLORATION_RATE": "0",
    "TRIAGE__GATE__WARMUP": "5",
    "TRIAGE__GATE__WINDOW": "20",
    "TRIAGE__RETRAIN__MIN_NEW_LABELS": "36",
    "TRIAGE__RETRAIN__MIN_TRAIN_STUDIES": "10",
    "TRIAGE__RETRAIN__VALIDATION_SOURCE": "mixed",
    "TRIAGE__RETRAIN__MIN_VALIDATION_STUDIES": "4",
    "TRIAGE__RETRAIN__COVERAGE_QUERIES": "3",
}


def _rows(proc: DaemonProcess, sql: str) -> list[dict]:
    return store_rows(proc.home, sql, dicts=True)


def _drop(proc: DaemonProcess, images: np.ndarray, start: int) -> list[str]:
    uids = []
    for i, pixels in enumerate(images):
        uid = f"2.25.{90000 + start + i}"
        ds = image_dataset(
            pixels.astype(np.uint8), modality="DX", study_uid=uid, patient_name="PNEUMO^TEST"
        )
        write_dataset(ds, proc.inbox / f"{start + i}.dcm")
        uids.append(uid)
    return uids


def test_labels_retrain_promote_score_and_coverage(tmp_path: Path) -> None:
    if find_data_dir() is None:
        pytest.skip("PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place it in ../shared/data")
    data = load_pneumoniamnist_dev()
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(data["train_labels"]))[:50]
    images, truth = data["train_images"][pick], data["train_labels"][pick, 0]
    names = ["normal", "pneumonia"]
    proc = DaemonProcess(tmp_path / "home", LOOP_ENV, []).start()
    try:
        uids = _drop(proc, images[:40], 0)
        proc.wait_for(lambda s: s["queue"]["pending"] == 40, 60, "40 studies queued")
        token = make_token(proc, "radiologist", "Oracle")
        client = httpx.Client(base_url=proc.url, timeout=10)
        by_uid = dict(zip(uids, truth[:40], strict=True))
        uid_of = {
            row["id"]: row["study_uid"] for row in _rows(proc, "SELECT id, study_uid FROM studies")
        }
        for _ in range(40):
            claimed = client.post("/api/queue/next", headers=auth(token))
            assert claimed.status_code == 200
            study = claimed.json()["study_id"]
            answer = names[int(by_uid[uid_of[study]])]
            assert (
                client.post(
                    f"/api/studies/{study}/label", json={"label": answer}, headers=auth(token)
                ).status_code
                == 201
            )
        splits = _rows(proc, "SELECT split, COUNT(*) AS n FROM labels GROUP BY split")
        assert {row["split"]: row["n"] for row in splits}["validation"] >= 4
        # the daemon notices 36+ new labels, trains in a subprocess, promotes the first model
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            runs = _rows(proc, "SELECT state, message, candidate_version FROM retrain_runs")
            if runs and runs[-1]["state"] not in ("running",):
                break
            time.sleep(1)
        assert runs and runs[-1]["state"] == "promoted", [dict(r) for r in runs]
        status = proc.status()
        assert status["retrain"]["serving_version"] == runs[-1]["candidate_version"]
        version = runs[-1]["candidate_version"]
        metrics = json.loads(
            _rows(proc, f"SELECT metrics FROM models WHERE version = '{version}'")[0]["metrics"]
        )
        # recorded, not judged: 31 training labels and 4 epochs are no quality figure
        assert 0.0 <= metrics["validation"]["auroc"] <= 1.0
        validation = {
            r["id"] for r in _rows(proc, "SELECT id FROM labels WHERE split = 'validation'")
        }
        summary = json.loads(
            _rows(proc, f"SELECT data_summary FROM models WHERE version = '{version}'")[0][
                "data_summary"
            ]
        )
        assert set(summary["validation"]["label_ids"]) == validation
        assert not validation & set(summary["train"]["label_ids"])
        assert summary["train"]["studies"] + summary["validation"]["studies"] == 40

        # an admin lowers the label rate (a restart), and new studies are scored by the
        # promoted model
        proc.stop(signal.SIGTERM)
        proc = DaemonProcess(tmp_path / "home", {**LOOP_ENV, "TRIAGE__GATE__LABEL_RATE": "0.2"},
                             []).start()
        client = httpx.Client(base_url=proc.url, timeout=10)
        _drop(proc, images[40:], 40)
        proc.wait_for(lambda s: s["studies"]["scored"] >= 50, 60, "new studies scored")
        new = _rows(
            proc,
            "SELECT model_version, reason, needs_label FROM decisions ORDER BY id DESC LIMIT 10",
        )
        assert all(r["model_version"] == version for r in new)
        unrouted = sum(1 for r in new if not r["needs_label"])
        assert unrouted > 0  # warm-up routes at the label rate, not everything

        exposition = client.get("/metrics").text
        assert "triage_model_validation_auroc" in exposition
        assert 'triage_retrain_runs{result="promoted"} 1.0' in exposition

        # a promoted run routes the studies least like anything labelled, within the cap
        db = store.connect(store_target(proc.home))
        db.execute(
            "INSERT INTO retrain_runs (trigger, state, started_at, finished_at, "
            "candidate_version) VALUES ('manual', 'promoted', ?, ?, ?)",
            [time.time(), time.time(), version],
        )
        db.close()
        deadline = time.monotonic() + 20
        coverage = []
        while time.monotonic() < deadline and not coverage:
            coverage = _rows(proc, "SELECT study_id FROM queue_items WHERE reason = 'coverage'")
            time.sleep(0.5)
        routed_today = len(_rows(proc, "SELECT id FROM queue_items"))
        assert 1 <= len(coverage) <= min(3, unrouted) and routed_today <= 48
        why = client.get(f"/api/studies/{coverage[0]['study_id']}/why", headers=auth(token))
        assert why.json()["reason"] == "coverage" and "core-set" in why.json()["explanation"]
    finally:
        proc.stop(signal.SIGKILL)
