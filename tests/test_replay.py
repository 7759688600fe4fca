"""`triage replay`: ordering, generated DICOM, label noise, and a replay through a real
spawned daemon with the oracle reader labelling over the HTTP API."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from triage.replay.datasets import find_data_dir
from triage.replay.oracle import noisy_label
from triage.replay.source import Item, SourceError, folder_items, pneumoniamnist_items
from triage.replay.stream import StreamWriter, build_studies, order_indices

REPO = Path(__file__).resolve().parents[1]
FULL_SCALE = os.environ.get("TRIAGE_FULL_SCALE") == "1"
NEEDS_DATA = pytest.mark.skipif(
    find_data_dir() is None,
    reason="PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place it in ../shared/data",
)


def _items(labels: list[int], size: int = 16) -> list[Item]:
    rng = np.random.default_rng(0)
    return [Item(key=str(i), label=y, pixels=rng.integers(0, 256, (size, size), dtype=np.uint8))
            for i, y in enumerate(labels)]


# -- ordering ------------------------------------------------------------------------------
def test_shuffled_is_a_seeded_permutation() -> None:
    labels = [0] * 30 + [1] * 70
    a, b = order_indices(labels, "shuffled", 3), order_indices(labels, "shuffled", 3)
    assert sorted(a.tolist()) == list(range(100)) and a.tolist() == b.tolist()
    assert a.tolist() != order_indices(labels, "shuffled", 4).tolist()


def test_drift_puts_the_scarce_class_late() -> None:
    labels = np.array([0] * 100 + [1] * 300)
    order = order_indices(labels, "drift", 0, drift_at=0.5, early_share=0.1)
    assert sorted(order.tolist()) == list(range(400))
    stream = labels[order]
    first, second = stream[:200], stream[200:]
    assert (first == 0).sum() == 10  # 10 % of the rarest class (0, chosen by default) early
    assert (second == 0).sum() == 90
    positions = np.flatnonzero(stream == 0)
    assert np.median(positions) > 200
    held = order_indices(labels, "drift", 0, scarce_class=1, drift_at=0.3, early_share=0.0)
    assert (labels[held][:100] == 1).sum() == 0  # only 100 others to fill the early part


def test_unknown_order_is_refused() -> None:
    with pytest.raises(ValueError):
        order_indices([0, 1], "sorted", 0)


def test_studies_group_same_class_images() -> None:
    items = _items([0, 1, 0, 1, 0, 1, 1])
    studies = build_studies(items, np.arange(7), images_per_study=2)
    assert sum(len(s.items) for s in studies) == 7
    for study in studies:
        assert {it.label for it in study.items} == {study.label}
    assert sorted(len(s.items) for s in studies) == [1, 2, 2, 2]
    assert len({s.uid for s in studies}) == len(studies)


# -- generated DICOM -----------------------------------------------------------------------
def test_written_files_are_valid_dx_with_unique_uids(tmp_path: Path) -> None:
    items = _items([0, 1, 1, 0, 1, 0], size=28)
    studies = build_studies(items, np.arange(6), images_per_study=2)
    writer = StreamWriter(tmp_path / "inbox", studies, rate=0, tag="t").start()
    writer.join(30)
    assert writer.error is None and writer.written == len(studies)
    files = sorted((tmp_path / "inbox").rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 6 and all(f.suffix == ".dcm" for f in files)  # no .part left
    sops, series = set(), {}
    for path in files:
        ds = pydicom.dcmread(path)  # a Part 10 file with preamble and meta
        assert ds.Modality == "DX"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert [float(v) for v in ds.PixelSpacing] == [12.5, 12.5]  # 350 mm / 28 px
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID(str(uid)).is_valid and len(str(uid)) <= 64
        assert ds.pixel_array.shape == (28, 28) and ds.pixel_array.dtype == np.uint8
        sops.add(str(ds.SOPInstanceUID))
        series.setdefault(str(ds.StudyInstanceUID), set()).add(str(ds.SeriesInstanceUID))
    assert len(sops) == 6
    assert set(series) == {s.uid for s in studies}
    assert all(len(v) == 1 for v in series.values())
    by_uid = {s.uid: s for s in studies}
    for path in files:
        ds = pydicom.dcmread(path)
        study = by_uid[str(ds.StudyInstanceUID)]
        assert any(np.array_equal(ds.pixel_array, it.pixels) for it in study.items)


def test_rate_limits_the_writer(tmp_path: Path) -> None:
    studies = build_studies(_items([0] * 6), np.arange(6))
    started = time.monotonic()
    writer = StreamWriter(tmp_path, studies, rate=10, tag="r").start()
    writer.join(30)
    assert time.monotonic() - started >= 0.45  # study 5 no earlier than 0.5 s


def test_folder_source_reads_labels_and_study_uids(tmp_path: Path) -> None:
    studies = build_studies(_items([1, 0, 1], size=8), np.arange(3))
    StreamWriter(tmp_path / "src", studies, rate=0, tag="f").start().join(30)
    files = sorted(p for p in (tmp_path / "src").rglob("*.dcm"))
    rel = [p.relative_to(tmp_path / "src") for p in files]
    csv = tmp_path / "labels.csv"
    csv.write_text("file,label\n" + "".join(
        f"{r},{'pneumonia' if s.label else 0}\n" for r, s in zip(rel, studies, strict=True)))
    items = folder_items(tmp_path / "src", csv, ["normal", "pneumonia"])
    assert [it.label for it in items] == [1, 0, 1]
    assert [it.study_uid for it in items] == [s.uid for s in studies]
    bad = tmp_path / "bad.csv"
    bad.write_text(f"file,label\n{rel[0]},cat\n")
    with pytest.raises(SourceError, match="cat"):
        folder_items(tmp_path / "src", bad, ["normal", "pneumonia"])


# -- label noise ---------------------------------------------------------------------------
def test_label_noise_rate_and_flips() -> None:
    rng = np.random.default_rng(0)
    truth = np.random.default_rng(1).integers(0, 2, 20000)
    given = np.array([noisy_label(int(t), 2, 0.2, rng) for t in truth])
    assert abs((given != truth).mean() - 0.2) < 0.015
    assert all(noisy_label(1, 2, 0.0, rng) == 1 for _ in range(100))
    assert all(noisy_label(1, 2, 1.0, rng) == 0 for _ in range(100))
    three = [noisy_label(0, 3, 1.0, rng) for _ in range(3000)]
    assert set(three) == {1, 2} and abs(three.count(1) / 3000 - 0.5) < 0.05


@NEEDS_DATA
def test_pneumoniamnist_source_is_dev_only() -> None:
    items = pneumoniamnist_items("val", 20, seed=0)
    assert len(items) == 20 and all(it.pixels.shape == (28, 28) for it in items)
    with pytest.raises(SourceError):
        pneumoniamnist_items("test", 5)


# -- the whole replay through a real daemon ------------------------------------------------
SCALE = {"n": 600, "rate": 8, "cap": 300} if FULL_SCALE else {"n": 240, "rate": 10, "cap": 130}
TINY = [
    "model.input_size=32", "model.channels=[8, 16]", "model.subunits=1", "model.mc_samples=5",
    "model.training.epochs=4", "model.training.min_steps=0", "model.training.batch_size=16",
    "gate.warmup=5", "gate.window=40", "gate.label_rate=0.25", "gate.exploration_rate=0.08",
    "retrain.min_validation_studies=4",
    f"gate.daily_cap={SCALE['cap']}", "retrain.min_new_labels=40",
    "retrain.min_train_studies=10", "retrain.coverage_queries=3",
    "studies.stable_age_seconds=1",
]


@pytest.mark.slow
@NEEDS_DATA
def test_replay_through_a_spawned_daemon(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "report"
    command = [sys.executable, "-m", "triage", "replay", "--spawn",
               "--config", str(REPO / "config.yaml"), "--home", str(home),
               "--n", str(SCALE["n"]), "--rate", str(SCALE["rate"]), "--seed", "0",
               "--label-noise", "0.1", "--report", str(out), "--timeout", "300",
               "--no-progress", *[arg for kv in TINY for arg in ("--set", kv)]]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRIAGE__") and k != "TRIAGE_HOME"}
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    n = SCALE["n"]
    assert report["completed"] and summary["studies"] == n
    # every written study was ingested and scored; the inbox is drained
    assert report["outcome"]["written"] == n
    assert report["outcome"]["ingested"] == n and report["outcome"]["scored"] == n
    assert not [p for p in (home / "inbox").rglob("*") if p.is_file()]
    # the oracle's labels are stored with the values it gave, and those are the truth
    # up to the noise it reports
    records = report["oracle"]["records"]
    conn = sqlite3.connect(f"file:{home / 'triage.db'}?mode=ro", uri=True)
    stored = dict(conn.execute(
        "SELECT s.study_uid, l.label FROM labels l JOIN studies s ON s.id = l.study_id "
        "WHERE l.superseded_by IS NULL").fetchall())
    files = dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state"))
    conn.close()
    assert files == {"archived": n}
    given = {r["study_uid"]: r["label"] for r in records if r["status"] == 201}
    assert given and stored == given
    for r in records:
        assert (r["label"] != r["truth"]) == r["noisy"]
    noisy = report["oracle"]["noisy"]
    assert 0 < noisy < 0.3 * len(given)
    assert report["routing"]["stored_labels"] == len(given)
    assert report["routing"]["stored_labels_matching_truth"] == len(given) - noisy
    # retraining happened and at least one candidate was promoted
    curve = report["learning_curve"]
    assert len(curve) >= 1 and report["outcome"]["promoted"] >= 1
    promoted = [p for p in curve if p["state"] == "promoted"]
    assert all(0.0 <= p["serving_auroc"] <= 1.0 and p["labels_used"] > 0 for p in promoted)
    assert all(0.0 <= p["external_auroc"] <= 1.0 for p in promoted)
    # routed fraction and reasons
    routing = report["routing"]
    assert 0 < routing["routed_fraction"] <= 1
    assert sum(routing["gate_reasons"].values()) == n
    assert routing["queued_studies"] == len(given)
    assert report["budget"]["label_rate"] == 0.25 and report["seeds"]["replay"] == 0
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nreplay wall time {elapsed:.1f} s; summary {json.dumps(summary)}")


def test_spawn_overrides_map_to_triage_env() -> None:
    from triage.config import load_settings
    from triage.errors import ConfigError
    from triage.replay.commands import ReplayOptions, override_env

    env = override_env(ReplayOptions(strategy="random", coverage="off",
                                     overrides=["model.training.epochs=2", "gate.daily_cap=9"]))
    assert env["TRIAGE__GATE__STRATEGY"] == "random"
    assert env["TRIAGE__RETRAIN__COVERAGE_QUERIES"] == "0"
    settings = load_settings(None, environ=env)
    assert settings.model.training.epochs == 2 and settings.gate.daily_cap == 9
    assert settings.retrain.coverage_queries == 0 and settings.gate.strategy == "random"
    with pytest.raises(ConfigError):
        override_env(ReplayOptions(overrides=["epochs"]))
