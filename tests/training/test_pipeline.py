"""Retrain runs in-process on real PneumoniaMNIST images in a real SQLite store."""

from __future__ import annotations

import math
import time

import pytest
import torch

from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelRegistry
from triage.model.settings import TrainSettings
from triage.model.training import classifier_auroc
from triage.training.dataset import load_split
from triage.training.evaluate import image_logits
from triage.training.pipeline import run_retrain
from triage.training.runs import create_run, last_run
from triage.training.train import TrainingFailed

from .conftest import TINY_MODEL, Store, make_settings, subset


def _store(tmp_path, data, n_train=240, n_val=100, **retrain) -> Store:
    st = Store(make_settings(tmp_path, **retrain))
    x, y = subset(data, "train", n_train)
    st.labelled(x, y, "train")
    xv, yv = subset(data, "val", n_val)
    st.labelled(xv, yv, "validation")
    return st


def _run(st: Store, settings=None) -> str:
    run_id = create_run(st.db, "manual", time.time())
    return run_retrain(settings or st.settings, st.db, run_id)


def _registry(st: Store) -> ModelRegistry:
    return ModelRegistry(st.db, st.settings.path("models"), st.settings.model)


def _serve_untrained(st: Store, tmp_path) -> str:
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path / "untrained.pt", build_network(TINY_MODEL),
                           build_loss_predictor(TINY_MODEL), TINY_MODEL)
    registry = _registry(st)
    version = registry.add(path, source="import").version
    registry.promote(version)
    return version


def test_first_model_is_promoted_and_validation_never_trains(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia)
    assert _run(st) == "promoted"
    entry = _registry(st).serving()
    summary, metrics = entry.data_summary, entry.metrics["validation"]
    train_ids, val_ids = set(summary["train"]["label_ids"]), set(summary["validation"]["label_ids"])
    assert train_ids.isdisjoint(val_ids)
    stored = dict(st.db.execute("SELECT id, split FROM labels").fetchall())
    assert train_ids == {i for i, s in stored.items() if s == "train"}
    assert val_ids == {i for i, s in stored.items() if s == "validation"}
    assert summary["validation"]["classes"]["normal"] > 0
    assert all(math.isfinite(metrics[k]) for k in ("auroc", "accuracy", "sensitivity",
                                                   "specificity", "ece"))
    assert entry.parent is None
    # the stored figure is the judged network's AUROC on exactly the validation labels
    # (the judge never trained on them; the served refit did, see the refit tests)
    val = load_split(st.db, "validation", st.settings.model)
    judge = _registry(st).load(entry.version).held_out_network
    probs = torch.softmax(image_logits(judge, val.images), 1)
    assert metrics["auroc"] == pytest.approx(classifier_auroc(probs, val.labels), abs=1e-9)
    run = last_run(st.db)
    assert run["state"] == "promoted" and run["candidate_version"] == entry.version
    assert run["labels_used"] == 340 and run["progress"] == 1.0


def test_better_candidate_is_promoted_and_rollback_restores_the_old_one(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia, rebalance=True)
    old = _serve_untrained(st, tmp_path)
    assert _run(st) == "promoted"
    registry = _registry(st)
    new = registry.serving()
    assert new.version != old and new.parent == old
    champion = new.metrics["champion_validation"]
    assert new.metrics["validation"]["auroc"] >= champion["auroc"] - 0.01
    coverage = new.data_summary["coverage"]  # embeddings of the serving (untrained) model
    assert coverage["rebalanced"] and coverage["radius"] > 0
    assert set(coverage["class_mix_before"]) == {"normal", "pneumonia"}
    assert registry.rollback().version == old
    assert registry.get(new.version).status == "rejected"


def test_worse_candidate_is_rejected_with_the_reason(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia)
    assert _run(st) == "promoted"
    serving = _registry(st).serving().version
    crippled = TINY_MODEL.model_copy(update={"training": TrainSettings(
        epochs=1, min_steps=0, batch_size=32, learning_rate=1e-7, seed=5)})
    worse = make_settings(tmp_path, model=crippled, warm_start=False, augment=False)
    assert _run(st, worse) == "rejected"
    registry = _registry(st)
    assert registry.serving().version == serving
    candidate = registry.get(last_run(st.db)["candidate_version"])
    assert candidate.status == "rejected" and "< serving" in candidate.note
    assert "rejected" in last_run(st.db)["message"]


def test_single_class_validation_does_not_make_a_first_model(tmp_path, pneumonia):
    st = Store(make_settings(tmp_path))
    x, y = subset(pneumonia, "train", 60)
    st.labelled(x, y, "train")
    xv, yv = subset(pneumonia, "val", 60)
    keep = yv == 1
    st.labelled(xv[torch.from_numpy(keep)], yv[keep], "validation")
    with pytest.raises(TrainingFailed, match="validation set holds 1 of 2 classes"):
        _run(st)
    assert _registry(st).list() == []  # no candidate judged without a class


def test_too_few_labels_fail_without_a_candidate(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia, n_train=3, n_val=5)
    with pytest.raises(TrainingFailed, match="min_train_studies"):
        _run(st)
    assert _registry(st).list() == []


def test_candidate_stores_its_operating_point_and_calibration(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia)
    assert _run(st) == "promoted"
    registry = _registry(st)
    entry = registry.serving()
    point = registry.load(entry.version).operating_point  # read back from the checkpoint
    assert registry.load(entry.version).epistemic.discriminator is None  # not under combined
    assert point.temperature != 1.0 and 0.0 < point.threshold < 1.0
    assert entry.metrics["operating_point"] == point.to_json()
    validation = entry.metrics["validation"]
    assert math.isfinite(validation["ece"]) and math.isfinite(validation["ece_uncalibrated"])
    # the temperature minimises the validation NLL: it is never worse than T = 1 there
    val = load_split(st.db, "validation", st.settings.model)
    logits = image_logits(registry.load(entry.version).network, val.images)
    nll = torch.nn.functional.cross_entropy
    assert nll(logits / point.temperature, val.labels) <= nll(logits, val.labels) + 1e-6


def test_reference_is_the_best_recent_model_so_the_tolerance_cannot_ratchet(tmp_path, pneumonia):
    """A good model A, then a worse B promoted within tolerance: a candidate as bad as B
    is judged against A, not against B, so the chain cannot slide down step by step."""
    st = _store(tmp_path, pneumonia)
    assert _run(st) == "promoted"  # A, trained
    registry = _registry(st)
    good = registry.serving().version
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "weak.pt", build_network(TINY_MODEL),
                           build_loss_predictor(TINY_MODEL), TINY_MODEL)
    weak = registry.add(path, source="import", parent=good).version
    registry.promote(weak)  # B: untrained, its parent A
    crippled = TINY_MODEL.model_copy(update={"training": TrainSettings(
        epochs=1, min_steps=0, batch_size=32, learning_rate=1e-7, seed=7)})
    tolerant = make_settings(tmp_path, model=crippled, promotion_tolerance=0.2,
                             reference_models=3, promotion_test="none")
    assert _run(st, tolerant) == "rejected"
    note = registry.get(last_run(st.db)["candidate_version"]).note
    assert f"reference {good}" in note
    alone = make_settings(tmp_path, model=crippled, promotion_tolerance=0.2, reference_models=1,
                          promotion_test="none")
    assert _run(st, alone) == "promoted"  # judged against B alone it would pass


def test_promoted_run_chooses_its_coverage_queries_in_the_worker(tmp_path, pneumonia):
    """The scoring thread only routes what the worker chose: no embedding of the pool on
    the daemon's scoring path."""
    st = _store(tmp_path, pneumonia, coverage_queries=3)
    x, _ = subset(pneumonia, "val", 20)
    pool = [st.add_study(x[i : i + 1]) for i in range(20)]  # scored, unlabelled
    assert _run(st) == "promoted"
    picks = last_run(st.db)["metrics"]["coverage_picks"]
    assert len(picks) == 3 and set(picks) <= set(pool)


def test_a_retrain_under_dal_fits_the_labelled_versus_unlabelled_classifier(tmp_path, pneumonia):
    """`gate.strategy: dal`: the promoted model's head holds a classifier fitted on every
    labelled image against the unlabelled pool (under other strategies it has none:
    `test_candidate_stores_its_operating_point_and_calibration`)."""
    from triage.gate.settings import GateSettings
    from triage.model.epistemic import pooled_features

    st = _store(tmp_path, pneumonia)
    x, _ = subset(pneumonia, "val", 30, seed=7)
    inverted = 1.0 - x  # an unlabelled pool unlike anything labelled
    for i in range(30):
        st.add_study(inverted[i : i + 1])
    dal = st.settings.model_copy(update={"gate": GateSettings(strategy="dal")})
    assert _run(st, dal) == "promoted"
    checkpoint = _registry(st).load(_registry(st).serving().version)
    found = checkpoint.epistemic.discriminator
    assert found is not None and (found.labelled, found.unlabelled) == (340, 30)
    train_x, _ = subset(pneumonia, "train", 240)
    p_pool = found.prob_unlabelled(pooled_features(checkpoint.network, inverted).numpy())
    p_labelled = found.prob_unlabelled(pooled_features(checkpoint.network, train_x).numpy())
    assert p_pool.mean() > 0.9 > 0.1 > p_labelled.mean()


def test_delong_promotion_test_records_the_noise_it_allowed(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia)
    assert _run(st) == "promoted"
    x, y = subset(pneumonia, "train", 300)  # new labels: a candidate unlike the served one
    st.labelled(x[240:], y[240:], "train")
    settings = make_settings(tmp_path, promotion_test="delong")
    _run(st, settings)
    metrics = last_run(st.db)["metrics"]
    assert 0 < metrics["candidate"]["auroc_noise"] < 0.2
    assert "noise" in metrics["decision"]


def test_refit_serves_a_model_trained_on_every_label_and_judges_with_the_candidate(
        tmp_path, pneumonia):
    """With refit_on_all_labels the served network has trained on the audit labels too;
    the decision, operating point and metrics stay the held-out candidate's, which the
    checkpoint keeps as its judge for later comparisons."""
    st = _store(tmp_path, pneumonia, refit_on_all_labels=True)
    assert _run(st) == "promoted"
    registry = _registry(st)
    entry = registry.serving()
    summary = entry.data_summary
    stored = dict(st.db.execute("SELECT id, split FROM labels").fetchall())
    assert set(summary["served_train"]["label_ids"]) == set(stored)  # train and validation
    assert set(summary["train"]["label_ids"]) == {i for i, s in stored.items() if s == "train"}
    assert entry.metrics["refit"]["studies"] == len(stored)
    checkpoint = registry.load(entry.version)
    assert checkpoint.judge is not None and checkpoint.held_out_network is checkpoint.judge
    val = load_split(st.db, "validation", st.settings.model)
    judge_probs = torch.softmax(image_logits(checkpoint.judge, val.images), 1)
    # the stored validation AUROC is the judge's: held out, not the refit's in-sample one
    assert entry.metrics["validation"]["auroc"] == pytest.approx(
        classifier_auroc(judge_probs, val.labels), abs=1e-9)
    served = image_logits(checkpoint.network, val.images)
    assert not torch.allclose(served, image_logits(checkpoint.judge, val.images))
    # the next run compares its candidate with the judge, never with the refit
    assert _run(st) in ("promoted", "rejected")
    run = last_run(st.db)
    assert run["metrics"]["champion"]["auroc"] == pytest.approx(
        entry.metrics["validation"]["auroc"], abs=1e-9)


def test_without_refit_the_served_model_is_the_judged_one(tmp_path, pneumonia):
    st = _store(tmp_path, pneumonia, refit_on_all_labels=False)
    assert _run(st) == "promoted"
    entry = _registry(st).serving()
    assert "served_train" not in entry.data_summary and "refit" not in entry.metrics
    assert _registry(st).load(entry.version).judge is None


def test_forgetting_counter_counts_correct_to_wrong_transitions():
    from triage.model.training import ForgettingCounter

    counter = ForgettingCounter(4)
    # example 0: right, wrong, right, wrong, right -> 2 events; 1: wrong throughout ->
    # never learned; 2: wrong, right, right -> 0 events, learned; 3: never presented
    for index, correct in (([0, 1, 2], [1, 0, 0]), ([0, 1, 2], [0, 0, 1]),
                           ([2, 0, 1], [1, 1, 0]), ([0, 0], [0, 1])):
        counter.update(torch.tensor(index), torch.tensor(correct, dtype=torch.bool))
    # the last batch drew example 0 twice: wrong (an event after right), then right
    assert counter.events.tolist() == [2, 0, 0, 0]
    assert counter.learned.tolist() == [True, False, True, False]


def test_each_retrain_records_the_forgetting_of_every_study_it_trained(tmp_path, pneumonia):
    """The served network's run (the refit on every label) stores each study's
    forgetting events; a study's figures add up over runs, the study view reads them,
    and with `retrain.unforgettable_weight` below 1 the studies never forgotten are
    drawn less."""
    from triage.training.runs import forgetting_of, unforgettable_studies

    st = _store(tmp_path, pneumonia, n_train=120, n_val=50)
    assert _run(st) == "promoted"
    rows = st.db.execute("SELECT run_id, study_id, events, learned FROM forgetting").fetchall()
    labelled = {row[0] for row in st.db.execute("SELECT study_id FROM labels")}
    assert len(rows) == 170 and {row[1] for row in rows} == labelled
    assert all(row[2] >= 0 and row[3] in (0, 1) for row in rows)
    assert sum(row[3] for row in rows) >= 150  # a trained model gets most films right
    second = st.settings.model_copy(update={"retrain": st.settings.retrain.model_copy(
        update={"unforgettable_weight": 0.05})})
    never = unforgettable_studies(st.db)
    assert never == {row[1] for row in rows if row[2] == 0 and row[3] == 1} and never
    _run(st, second)
    run = last_run(st.db)
    train = load_split(st.db, "train", st.settings.model)
    expected = sum(1 for g in train.groups.tolist() if train.study_ids[g] in never)
    assert run["metrics"]["coverage"]["unforgettable_images"] == expected > 0
    by_study: dict[int, list[tuple[int, int]]] = {}
    for _, study, events, learned in st.db.execute(
            "SELECT run_id, study_id, events, learned FROM forgetting").fetchall():
        by_study.setdefault(study, []).append((events, learned))
    for study, runs in list(by_study.items())[:20]:
        assert forgetting_of(st.db, study) == {
            "trainings": len(runs), "events": sum(e for e, _ in runs),
            "never_learned": sum(1 - k for _, k in runs)}
    assert forgetting_of(st.db, 10**9) is None
    # the reader's study view shows the same figures
    from triage.api.study_view import study_view
    from triage.review.auth import Principal

    study = next(iter(by_study))
    view = study_view(st.db, st.settings, study, Principal(1, "reader", "radiologist"), None)
    assert view["forgetting"] == forgetting_of(st.db, study)
