"""RetrainCollector: gauges read from the store at scrape time."""

from __future__ import annotations

import json
import time

import torch
from prometheus_client import CollectorRegistry, generate_latest

from triage.store import db as store
from triage.training.collector import RetrainCollector

from .conftest import Store, make_settings


def _scrape(st: Store) -> dict[str, float]:
    registry = CollectorRegistry()
    path = st.settings.database()
    registry.register(RetrainCollector(lambda: store.connect(path, readonly=True),
                                       st.settings.model.labels))
    text = generate_latest(registry).decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_retrain_metrics_follow_the_store(tmp_path):
    st = Store(make_settings(tmp_path))
    values = _scrape(st)
    assert values["triage_retrain_running"] == 0 and values["triage_labels_since_retrain"] == 0
    now = time.time()
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, finished_at) VALUES "
                  "('labels', 'promoted', ?, ?)", [now - 100, now - 40])
    st.db.execute("INSERT INTO retrain_runs (trigger, state, started_at, progress, pid) VALUES "
                  "('manual', 'running', ?, 0.4, 1)", [now - 10])
    st.db.execute("INSERT INTO models (version, status, path, source, created_at, metrics) "
                  "VALUES ('v0001', 'serving', 'x', 'retrain:1', 0, ?)",
                  [json.dumps({"validation": {"auroc": 0.93}})])
    st.label(st.add_study(torch.zeros(1, 1, 28, 28)), "normal", "train")
    values = _scrape(st)
    assert values['triage_retrain_runs{result="promoted"}'] == 1
    assert values['triage_retrain_runs{result="running"}'] == 1
    assert values['triage_retrain_runs{result="failed"}'] == 0
    assert values["triage_retrain_running"] == 1 and values["triage_retrain_progress"] == 0.4
    assert values["triage_retrain_duration_seconds_count"] == 1
    assert values["triage_retrain_duration_seconds_sum"] == 60
    assert values["triage_retrain_last_duration_seconds"] == 60
    assert values["triage_retrain_last_run_timestamp_seconds"] == now - 10
    # the model gauges are the ops collector's, for the model the scorer serves
    assert not any(name.startswith("triage_model") for name in values)
    assert values["triage_labels_since_retrain"] == 1
    assert not any(name.endswith("_total") for name in values)
