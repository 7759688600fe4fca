"""The model registry: add, promote, reject, rollback, show, and the promotion rule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from triage.model.checkpoint import save_checkpoint
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.registry import ModelError, ModelRegistry, promotion_decision
from triage.model.settings import ModelSettings
from triage.store import db as store

TINY = ModelSettings(input_size=16, channels=(4, 8), subunits=1, lossnet_width=8)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    db = store.connect(tmp_path / "triage.db")
    yield ModelRegistry(db, tmp_path / "models", TINY)
    db.close()


def _checkpoint(tmp_path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(tmp_path / f"ck{seed}.pt", build_network(TINY),
                           build_loss_predictor(TINY), TINY)


def _statuses(registry: ModelRegistry) -> dict[str, str]:
    return {entry.version: entry.status for entry in registry.list()}


def test_add_keeps_metrics_summary_parent_and_show_returns_them(registry, tmp_path):
    entry = registry.add(_checkpoint(tmp_path), source="retrain:1", parent=None,
                         metrics={"validation": {"auroc": 0.9}},
                         data_summary={"train": {"label_ids": [1, 2]}})
    assert entry.status == "candidate" and entry.data_summary == {"train": {"label_ids": [1, 2]}}
    shown = registry.show(entry.version)
    assert shown["metrics"]["validation"]["auroc"] == 0.9
    assert shown["data_summary"]["train"]["label_ids"] == [1, 2]
    assert "data_summary" not in entry.to_json()  # `models list --json` stays small


def test_promote_retires_previous_and_rollback_restores_it(registry, tmp_path):
    first = registry.add(_checkpoint(tmp_path, 0), source="import").version
    second = registry.add(_checkpoint(tmp_path, 1), source="retrain:1", parent=first).version
    registry.promote(first)
    registry.promote(second)
    assert _statuses(registry) == {first: "retired", second: "serving"}
    assert registry.rollback().version == first
    assert _statuses(registry) == {first: "serving", second: "rejected"}
    assert "rolled back" in registry.get(second).note
    with pytest.raises(ModelError, match="nothing to roll back to"):
        registry.rollback()  # the rolled-back version is never served again by rollback
    assert _statuses(registry) == {first: "serving", second: "rejected"}


def test_rollback_goes_further_back_each_time(registry, tmp_path):
    versions = [registry.add(_checkpoint(tmp_path, s), source="import").version for s in range(3)]
    for version in versions:
        registry.promote(version)
    assert registry.rollback().version == versions[1]
    assert registry.rollback().version == versions[0]
    assert registry.serving().version == versions[0]


def test_rollback_without_serving_model_is_a_clear_error(registry, tmp_path):
    with pytest.raises(ModelError, match="no model is serving"):
        registry.rollback()
    registry.promote(registry.add(_checkpoint(tmp_path), source="import").version)
    with pytest.raises(ModelError, match="only version ever promoted"):
        registry.rollback()


def test_reject_keeps_reason_and_refuses_the_serving_model(registry, tmp_path):
    serving = registry.add(_checkpoint(tmp_path, 0), source="import").version
    registry.promote(serving)
    candidate = registry.add(_checkpoint(tmp_path, 1), source="retrain:2").version
    entry = registry.reject(candidate, "validation AUROC 0.6 < serving 0.9 - tolerance 0.01")
    assert entry.status == "rejected" and "0.6 < serving 0.9" in entry.note
    with pytest.raises(ModelError, match="rollback"):
        registry.reject(serving, "no")
    assert registry.serving().version == serving


def test_promote_with_also_is_one_transaction(registry, tmp_path):
    first = registry.add(_checkpoint(tmp_path, 0), source="import").version
    registry.promote(first)
    second = registry.add(_checkpoint(tmp_path, 1), source="import").version

    def fail(db):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        registry.promote(second, also=fail)
    assert _statuses(registry) == {first: "serving", second: "candidate"}


GOOD = {"auroc": 0.9, "accuracy": 0.8, "sensitivity": 0.8, "specificity": 0.8, "ece": 0.05}


@pytest.mark.parametrize(
    ("candidate", "champion", "promote", "why"),
    [
        (GOOD, None, True, "first model"),
        ({**GOOD, "auroc": math.nan}, None, False, "not finite: auroc"),
        ({**GOOD, "ece": math.inf}, {"auroc": 0.5}, False, "not finite: ece"),
        (GOOD, {"auroc": 0.905}, True, ">= serving"),  # within tolerance 0.01
        ({**GOOD, "auroc": 0.85}, {"auroc": 0.9}, False, "< serving"),
        (GOOD, {"auroc": math.nan}, True, "no finite AUROC"),
        (None, None, False, "no validation metrics"),
    ],
)  # fmt: skip
def test_promotion_rule(candidate, champion, promote, why):
    ok, reason = promotion_decision(candidate, champion, 0.01)
    assert ok is promote and why in reason


def test_promotion_rule_checks_tolerance():
    with pytest.raises(ValueError, match="tolerance"):
        promotion_decision(GOOD, None, -0.1)
