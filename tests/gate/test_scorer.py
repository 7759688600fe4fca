"""A real study flows from the inbox to a stored, explainable gate decision; the scorer
rescores the gate's window at a promotion, falls back to uncertainty without a loss
predictor and chooses cold-start studies at the label rate."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    FAST_ENV, REPO, DaemonProcess, make_image, store_rows, store_settings,
)
from prometheus_client import CollectorRegistry
from test_coldstart import synthetic_study

from triage.api.ops_status import build_summary
from triage.config import Settings, load_settings
from triage.gate import GateSettings
from triage.gate.scorer import GateScorer
from triage.gate.worker import ScoringWorker
from triage.model.checkpoint import save_checkpoint
from triage.model.epistemic import fit_epistemic
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelRegistry
from triage.model.settings import ModelSettings
from triage.store import db as store
from triage.store.images import to_storage
from triage.telemetry.metrics import build_metrics


def _decisions(proc: DaemonProcess) -> list[dict]:
    return store_rows(proc.home, "SELECT * FROM decisions ORDER BY id", dicts=True)


def test_cold_start_routes_up_to_the_daily_cap(tmp_path: Path) -> None:
    # label_rate 1: the cold-start selector chooses every study, the cap stops them
    env = {**FAST_ENV, "TRIAGE__GATE__DAILY_CAP": "3", "TRIAGE__GATE__EXPLORATION_RATE": "0",
           "TRIAGE__GATE__LABEL_RATE": "1.0"}
    proc = DaemonProcess(tmp_path / "home", env, []).start()
    try:
        for i in range(5):
            make_image(proc.inbox / f"{i}.dcm", study_uid=f"2.25.{i + 10}", seed=i)
        proc.wait_for(lambda s: s["studies"]["scored"] == 5, 40, "five studies scored")
        rows = _decisions(proc)
        assert [r["reason"] for r in rows] == ["cold_start"] * 3 + ["cap_reached"] * 2
        assert [r["needs_label"] for r in rows] == [1, 1, 1, 0, 0]
        assert all(r["model_version"] is None for r in rows)
        assert all(set(json.loads(r["scores"])) == {"novelty"} for r in rows)
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


# In-process: the scorer on a real store, studies built row by row.

TINY = ModelSettings(input_size=32, channels=(4, 8), subunits=1, lossnet_width=8, mc_samples=3)
T0 = 1_709_280_000.0  # 2024-03-01 08:00 UTC


class Home:
    """A store with studies, models and a scorer's metrics, on a fixed clock."""

    def __init__(self, path: Path, **gate: object) -> None:
        options = {"daily_cap": 10_000, "window": 20, "warmup": 5, **gate}
        self.settings = Settings(home=path, store=store_settings(path), model=TINY,
                                 gate=GateSettings(**options))
        path.mkdir(parents=True, exist_ok=True)
        self.db = store.connect(self.settings.database())
        self.prometheus = CollectorRegistry()
        self.metrics = build_metrics(self.prometheus)
        self.models = ModelRegistry(self.db, self.settings.path("models"), TINY)
        self.rng = np.random.default_rng(0)
        self.now = T0
        self._n = 0

    def scorer(self) -> GateScorer:
        return GateScorer(self.settings, self.db, self.metrics, clock=lambda: self.now)

    def add_study(self) -> int:
        """A complete study of one or two synthetic images (four kinds of pattern)."""
        self._n += 1
        images = synthetic_study(int(self.rng.integers(0, 4)), self.rng)
        with store.transaction(self.db):
            study_id = self.db.execute(
                "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, "
                "completed_at, n_instances, n_images, round) VALUES (?, 'complete', ?, ?, ?, "
                "?, ?, 1)",
                [f"2.25.{self._n}", self.now, self.now, self.now + self._n, len(images),
                 len(images)]).lastrowid
            for k, image in enumerate(images):
                instance = self.db.execute(
                    "INSERT INTO instances (sop_uid, sha256, study_id, frames, scoreable, path, "
                    "created_at) VALUES (?, 'x', ?, 1, 1, 'a.dcm', ?)",
                    [f"2.25.{self._n}.{k}", study_id, self.now]).lastrowid
                self.db.execute(
                    "INSERT INTO images (instance_id, size, frames, data) VALUES (?, ?, 1, ?)",
                    [instance, image.shape[-1], to_storage(image[0])])
        return int(study_id)

    def promote(self, seed: int, *, loss_predictor: bool = True, head: bool = False) -> str:
        """Save an untrained model built from ``seed`` (with ``head``, an epistemic head
        fitted on synthetic studies), add it and make it serve."""
        torch.manual_seed(seed)
        net = build_network(TINY)
        lossnet = build_loss_predictor(TINY) if loss_predictor else None
        epistemic = None
        if head:
            rng = np.random.default_rng(seed)
            images = torch.cat([synthetic_study(c % 4, rng)[:1] for c in range(40)])
            labels = torch.arange(40) % 2
            epistemic = fit_epistemic(net.eval(), images, labels, images[:10], labels[:10],
                                      samples=3)
        path = save_checkpoint(self.settings.home / f"m{seed}.pt", net, lossnet, TINY,
                               epistemic=epistemic)
        version = self.models.add(path, source="test").version
        self.models.promote(version)
        return version

    def score(self, scorer: GateScorer, n: int) -> list[dict]:
        """Add ``n`` studies and score them through the worker; their decision rows."""
        worker = ScoringWorker(self.db, scorer, self.metrics, clock=lambda: self.now)
        ids = [self.add_study() for _ in range(n)]
        for study_id in ids:
            assert worker.run_once() == study_id
            self.now += 60
        marks = ",".join("?" * len(ids))
        return list(self.db.query(
            f"SELECT decisions.*, study_results.status FROM decisions JOIN study_results "
            f"ON study_results.id = result_id WHERE decisions.study_id IN ({marks}) "
            "ORDER BY decisions.id", ids))

    def expected_scores(self, version: str, study_id: int) -> list[float]:
        """The gate's raw scores of a study under ``version``, computed directly."""
        checkpoint = self.models.load(version)
        images = torch.cat([
            torch.from_numpy(np.frombuffer(data, np.float16).astype(np.float32)).reshape(
                1, 1, TINY.input_size, TINY.input_size)
            for (data,) in self.db.execute(
                "SELECT data FROM images JOIN instances ON instances.id = instance_id "
                "WHERE study_id = ? ORDER BY instances.id", [study_id])
        ])
        result = score_study(checkpoint.network, checkpoint.loss_predictor, images, TINY,
                             seed=study_id * 1009 + 1,
                             operating_point=checkpoint.operating_point)
        return [result.uncertainty["entropy"], result.predicted_loss]


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == name]


def test_a_promotion_rescores_the_gate_window_with_the_new_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, exploration_rate=0.0)
    old = home.promote(seed=1)
    scorer = home.scorer()
    first = home.score(scorer, 12)
    assert all(r["status"] != "error" and r["model_version"] == old for r in first)
    assert scorer.gate.window_keys() == [r["study_id"] for r in first]
    gone = first[3]["study_id"]  # its images can no longer be loaded: it leaves the window
    home.db.execute("DELETE FROM images WHERE instance_id IN "
                    "(SELECT id FROM instances WHERE study_id = ?)", [gone])

    new = home.promote(seed=2)
    caplog.clear()
    second = home.score(scorer, 2)
    (rescored,) = _events(caplog, "gate_window_rescored")  # once per change of model
    assert (rescored.model, rescored.previous) == (new, old)
    assert (rescored.entries, rescored.studies, rescored.rescored, rescored.failed,
            rescored.kept) == (12, 12, 11, 1, 11)
    assert rescored.seconds >= 0
    assert home.prometheus.get_sample_value("triage_gate_rescore_seconds_count") == 2.0
    kept = [r["study_id"] for r in first if r["study_id"] != gone]
    state = scorer.gate.state_dict()
    assert state["window_keys"] == kept + [r["study_id"] for r in second]
    expected = [home.expected_scores(new, study_id) for study_id in state["window_keys"]]
    np.testing.assert_allclose(state["values"], expected, rtol=1e-6)
    stored = [json.loads(r["scores"]) for r in second]
    np.testing.assert_allclose([[s["uncertainty"], s["predicted_loss"]] for s in stored],
                               expected[-2:], rtol=1e-6)

    # a restart finds a window of two models: it is rescored again, to the same state
    restarted = home.scorer()
    home.score(restarted, 1)
    after = restarted.gate.state_dict()
    assert after["window_keys"][:-1] == state["window_keys"]
    assert after["routed"][:-1] == state["routed"]
    np.testing.assert_allclose(after["values"][:-1], state["values"], rtol=1e-6)


def test_the_first_model_after_cold_start_scores_without_a_stale_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path)
    scorer = home.scorer()
    cold = home.score(scorer, 6)
    assert all(r["model_version"] is None for r in cold)
    assert scorer.gate.window_filled == 0  # cold-start studies never enter the window
    version = home.promote(seed=1)
    rows = home.score(scorer, 3)
    assert all(r["model_version"] == version and r["status"] != "error" for r in rows)
    (rescored,) = _events(caplog, "gate_window_rescored")
    assert (rescored.previous, rescored.entries, rescored.kept) == (None, 0, 0)


@pytest.mark.parametrize("strategy", ["combined", "predicted_loss"])
def test_a_model_without_loss_predictor_ranks_by_uncertainty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, strategy: str
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, strategy=strategy, exploration_rate=0.0)
    version = home.promote(seed=1, loss_predictor=False)
    rows = home.score(home.scorer(), 12)
    assert [r["status"] for r in rows].count("error") == 0
    assert all(r["model_version"] == version for r in rows)
    assert {r["reason"] for r in rows} & {"predicted_loss", "uncertainty", "both",
                                         "below_threshold"}  # scored past warm-up
    routed = sum(r["needs_label"] for r in rows)
    assert 0 < routed < len(rows)
    for row in rows:
        scores = json.loads(row["scores"])
        entropy = json.loads(row["uncertainty"])["entropy"]
        assert row["predicted_loss"] is None
        assert scores["predicted_loss"] == pytest.approx(entropy)  # the stand-in
    assert home.prometheus.get_sample_value(
        "triage_gate_fallback_total", {"reason": "no_loss_predictor"}) == 12.0
    (warning,) = _events(caplog, "gate_fallback_uncertainty")  # once per model version
    assert warning.levelno == logging.WARNING and warning.model == version


@pytest.mark.parametrize("neighbours", [0, 5])  # coverage, and typicality-weighted
def test_cold_start_routes_at_the_label_rate_and_survives_a_restart(
        tmp_path: Path, neighbours: int) -> None:  # fmt: skip
    gate = {"label_rate": 0.2, "window": 50, "warmup": 20, "daily_cap": 40,
            "cold_start_neighbours": neighbours}
    one = Home(tmp_path / "one", **gate)
    straight = one.score(one.scorer(), 120)
    two = Home(tmp_path / "two", **gate)
    scorer = two.scorer()
    restarted = two.score(scorer, 70) + two.score(two.scorer(), 50)

    def summary(rows: list[dict]) -> list[tuple]:
        return [(r["reason"], r["needs_label"], json.loads(r["scores"])["novelty"]) for r in rows]

    assert summary(restarted) == summary(straight)  # same studies, same decisions
    reasons = {r["reason"] for r in straight}
    assert reasons <= {"cold_start", "audit", "not_sampled", "cap_reached"}
    routed = sum(r["needs_label"] for r in straight)
    assert 0.1 * 120 <= routed <= 0.3 * 120  # the label rate, nowhere near the daily cap
    assert all(r["model_version"] is None and r["status"] != "error" for r in straight)


def _states(home: Home, ids: list[int]) -> list[str]:
    marks = ",".join("?" * len(ids))
    return [row[0] for row in home.db.execute(
        f"SELECT state FROM studies WHERE id IN ({marks}) ORDER BY id", ids).fetchall()]


def test_batched_studies_wait_in_the_store_and_each_gets_one_decision_with_its_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    batch = {"strategy": "badge", "budget_manager": "batch", "batch_size": 5,
             "batch_seconds": 600, "label_rate": 0.4, "exploration_rate": 0.0}
    home = Home(tmp_path, **batch)
    version = home.promote(seed=1, head=True)
    worker = ScoringWorker(home.db, home.scorer(), home.metrics, clock=lambda: home.now)
    first = [home.add_study() for _ in range(4)]
    for study_id in first:
        assert worker.run_once() == study_id
        home.now += 60
    # scored, waiting: no result or decision yet, nothing routed
    assert _states(home, first) == ["batched"] * 4
    assert home.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 0
    assert home.db.execute("SELECT COUNT(*) FROM study_results").fetchone()[0] == 0
    assert home.db.execute("SELECT COUNT(*) FROM gate_buffer").fetchone()[0] == 4
    assert home.prometheus.get_sample_value("triage_gate_batch_pending") == 4.0
    gate = build_summary(home.db, home.settings, {}, home.now)["gate"]  # /api/ops/summary
    assert gate["budget_manager"] == "batch"
    assert gate["batch"] == {"waiting": 4, "oldest_wait_seconds": 240.0}
    assert gate["strategy"] == "badge" and gate["auto_mix"] is None

    # a restart keeps the buffer; the fifth study fills the batch
    restarted = home.scorer()
    assert restarted.batch_pending == 4
    worker = ScoringWorker(home.db, restarted, home.metrics, clock=lambda: home.now)
    fifth = home.add_study()
    assert worker.run_once() == fifth
    ids = [*first, fifth]
    rows = list(home.db.query(
        "SELECT decisions.*, study_results.status, study_results.detail FROM decisions "
        "JOIN study_results ON study_results.id = result_id ORDER BY decisions.id"))
    assert [r["study_id"] for r in rows] == ids  # one decision each, in arrival order
    assert [r["sequence"] for r in rows] == list(range(5))
    assert sorted(r["reason"] for r in rows) == ["batch"] * 2 + ["not_selected"] * 3
    assert all(r["model_version"] == version and r["strategy"] == "badge" for r in rows)
    assert all(r["status"] == ("routed" if r["needs_label"] else "not_routed") for r in rows)
    waits = [json.loads(r["detail"])["batch_wait_seconds"] for r in rows]
    assert waits == [240.0, 180.0, 120.0, 60.0, 0.0]
    routed = {r["study_id"] for r in rows if r["needs_label"]}
    queued = {row[0] for row in home.db.execute("SELECT study_id FROM queue_items")}
    assert queued == routed
    assert _states(home, ids) == ["scored"] * 5
    assert home.db.execute("SELECT COUNT(*) FROM gate_buffer").fetchone()[0] == 0
    assert build_summary(home.db, home.settings, {}, home.now)["gate"]["batch"] == {
        "waiting": 0, "oldest_wait_seconds": None}
    (decided,) = _events(caplog, "gate_batch_decided")
    assert (decided.trigger, decided.studies, decided.routed) == ("size", 5, 2)
    assert restarted.gate.sequence == 5 and restarted.gate.window_keys() == ids

    # two studies wait; the oldest's `batch_seconds` pass with nothing new: decided
    late = [home.add_study() for _ in range(2)]
    for study_id in late:
        assert worker.run_once() == study_id
    home.now += 599
    assert worker.run_once() is None and _states(home, late) == ["batched"] * 2
    home.now += 1
    assert worker.run_once() is None and _states(home, late) == ["scored"] * 2

    # a promotion: the waiting studies are decided with the model that scored them
    waiting = home.add_study()
    assert worker.run_once() == waiting
    reopened = home.add_study()
    assert worker.run_once() == reopened
    home.db.execute("UPDATE studies SET state = 'open' WHERE id = ?", [reopened])  # late file
    new = home.promote(seed=2, head=True)
    after = home.add_study()
    assert worker.run_once() == after
    by_study = {r["study_id"]: r for r in home.db.query("SELECT * FROM decisions")}
    assert by_study[waiting]["model_version"] == by_study[reopened]["model_version"] == version
    assert after not in by_study and _states(home, [waiting, reopened, after]) == [
        "scored", "open", "batched"]  # the reopened study keeps its new round's state
    for trigger, count in (("size", 1.0), ("age", 1.0), ("model", 1.0)):
        assert home.prometheus.get_sample_value(
            "triage_gate_batches_total", {"trigger": trigger}) == count
    assert home.prometheus.get_sample_value("triage_gate_batch_wait_seconds_count") == 9.0
    assert new != version


def test_a_buffer_left_by_batching_is_scored_again_under_a_configuration_without_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage")
    home = Home(tmp_path, strategy="badge", budget_manager="batch", batch_size=50)
    home.promote(seed=1, head=True)
    worker = ScoringWorker(home.db, home.scorer(), home.metrics, clock=lambda: home.now)
    ids = [home.add_study() for _ in range(3)]
    for study_id in ids:
        assert worker.run_once() == study_id
    assert _states(home, ids) == ["batched"] * 3
    home.settings = home.settings.model_copy(
        update={"gate": GateSettings(strategy="badge", daily_cap=10_000, window=20, warmup=5)})
    scorer = home.scorer()
    (requeued,) = _events(caplog, "gate_batch_requeued")
    assert requeued.studies == 3 and requeued.levelno == logging.WARNING
    assert _states(home, ids) == ["complete"] * 3 and scorer.batch_pending == 0
    assert home.db.execute("SELECT COUNT(*) FROM gate_buffer").fetchone()[0] == 0
    worker = ScoringWorker(home.db, scorer, home.metrics, clock=lambda: home.now)
    assert [worker.run_once() for _ in ids] == ids  # oldest first, decided one by one
    rows = list(home.db.query("SELECT study_id, reason FROM decisions ORDER BY id"))
    assert [r["study_id"] for r in rows] == ids
    # the per-study manager's warm-up: routed at random (`warmup`) or not (`not_sampled`)
    assert {r["reason"] for r in rows} <= {"warmup", "not_sampled", "audit"}
