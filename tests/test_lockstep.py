"""The lockstep benchmark loop: deterministic, paired, and built from the daemon's parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triage.config import Settings
from triage.model.settings import ModelSettings, TrainSettings
from triage.replay.datasets import find_data_dir, images_to_tensor, labels_to_tensor
from triage.replay.datasets import load_pneumoniamnist_dev as load_dev
from triage.replay.lockstep import Data, Lockstep, RunSpec, oracle, stream_order

pytestmark = pytest.mark.skipif(
    find_data_dir() is None,
    reason="PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place it in ../shared/data",
)

TINY = ModelSettings(
    input_size=28, channels=(8, 16), subunits=1, lossnet_width=16, mc_samples=5,
    training=TrainSettings(epochs=3, min_steps=20, batch_size=32),
)


@pytest.fixture(scope="module")
def data() -> Data:
    """Dev images only: the dev val split stands in for the holdout, which tests never read."""
    dev = load_dev()
    pick = np.random.default_rng(0).permutation(len(dev["train_labels"]))[:900]  # file is sorted
    x, y = images_to_tensor(dev["train_images"][pick], 28), labels_to_tensor(
        dev["train_labels"][pick])
    vx, vy = images_to_tensor(dev["val_images"], 28), labels_to_tensor(dev["val_labels"])
    return Data(x, y, vx[:200], vy[:200], vx[200:], vy[200:])


def _settings() -> Settings:
    return Settings(
        model=TINY,
        gate={"label_rate": 0.2, "exploration_rate": 0.05},
        retrain={"min_new_labels": 40, "min_validation_studies": 8, "min_train_studies": 10,
                 "coverage_queries": 3},
    )


def _run(data: Data, seed: int, strategy: str = "default", fresh_seeds: int = 1) -> Lockstep:
    loop = Lockstep(_settings(), data, RunSpec("uniform", 0.2, strategy, seed, length=600,
                                               fresh_seeds=fresh_seeds))
    loop.result = loop.run()
    return loop


def test_same_seed_gives_the_same_labels_and_auroc(data):
    first, second = _run(data, 1), _run(data, 1)
    assert first.routed == second.routed  # same studies, same reasons
    for key in ("holdout_auroc", "holdout_accuracy", "fresh_holdout_auroc", "labels",
                "retrains", "curve"):
        assert first.result[key] == second.result[key], key
    assert first.result["promotions"] >= 1  # the loop really trained and served a model
    assert first.result["seconds"] > 0
    other = _run(data, 2)
    assert other.routed != first.routed


def test_strategies_share_the_stream_and_the_budget(data):
    entropy, random = _run(data, 3, "entropy"), _run(data, 3, "random")
    assert torch.equal(entropy.images, random.images)  # same order for every strategy
    for loop in (entropy, random):
        share = len(loop.routed) / 600
        assert 0.14 <= share <= 0.26, share  # all routes together track the budget
    reasons = set(entropy.routed.values())
    assert {"cold_start", "audit"} <= reasons and reasons & {"uncertainty", "both"}


def test_auto_learns_its_mix_from_the_audits_the_run_labels(data):
    loop = _run(data, 3, "auto")
    result = loop.result
    audits = [p for p, reason in loop.routed.items() if reason == "audit"]
    # every audit ranked by a model came back with its reward, and nothing else did
    assert 0 < len(loop.audit_outcomes) == result["auto_audits"] <= len(audits)
    assert result["auto_mix"] == loop.gate.strategy.mix(loop.audit_outcomes)
    assert result["auto_mix"] != pytest.approx(dict.fromkeys(result["auto_mix"], 0.2))
    share = len(loop.routed) / 600
    assert 0.14 <= share <= 0.26, share  # any mix keeps the budget
    ranked = sum(result["routed_by_expert"].values())
    assert ranked == sum(1 for r in loop.routed.values()
                         if r not in ("audit", "cold_start", "warmup", "coverage"))


def test_badge_batches_decide_every_study_once_within_the_budget_and_the_wait(data):
    loop = _run(data, 3, "badge+batch")
    result, gate = loop.result, loop.settings.gate
    assert gate.budget_manager == "batch" and not loop.batch  # the last batch was decided
    assert loop.gate.sequence == 600  # every study decided, once
    cold = sum(1 for r in loop.routed.values() if r == "cold_start")
    assert result["batch"]["studies"] == len(loop.batch_waits) > 100
    assert result["batch"]["batches"] >= result["batch"]["studies"] / gate.batch_size
    assert 0 <= result["batch"]["wait_seconds_max"] <= gate.batch_seconds
    reasons = set(loop.routed.values())
    assert "batch" in reasons and not reasons & {"uncertainty", "badge", "warmup"}
    assert cold > 0
    share = len(loop.routed) / 600
    assert 0.14 <= share <= 0.26, share
    assert 0 < result["labels_positive_share"] < 1


def test_drift_stream_holds_the_rarer_class_back():
    labels = torch.tensor([0] * 250 + [1] * 750)
    order = stream_order(labels, RunSpec("drift", 0.1, "random", 0))
    first_half = labels[torch.from_numpy(order[:500])]
    assert (first_half == 0).float().mean() < 0.1  # scarce early...
    assert sorted(order.tolist()) == list(range(1000))  # ...but every study arrives


def test_oracle_noise_flips_the_same_studies_for_every_strategy():
    spec = RunSpec("uniform", 0.1, "random", 4, noise=0.2)
    flipped = [oracle(1, p, spec, 2) != 1 for p in range(2000)]
    assert 0.17 < sum(flipped) / 2000 < 0.23
    again = RunSpec("uniform", 0.1, "entropy", 4, noise=0.2)
    assert flipped == [oracle(1, p, again, 2) != 1 for p in range(2000)]
    assert all(oracle(0, p, RunSpec("uniform", 0.1, "random", 4), 2) == 0 for p in range(50))


def test_a_quiet_stream_ends_with_an_idle_run_that_trains_on_every_label(data):
    """The labels still waiting when the stream ends start a final run (`idle`, or
    `labels` when min_new_labels of them came back at once); with the refit, the model
    served at the end trained on every label that came back."""
    loop = _run(data, 3, "default+refit", fresh_seeds=2)  # refit is the default now
    result = loop.result
    final = result["retrains"][-1]
    assert final["at"] == 600 and final["state"] == "promoted", final  # after the stream
    assert final["trigger"] in ("idle", "labels")
    assert result["served_train_labels"] == result["labels_returned"]
    assert 0 < result["labels_returned_by_tail"] <= result["labels_returned"]
    assert all(r["refit"]["studies"] == r["train"] + r["validation"]
               for r in result["retrains"] if r["state"] == "promoted")
    # the served model is the fresh model then, and the run does not train it twice:
    # training the fresh model anyway gives the same holdout AUROC to the last digit
    assert result["fresh_is_served"]
    first, second = result["fresh_holdout_auroc_members"]
    assert loop._fresh_auroc() == first == result["holdout_auroc"]
    # the fresh score is the mean over training seeds: the second one trained again here
    assert loop._fresh_auroc(1) == second != first
    assert result["fresh_holdout_auroc"] == pytest.approx((first + second) / 2)
    assert result["fresh_ensemble_holdout_auroc"] is not None


def test_a_run_scores_the_ensemble_of_its_last_promoted_models(data):
    loop = _run(data, 5)
    result = loop.result
    assert result["promotions"] >= 3, result["retrains"]
    served = [c for _, c in loop.serving]
    probs = [loop._holdout_probabilities(c) for c in served[:3]]
    y = data.holdout_labels
    from triage.model.training import classifier_auroc

    # the newest model alone is the served model; two and three average their probabilities
    assert classifier_auroc(probs[0], y) == pytest.approx(result["holdout_auroc"])
    for k in (2, 3):
        expected = classifier_auroc(torch.stack(probs[:k]).mean(0), y)
        assert result[f"served_last{k}_holdout_auroc"] == expected
        assert result[f"served_last{k}_minus_served"] == pytest.approx(
            expected - result["holdout_auroc"])
    with pytest.raises(ValueError, match="fresh_seeds"):
        Lockstep(_settings(), data, RunSpec("uniform", 0.2, "default", 0, fresh_seeds=0))


def test_the_benchmark_applies_its_overrides_to_the_run_and_its_fresh_model():
    import importlib.util

    from conftest import REPO

    module = importlib.util.spec_from_file_location("bench_label_efficiency",
                                                    REPO / "bench" / "label_efficiency.py")
    bench = importlib.util.module_from_spec(module)
    module.loader.exec_module(bench)
    from triage.config import ConfigError
    from triage.replay.lockstep import run_settings

    spec = RunSpec("uniform", 0.1, "default", 4, overrides=(
        "model.strides=[1, 2, 2, 2]", "model.training.epochs=7", "retrain.augment=false"))
    settings = run_settings(bench.base_settings(spec), spec)
    assert settings.model.strides == (1, 2, 2, 2) and settings.model.input_size == 28
    assert settings.model.training.epochs == 7 and settings.model.training.seed == 4
    assert not settings.retrain.augment
    assert bench.arm({"strategy": "default", "overrides": list(spec.overrides)}).startswith(
        "default [model.strides")
    # a stored run is reused only under the settings it ran with: the key holds their
    # digest, which every setting the loop reads changes (here through --set)
    plain = RunSpec("uniform", 0.1, "default", 4)
    tweaked = RunSpec("uniform", 0.1, "default", 4, overrides=("retrain.min_new_labels=51",))
    assert bench.fingerprint(plain) == bench.fingerprint(RunSpec("uniform", 0.1, "default", 4))
    assert bench.fingerprint(plain) != bench.fingerprint(tweaked)
    assert bench.fingerprint(plain) != bench.fingerprint(RunSpec("uniform", 0.1, "bald", 4))
    stored = {**plain.__dict__, "settings": bench.fingerprint(plain)}
    assert bench._key(stored) == bench._key(plain.__dict__, bench.fingerprint(plain))
    assert bench._key({**stored, "settings": "0" * 12}) != bench._key(stored)
    # a setting added later is left out of the digest at its neutral value only
    (path, neutral), = [(p, v) for p, v in bench.ADDED_SETTINGS.items()
                        if p == ("model", "training", "cycles")]
    other = RunSpec("uniform", 0.1, "default", 4,
                    overrides=(f"model.training.cycles={neutral + 1}",))
    assert bench.fingerprint(other) != bench.fingerprint(plain)
    again = RunSpec("uniform", 0.1, "default", 4, overrides=(f"model.training.cycles={neutral}",))
    assert bench.fingerprint(again) == bench.fingerprint(plain)
    with pytest.raises(ConfigError, match="model.training.epochs"):
        bench.base_settings(RunSpec("uniform", 0.1, "default", 0,
                                    overrides=("model.training.epochs=0",)))
