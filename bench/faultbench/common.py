"""Settings every fault scenario shares, and direct reads and writes of a daemon's store."""

from __future__ import annotations

import json
from pathlib import Path

from faults_support import FAST_ENV, connect_ro, store_exists, store_of

from triage.store import db as store


LABEL_RATE = 0.3
LEASE_SECONDS = 6.0
RETRY_WAITS = (1.0, 2.0)
SETTLE_SECONDS = 60.0
LOCK_SECONDS = 10.0


# Every scenario: short settle and stable ages, a tiny network (fast scoring and
# training), a short lease and error backoff so recovery is seen within a trial.
BASE_ENV = {
    **FAST_ENV,
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "1",
    "TRIAGE__GATE__LABEL_RATE": str(LABEL_RATE),
    "TRIAGE__GATE__WARMUP": "5",
    "TRIAGE__GATE__WINDOW": "50",
    "TRIAGE__RETRAIN__ENABLED": "false",
    "TRIAGE__STUDIES__ERROR_RETRY_SECONDS": json.dumps(list(RETRY_WAITS)),
    "TRIAGE__REVIEW__LEASE_MINUTES": str(LEASE_SECONDS / 60),
    "TRIAGE__MODEL__INPUT_SIZE": "32",
    "TRIAGE__MODEL__CHANNELS": "[8, 16]",
    "TRIAGE__MODEL__SUBUNITS": "1",
    "TRIAGE__MODEL__LOSSNET_WIDTH": "16",
    "TRIAGE__MODEL__MC_SAMPLES": "5",
    "TRIAGE__MODEL__TRAINING__EPOCHS": "1",
    "TRIAGE__MODEL__TRAINING__MIN_STEPS": "0",
    "TRIAGE__MODEL__TRAINING__BATCH_SIZE": "16",
    "TRIAGE__RETRAIN__MIN_NEW_LABELS": "6",
    "TRIAGE__RETRAIN__MIN_TRAIN_STUDIES": "4",
    "TRIAGE__RETRAIN__MIN_VALIDATION_STUDIES": "2",
    "TRIAGE__RETRAIN__VALIDATION_SOURCE": "mixed",
    "TRIAGE__RETRAIN__VALIDATION_FRACTION": "0.4",
    "TRIAGE__RETRAIN__AUGMENT": "false",
    "TRIAGE__RETRAIN__COVERAGE_QUERIES": "2",
}


RETRAIN_ENV = {
    "TRIAGE__RETRAIN__ENABLED": "true",
    "TRIAGE__GATE__LABEL_RATE": "1.0",  # every study is routed, so every one can be labelled
    "TRIAGE__GATE__EXPLORATION_RATE": "0",
}


CLASSES = ("normal", "pneumonia")


def read_rows(home: Path, sql: str, params: list | None = None) -> list[tuple]:
    if not store_exists(home):
        return []
    conn = connect_ro(home)
    try:
        return [tuple(row) for row in conn.execute(sql, params or []).fetchall()]
    finally:
        conn.close()


def write_sql(home: Path, sql: str, params: list | None = None) -> None:
    db = store.connect(store_of(home))
    try:
        with store.transaction(db):
            db.execute(sql, params or [])
    finally:
        db.close()
