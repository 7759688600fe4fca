"""A model's stored operating point (temperature, threshold) is what every prediction uses.

In-process: scoring, the registry, re-scoring the queue. Against a real daemon, SQLite
file and HTTP server: the stored decisions, the `why` and study routes, the status
summary, /metrics and `triage models show`, for models saved with and without one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import FAST_ENV, REPO, DaemonProcess, make_image, store_target
from training.conftest import SIZE, TINY_MODEL, Store
from test_ops_status import CHROMIUM, CHROMIUM_ARGS, _browser
from test_review_api import auth, make_token

import triage.gate.queries as queries
from triage import cli
from triage.config import Settings, load_settings
from triage.model.calibration import OperatingPoint
from triage.model.checkpoint import load_checkpoint, save_checkpoint
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelError, ModelRegistry, model_operating_point
from triage.model.settings import ModelSettings
from triage.store import db as store
from triage.store.images import load_study_images

SEED_FACTOR = 1009  # the gate scorer's MC-dropout seed: study id * 1009 + round


def _save(path: Path, model: ModelSettings, point: dict | None, seed: int = 0) -> Path:
    """A freshly initialised model (same weights for the same seed), with `point` stored."""
    torch.manual_seed(seed)
    metadata = {"note": "untrained, for the test"}
    if point is not None:
        metadata["operating_point"] = point
    return save_checkpoint(path, build_network(model), build_loss_predictor(model), model,
                           metadata)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---- in process -------------------------------------------------------------------------


def test_scoring_uses_the_stored_temperature_and_threshold(tmp_path: Path) -> None:
    plain = load_checkpoint(_save(tmp_path / "plain.pt", TINY_MODEL, None))
    for threshold, label in ((0.0, 1), (1.0, 0)):
        checkpoint = load_checkpoint(_save(tmp_path / f"t{threshold}.pt", TINY_MODEL,
                                           {"temperature": 4.0, "threshold": threshold}))
        assert checkpoint.operating_point == OperatingPoint(4.0, threshold)
        for study in range(4):
            images = _images(3, study)
            result = score_study(checkpoint.network, checkpoint.loss_predictor, images,
                                 TINY_MODEL, seed=study, operating_point=checkpoint.operating_point)
            raw = score_study(plain.network, plain.loss_predictor, images, TINY_MODEL, seed=study)
            assert result.predicted_index == label
            assert result.probs != raw.probs  # T = 4: the same weights, softer probabilities
            assert abs(result.probs[1] - 0.5) <= abs(raw.probs[1] - 0.5)
            assert result.probs[1] < 1.0  # threshold 1.0 is above every probability here


def test_a_checkpoint_without_an_operating_point_scores_exactly_as_before(tmp_path: Path) -> None:
    checkpoint = load_checkpoint(_save(tmp_path / "plain.pt", TINY_MODEL, None))
    assert checkpoint.operating_point == OperatingPoint(1.0, None)
    for study in range(6):
        images = _images(2, 10 + study)
        before = score_study(checkpoint.network, checkpoint.loss_predictor, images, TINY_MODEL,
                             seed=study)
        now = score_study(checkpoint.network, checkpoint.loss_predictor, images, TINY_MODEL,
                          seed=study, operating_point=checkpoint.operating_point)
        assert now.probs == before.probs and now.uncertainty == before.uncertainty
        assert now.predicted_loss == before.predicted_loss
        argmax = max(range(len(before.probs)), key=before.probs.__getitem__)
        assert now.predicted_index == before.predicted_index == argmax


def test_registry_exposes_the_stored_point_and_refuses_a_bad_one(tmp_path: Path) -> None:
    db = store.connect(store_target(tmp_path))
    try:
        registry = ModelRegistry(db, tmp_path / "models", TINY_MODEL)
        plain = registry.add(_save(tmp_path / "a.pt", TINY_MODEL, None), source="test")
        tuned = registry.add(_save(tmp_path / "b.pt", TINY_MODEL,
                                   {"temperature": 1.5, "threshold": 0.3}), source="test")
        assert registry.operating_point(plain.version) is None
        assert registry.show(plain.version)["operating_point"] is None
        assert registry.operating_point(tuned.version) == OperatingPoint(1.5, 0.3)
        assert registry.show(tuned.version)["operating_point"] == {"temperature": 1.5,
                                                                   "threshold": 0.3}
        # what the scorer uses: the identity (argmax) for a model saved without one
        assert model_operating_point(db, plain.version) == OperatingPoint(1.0, None)
        assert model_operating_point(db, tuned.version) == OperatingPoint(1.5, 0.3)
        assert model_operating_point(db, None) is None
        assert model_operating_point(db, "v9999") is None
        bad = _save(tmp_path / "bad.pt", TINY_MODEL, {"temperature": 1.0, "threshold": 1.7})
        with pytest.raises(ModelError, match="threshold"):
            registry.add(bad, source="test")
    finally:
        db.close()


def test_rescore_pending_scores_at_the_checkpoints_operating_point(tmp_path: Path,
                                                                   monkeypatch) -> None:
    st = Store(Settings(home=tmp_path, model=TINY_MODEL))
    pending = [st.enqueue(st.add_study(_images(1, i)), priority=0.0) for i in range(5)]
    checkpoint = load_checkpoint(_save(tmp_path / "ck.pt", TINY_MODEL,
                                       {"temperature": 3.0, "threshold": 0.0}))
    calls = []

    def spy(*args, **kwargs):
        result = score_study(*args, **kwargs)
        calls.append((kwargs.get("operating_point"), result))
        return result

    monkeypatch.setattr(queries, "score_study", spy)
    assert queries.rescore_pending(st.db, checkpoint, st.settings) == len(pending)
    assert len(calls) == len(pending)
    assert all(point == OperatingPoint(3.0, 0.0) for point, _ in calls)
    assert all(result.predicted_index == 1 for _, result in calls)


def test_replay_evaluation_uses_the_stored_operating_point(tmp_path: Path) -> None:
    from triage.replay.report import eval_tensor, evaluate_checkpoint
    from triage.training.evaluate import classification_metrics, study_probabilities

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 40, 40), dtype=np.uint8)
    labels = np.array([0, 1] * 4 + [0] * 4)
    always = evaluate_checkpoint(_save(tmp_path / "t0.pt", TINY_MODEL,
                                       {"temperature": 2.0, "threshold": 0.0}), images, labels)
    assert always["operating_point"] == {"temperature": 2.0, "threshold": 0.0}
    assert always["sensitivity"] == 1.0 and always["specificity"] == 0.0
    assert always["accuracy"] == pytest.approx(4 / 12)
    never = evaluate_checkpoint(_save(tmp_path / "t1.pt", TINY_MODEL,
                                      {"temperature": 2.0, "threshold": 1.0}), images, labels)
    assert never["sensitivity"] == 0.0 and never["specificity"] == 1.0
    assert never["auroc"] == pytest.approx(always["auroc"])  # the temperature keeps the order
    # without a stored point: exactly the argmax metrics of the raw probabilities
    path = _save(tmp_path / "plain.pt", TINY_MODEL, None)
    plain = evaluate_checkpoint(path, images, labels)
    assert plain.pop("operating_point") == {"temperature": 1.0, "threshold": None}
    net = load_checkpoint(path).network
    y = torch.as_tensor(labels)
    probs = study_probabilities(net, eval_tensor(images, SIZE), torch.arange(12), 12)
    assert plain == pytest.approx(classification_metrics(probs, y), nan_ok=True)


# ---- a real daemon ----------------------------------------------------------------------

# v0001: saved without an operating point; v0002: T = 2, threshold 0 (always the second
# class); v0003: T = 0.5, threshold 1 (never the second class). Same weights throughout.
POINTS = {"v0001": None, "v0002": {"temperature": 2.0, "threshold": 0.0},
          "v0003": {"temperature": 0.5, "threshold": 1.0}}
PER_MODEL = 3


def _cli(proc: DaemonProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``triage ARGS`` against the daemon's home, run by the CLI's own ``main`` in this
    process (a subprocess pays 4 s of torch and MONAI imports per call, seven calls
    here; ``DaemonProcess.cli`` and the other CLI tests run the console entry point)."""
    argv = [*args, "--config", str(REPO / "config.yaml")]
    saved = dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(proc.env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Three studies scored by each of the three models, promoted one after the other
    while the daemon runs; every study is routed (as `audit`), predictions are shown.
    The gate runs `auto` over `combined` and `bald` with a one-study warm-up, so every
    audit after the first keeps the candidates' quantiles (its reward)."""
    root = tmp_path_factory.mktemp("operating_point")
    settings = load_settings(REPO / "config.yaml", environ={})
    env = {**FAST_ENV, "TRIAGE__GATE__LABEL_RATE": "1.0",
           "TRIAGE__GATE__EXPLORATION_RATE": "1.0", "TRIAGE__RETRAIN__ENABLED": "false",
           "TRIAGE__REVIEW__SHOW_PREDICTION": "true", "TRIAGE__GATE__STRATEGY": "auto",
           "TRIAGE__GATE__AUTO_STRATEGIES": "[combined, bald]", "TRIAGE__GATE__WARMUP": "1"}
    proc = DaemonProcess(root / "home", env, [])
    proc.home.mkdir(parents=True)
    files = {version: _save(root / f"{version}.pt", settings.model, point)
             for version, point in POINTS.items()}
    first = _cli(proc, "models", "import", str(files["v0001"]), "--promote")
    assert first.returncode == 0 and first.stdout.strip() == "v0001 serving", first.stderr
    proc.start()
    try:
        for n, version in enumerate(POINTS):
            if version != "v0001":
                imported = _cli(proc, "models", "import", str(files[version]), "--promote")
                assert imported.stdout.strip() == f"{version} serving", imported.stderr
            for i in range(PER_MODEL):
                make_image(proc.inbox / f"{version}-{i}.dcm",
                           study_uid=f"2.25.{9100 + n * 10 + i}", seed=n * 10 + i)
            proc.wait_for(lambda s, n=n: s["studies"]["scored"] == (n + 1) * PER_MODEL, 60,
                          f"studies scored by {version}")
        tokens = {role: make_token(proc, role, f"{role} user")
                  for role in ("radiologist", "ops")}
        with httpx.Client(base_url=proc.url, timeout=10) as client:
            yield proc, settings, files, client, tokens
    finally:
        proc.stop(signal.SIGKILL)


def _decisions(proc: DaemonProcess) -> list[dict]:
    db = store.connect(store_target(proc.home), readonly=True)
    try:
        return [dict(row) for row in db.query("SELECT * FROM decisions ORDER BY id")]
    finally:
        db.close()


def test_stored_predictions_follow_each_models_operating_point(served) -> None:
    proc, settings, files, _, _ = served
    rows = _decisions(proc)
    assert [r["model_version"] for r in rows] == [v for v in POINTS for _ in range(PER_MODEL)]
    assert all(r["reason"] == "audit" and r["needs_label"] == 1 for r in rows)
    db = store.connect(store_target(proc.home), readonly=True)
    try:
        for row in rows:
            prediction = json.loads(row["prediction"])
            probs = prediction["probabilities"]
            assert list(probs) == settings.model.labels
            argmax = max(probs, key=probs.get)
            expected = {"v0001": argmax, "v0002": "pneumonia", "v0003": "normal"}
            assert prediction["label"] == expected[row["model_version"]]
            # the stored probabilities are those of the model at its temperature, with the
            # gate scorer's seed; for v0001 exactly what scoring without a point gives
            checkpoint = load_checkpoint(files[row["model_version"]])
            images = load_study_images(db, row["study_id"])
            seed = row["study_id"] * SEED_FACTOR + row["round"]
            at_point = score_study(checkpoint.network, checkpoint.loss_predictor, images,
                                   settings.model, seed=seed,
                                   operating_point=checkpoint.operating_point)
            raw = score_study(checkpoint.network, checkpoint.loss_predictor, images,
                              settings.model, seed=seed)
            assert list(probs.values()) == pytest.approx(list(at_point.probs), abs=1e-6)
            assert prediction["label"] == settings.model.labels[at_point.predicted_index]
            if row["model_version"] == "v0001":
                assert list(probs.values()) == pytest.approx(list(raw.probs), abs=1e-6)
            else:
                assert list(probs.values()) != pytest.approx(list(raw.probs), abs=1e-6)
    finally:
        db.close()


def test_why_and_the_study_view_show_the_operating_point(served) -> None:
    proc, _, _, client, tokens = served
    reader = auth(tokens["radiologist"])
    identity = {"temperature": 1.0, "threshold": None}
    for row in _decisions(proc):
        expected = POINTS[row["model_version"]] or identity
        why = client.get(f"/api/studies/{row['study_id']}/why", headers=reader)
        assert why.status_code == 200, why.text
        assert why.json()["model_version"] == row["model_version"]
        assert why.json()["operating_point"] == expected
        view = client.get(f"/api/studies/{row['study_id']}", headers=reader).json()
        assert view["why"]["operating_point"] == expected
        stored = json.loads(row["prediction"])
        assert view["prediction"] == {**stored, "operating_point": expected}


def test_status_metrics_and_cli_show_the_serving_operating_point(served) -> None:
    proc, _, _, client, tokens = served
    summary = client.get("/api/ops/summary", headers=auth(tokens["ops"])).json()
    assert summary["model"]["serving_version"] == "v0003"
    assert summary["model"]["operating_point"] == {"temperature": 0.5, "threshold": 1.0}
    metrics = client.get("/metrics").text
    assert "triage_model_temperature 0.5" in metrics
    assert "triage_model_decision_threshold 1.0" in metrics

    shown = _cli(proc, "models", "show", "v0002")
    assert shown.returncode == 0, shown.stderr
    assert "operating point: pneumonia when P(pneumonia) >= 0.000, temperature 2.000" \
        in shown.stdout
    plain = _cli(proc, "models", "show", "v0001")
    assert plain.returncode == 0 and "operating point" not in plain.stdout
    full = json.loads(_cli(proc, "models", "show", "v0003", "--json").stdout)
    assert full["operating_point"] == {"temperature": 0.5, "threshold": 1.0}
    assert json.loads(_cli(proc, "models", "show", "v0001", "--json").stdout)[
        "operating_point"] is None


def test_audit_accuracy_counts_the_stored_thresholded_labels(served) -> None:
    proc, _, _, client, tokens = served
    reader = auth(tokens["radiologist"])
    rows = {r["model_version"]: r for r in _decisions(proc)}  # one study per model
    # v0002 stored `pneumonia` (threshold 0), v0003 `normal` (threshold 1): the reader
    # says pneumonia to both, so exactly one of the two audits is right
    stored = {"v0002": "pneumonia", "v0003": "normal"}
    for version in ("v0002", "v0003"):
        assert json.loads(rows[version]["prediction"])["label"] == stored[version]
        study = rows[version]["study_id"]
        assert client.post(f"/api/studies/{study}/claim", headers=reader).status_code == 200
        labelled = client.post(f"/api/studies/{study}/label", json={"label": "pneumonia"},
                               headers=reader)
        assert labelled.status_code == 201, labelled.text
    summary = client.get("/api/ops/summary", headers=auth(tokens["ops"])).json()
    assert summary["model"]["audit_samples"] == 2
    assert summary["model"]["audit_accuracy"] == 0.5


def test_auto_mix_follows_the_labelled_audits(served) -> None:
    """Every audit labelled: the status summary's mix is the probability that `combined`
    catches more of the served models' loss than `bald` (computed here from the stored
    decisions and labels), and the scorer publishes the same mix before its next study."""
    proc, settings, _, client, tokens = served
    reader = auth(tokens["radiologist"])
    gate = settings.gate
    experts = {"combined": {"uncertainty": gate.uncertainty_weight,
                            "predicted_loss": gate.loss_weight}, "bald": {"uncertainty": 1.0}}
    db = store.connect(store_target(proc.home), readonly=True)
    try:
        labelled = {row[0] for row in db.execute("SELECT study_id FROM labels")}
    finally:
        db.close()
    rows = _decisions(proc)
    for n, row in enumerate(rows):
        if row["study_id"] in labelled:
            continue
        study = row["study_id"]
        assert client.post(f"/api/studies/{study}/claim", headers=reader).status_code == 200
        label = settings.model.labels[n % 2]
        assert client.post(f"/api/studies/{study}/label", json={"label": label},
                           headers=reader).status_code == 201
    db = store.connect(store_target(proc.home), readonly=True)
    try:
        current = dict(db.execute("SELECT study_id, label FROM labels "
                                  "WHERE superseded_by IS NULL").fetchall())
    finally:
        db.close()
    differences = []
    for row in rows:
        assert row["strategy"] == "auto" and row["reason"] == "audit"
        if row["quantiles"] is None:  # the first study: nothing to rank it against
            continue
        quantiles = json.loads(row["quantiles"])
        p = json.loads(row["prediction"])["probabilities"][current[row["study_id"]]]
        loss = min(-np.log(max(p, 1e-300)), np.log(100)) / np.log(100)
        caught = {name: sum(w * quantiles[f"{name}.{k}"] for k, w in weights.items())
                  / sum(weights.values()) for name, weights in experts.items()}
        differences.append(loss * (caught["combined"] - caught["bald"]))
    assert len(differences) == len(rows) - 1 >= 7
    d = np.array(differences)
    z = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    expected = 0.5 * (1 + float(torch.erf(torch.tensor(z / np.sqrt(2)))))
    summary = client.get("/api/ops/summary", headers=auth(tokens["ops"])).json()
    mix = summary["gate"]["auto_mix"]
    assert summary["gate"]["strategy"] == "auto" and set(mix) == {"combined", "bald"}
    assert mix["combined"] == pytest.approx(expected, abs=0.01)
    assert mix["combined"] + mix["bald"] == pytest.approx(1)
    # the scorer reads the same audits before its next study and publishes that mix
    make_image(proc.inbox / "after-labels.dcm", study_uid="2.25.9199", seed=99)
    proc.wait_for(lambda s: s["studies"]["scored"] == len(rows) + 1, 60, "one more study")
    metrics = client.get("/metrics").text
    for name, share in mix.items():
        assert f'triage_gate_auto_mix{{strategy="{name}"}} {share}' in metrics
    # and the status page shows it
    sync_playwright = _browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{proc.url}/status")
            page.fill("#token", tokens["ops"])
            page.click("#sign-in button[type=submit]")
            page.wait_for_selector("body[data-loaded=true]", timeout=15000)
            shown = page.text_content('[data-k="strategy"]')
        finally:
            browser.close()
    assert shown == (f"auto: combined {100 * mix['combined']:.0f} %, "
                     f"bald {100 * mix['bald']:.0f} %")
