"""A real SQLite store with studies, images, queue items and labels built row by row."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
import torch

from conftest import store_settings

from triage.config import Settings
from triage.model.settings import ModelSettings, TrainSettings
from triage.replay.datasets import find_data_dir, images_to_tensor, load_pneumoniamnist_dev
from triage.store import db as store
from triage.store.images import to_storage
from triage.training.settings import RetrainSettings

FULL_SCALE = os.environ.get("TRIAGE_FULL_SCALE") == "1"
SIZE = 28
TINY_MODEL = ModelSettings(
    input_size=SIZE, channels=(8, 16), subunits=1, lossnet_width=16, mc_samples=5,
    training=TrainSettings(epochs=6, min_steps=0, batch_size=32, learning_rate=3e-3, seed=0),
)


def make_settings(home: Path, model: ModelSettings = TINY_MODEL, **retrain: object) -> Settings:
    """Settings with every path under ``home`` and a tiny network."""
    options = {"augment": False, "min_train_studies": 4, "min_validation_studies": 2,
               "validation_source": "mixed", **retrain}
    return Settings(home=home, store=store_settings(home), model=model,
                    retrain=RetrainSettings(**options))


class Store:
    """Builds rows the way ingestion, the gate and the review queue would."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: sqlite_utils.Database = store.connect(settings.database())
        self._n = 0
        with store.transaction(self.db):
            self.token = self.db.execute(
                "INSERT INTO tokens (name, role, token_hash, created_at) VALUES "
                "('test', 'radiologist', 'hash', 0)").lastrowid

    def add_study(self, images: torch.Tensor, state: str = "scored") -> int:
        """A study with one single-frame instance per image [k, 1, S, S]."""
        self._n += 1
        now = time.time()
        with store.transaction(self.db):
            study_id = self.db.execute(
                "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, "
                "completed_at, n_instances, n_images, round) VALUES (?, ?, ?, ?, ?, ?, ?, 1)",
                [f"1.2.826.0.1.{self._n}", state, now, now, now + self._n, len(images),
                 len(images)]).lastrowid
            for k, image in enumerate(images):
                instance = self.db.execute(
                    "INSERT INTO instances (sop_uid, sha256, study_id, frames, scoreable, path, "
                    "created_at) VALUES (?, 'x', ?, 1, 1, 'a.dcm', ?)",
                    [f"1.2.826.0.1.{self._n}.{k}", study_id, now]).lastrowid
                self.db.execute(
                    "INSERT INTO images (instance_id, size, frames, data) VALUES (?, ?, 1, ?)",
                    [instance, image.shape[-1], to_storage(image.reshape(1, *image.shape[-2:]))])
        return int(study_id)

    def enqueue(self, study_id: int, reason: str = "uncertainty", state: str = "pending",
                priority: float = 0.5) -> int:
        now = time.time()
        with store.transaction(self.db):
            result = self.db.execute(
                "INSERT INTO study_results (study_id, round, status, created_at) "
                "VALUES (?, 1, 'routed', ?)", [study_id, now]).lastrowid
            decision = self.db.execute(
                "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
                "strategy, needs_label, reason, decision) VALUES (?, ?, 1, ?, ?, 'combined', 1, "
                "?, '{}')", [result, study_id, result, now, reason]).lastrowid
            return int(self.db.execute(
                "INSERT INTO queue_items (study_id, decision_id, reason, priority, state, "
                "routed_at) VALUES (?, ?, ?, ?, ?, ?)",
                [study_id, decision, reason, priority, state, now]).lastrowid)

    def label(self, study_id: int, label: str, split: str | None, reason: str = "uncertainty",
              created_at: float | None = None) -> int:
        row = self.db.execute("SELECT id FROM queue_items WHERE study_id = ?",
                              [study_id]).fetchone()
        item = row[0] if row else self.enqueue(study_id, reason, state="labeled")
        with store.transaction(self.db):
            return int(self.db.execute(
                "INSERT INTO labels (study_id, item_id, label, token_id, role, created_at, split) "
                "VALUES (?, ?, ?, ?, 'radiologist', ?, ?)",
                [study_id, item, label, self.token, time.time() if created_at is None
                 else created_at, split]).lastrowid)

    def labelled(self, images: torch.Tensor, labels: np.ndarray, split: str) -> list[int]:
        """One single-image labelled study per image; returns the label ids."""
        names = self.settings.model.labels
        return [self.label(self.add_study(images[i : i + 1]), names[int(labels[i])], split)
                for i in range(images.shape[0])]


@pytest.fixture
def pneumonia() -> dict[str, np.ndarray]:
    """The PneumoniaMNIST development split (never the holdout)."""
    if find_data_dir() is None:
        pytest.skip("pneumoniamnist_dev.npz not found: set TRIAGE_DATA_DIR or use ../shared/data")
    return load_pneumoniamnist_dev()


def subset(data: dict[str, np.ndarray], split: str, n: int, seed: int = 0
           ) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` random images of ``split`` (`train`/`val`) as tensors, with their labels."""
    images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    pick = np.random.default_rng(seed).permutation(len(labels))[:n]
    return images_to_tensor(images[pick], SIZE), labels[pick].astype(np.int64)
