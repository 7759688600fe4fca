"""The operating point: temperature scaling and the Youden threshold, on checkable numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from triage.model.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    OperatingPoint,
    fit_operating_point,
    fit_temperature,
    youden_threshold,
)
from triage.model.training import classifier_auroc
from triage.training.evaluate import expected_calibration_error

LN3 = math.log(3.0)


def calibrated_logits(n: int = 4000, classes: int = 2, seed: int = 0, shift: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a perfectly calibrated model: labels are drawn from softmax(logits).

    `shift` is added to the last class's logit (negative: a rarer last class)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=gen, dtype=torch.float64) * 2.0
    logits[:, -1] += shift
    labels = torch.multinomial(torch.softmax(logits, dim=1), 1, generator=gen).squeeze(1)
    return logits, labels


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, labels))


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    probs = torch.softmax(logits.double() / temperature, dim=1).numpy()
    return expected_calibration_error(probs, labels.numpy())


# ---- temperature ------------------------------------------------------------------------


def test_temperature_of_a_hand_made_table_is_exact() -> None:
    # every row has logit gap 2 ln 3 and 3 of 4 rows are class 1: the calibrated
    # probability is 3/4 = sigmoid(2 ln 3 / T), so T = 2 exactly
    logits = torch.tensor([[0.0, 2 * LN3]] * 4)
    labels = torch.tensor([1, 1, 1, 0])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, abs=1e-4)
    probs = OperatingPoint(2.0, None).probabilities(logits)
    assert probs[0].tolist() == pytest.approx([0.25, 0.75])


def test_temperature_recovers_an_overconfident_model_scaled_by_three() -> None:
    logits, labels = calibrated_logits()
    fitted = fit_temperature(logits * 3.0, labels)
    assert fitted == pytest.approx(3.0, rel=0.1)


def test_temperature_of_a_calibrated_model_stays_near_one() -> None:
    logits, labels = calibrated_logits()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)
    three, three_labels = calibrated_logits(classes=3, seed=1)
    assert fit_temperature(three, three_labels) == pytest.approx(1.0, abs=0.1)


def test_an_underconfident_model_gets_a_temperature_below_one() -> None:
    logits, labels = calibrated_logits()
    assert fit_temperature(logits / 2.0, labels) == pytest.approx(0.5, rel=0.1)


def test_fitting_lowers_nll_and_ece_and_keeps_auroc() -> None:
    logits, labels = calibrated_logits(seed=2)
    overconfident = logits * 3.0
    fitted = fit_temperature(overconfident, labels)
    assert nll(overconfident, labels, fitted) < nll(overconfident, labels, 1.0) - 0.1
    before, after = ece(overconfident, labels, 1.0), ece(overconfident, labels, fitted)
    assert before > 0.1 and after < 0.03 and after < before / 3
    raw = torch.softmax(overconfident, dim=1)
    scaled = OperatingPoint(fitted, None).probabilities(overconfident)
    assert classifier_auroc(scaled, labels) == pytest.approx(classifier_auroc(raw, labels),
                                                             abs=1e-9)
    # the order of the positive-class probability (hence any ranking) is unchanged
    assert torch.equal(torch.argsort(raw[:, 1]), torch.argsort(scaled[:, 1]))


def test_fitted_nll_is_a_minimum() -> None:
    logits, labels = calibrated_logits(n=500, seed=3)
    z = logits * 1.7
    fitted = fit_temperature(z, labels)
    best = nll(z, labels, fitted)
    for factor in (0.9, 0.99, 1.01, 1.1):
        assert best <= nll(z, labels, fitted * factor) + 1e-12


def test_temperature_without_two_classes_or_rows_is_one() -> None:
    assert fit_temperature(torch.tensor([[0.0, 5.0]]), torch.tensor([1])) == 1.0
    assert fit_temperature(torch.tensor([[0.0, 5.0], [1.0, 0.0]]), torch.tensor([1, 1])) == 1.0


def test_temperature_is_clamped_to_its_range() -> None:
    # labels opposite to confident logits: the NLL falls as T grows without bound
    logits = torch.tensor([[0.0, 4.0], [4.0, 0.0]] * 3)
    labels = torch.tensor([0, 1] * 3)
    assert fit_temperature(logits, labels) == pytest.approx(MAX_TEMPERATURE)
    # separable and right: T shrinks to the floor
    assert fit_temperature(logits, 1 - labels) == pytest.approx(MIN_TEMPERATURE)


def test_temperature_accepts_any_integer_label_dtype() -> None:
    logits = torch.tensor([[0.0, 2 * LN3]] * 4)
    for dtype in (torch.int32, torch.int64, torch.uint8):
        labels = torch.tensor([1, 1, 1, 0], dtype=dtype)
        assert fit_temperature(logits, labels) == pytest.approx(2.0, abs=1e-4)


def test_temperature_refuses_bad_shapes_and_float_labels() -> None:
    with pytest.raises(ValueError, match="logits must be"):
        fit_temperature(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must hold class indices"):
        fit_temperature(torch.zeros(4, 2), torch.tensor([0.0, 1.0, 0.0, 1.0]))


# ---- Youden threshold -------------------------------------------------------------------


def test_youden_threshold_of_a_hand_made_table() -> None:
    # positives 0.35, 0.8; negatives 0.1, 0.4. Cuts and J = sens + spec - 1:
    #   0.225 -> sens 1,   spec 1/2 -> 0.5
    #   0.375 -> sens 1/2, spec 1/2 -> 0
    #   0.6   -> sens 1/2, spec 1   -> 0.5   (tie with 0.225; 0.6 is nearer 0.5)
    assert youden_threshold([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.6)
    # separable: the midpoint of the gap
    assert youden_threshold([0.1, 0.2, 0.7, 0.9], [0, 0, 1, 1]) == pytest.approx(0.45)
    # a skewed table: few positives, all scored low; J picks 0.15, not 0.5
    scores = [0.01, 0.02, 0.05, 0.1, 0.1, 0.2, 0.25, 0.3]
    labels = [0, 0, 0, 0, 0, 1, 1, 1]
    assert youden_threshold(np.array(scores), np.array(labels)) == pytest.approx(0.15)
    assert youden_threshold(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(0.15)


def test_youden_threshold_degenerate_cases_give_half() -> None:
    assert youden_threshold([0.2, 0.9], [1, 1]) == 0.5
    assert youden_threshold([0.2, 0.9], [0, 0]) == 0.5
    assert youden_threshold([0.3, 0.3], [0, 1]) == 0.5  # no cut separates anything
    with pytest.raises(ValueError, match="same length"):
        youden_threshold([0.1, 0.2, 0.3], [0, 1])


def test_operating_point_fit_on_a_skewed_validation_set() -> None:
    logits, labels = calibrated_logits(seed=4, shift=-2.0)  # a rarer positive class
    assert 0.05 < labels.float().mean() < 0.3
    point = fit_operating_point(logits * 3.0, labels)
    assert point.temperature == pytest.approx(3.0, rel=0.1)
    probs = point.probabilities(logits * 3.0).numpy()
    predicted = point.predict(probs)
    y = labels.numpy()
    j = lambda pred: (pred[y == 1] == 1).mean() + (pred[y == 0] == 0).mean() - 1  # noqa: E731
    assert point.threshold < 0.5
    assert j(predicted) >= j(probs.argmax(axis=1))
    # more than two classes: temperature only, argmax
    three, three_labels = calibrated_logits(classes=3, seed=5)
    assert fit_operating_point(three, three_labels).threshold is None


# ---- OperatingPoint ---------------------------------------------------------------------


def test_predict_thresholds_the_positive_class() -> None:
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.95, 0.05]])
    assert OperatingPoint(1.0, 0.3).predict(probs).tolist() == [1, 1, 1, 0]
    assert OperatingPoint(1.0, 0.65).predict(probs).tolist() == [0, 0, 0, 0]
    assert OperatingPoint(1.0, 0.0).predict(probs).tolist() == [1, 1, 1, 1]
    assert OperatingPoint(1.0, 1.0).predict(probs).tolist() == [0, 0, 0, 0]
    assert OperatingPoint(1.0, 0.5).predict(probs).tolist() == [0, 1, 1, 0]  # >= at a tie
    assert OperatingPoint(1.0, None).predict(probs).tolist() == [0, 1, 0, 0]  # argmax
    assert OperatingPoint(1.0, 0.3).predict(torch.tensor(probs)).tolist() == [1, 1, 1, 0]
    # the threshold only applies to two classes
    three = np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    assert OperatingPoint(1.0, 0.1).predict(three).tolist() == [2, 1]
    with pytest.raises(ValueError, match="probs must be"):
        OperatingPoint().predict(np.array([0.4, 0.6]))


def test_from_json_without_a_point_is_exactly_argmax() -> None:
    for stored in (None, {}):
        point = OperatingPoint.from_json(stored)
        assert point == OperatingPoint(1.0, None)
        logits = torch.tensor([[0.3, -1.2], [0.0, 0.0], [-2.0, 1.0]])
        assert torch.equal(point.probabilities(logits), torch.softmax(logits, dim=-1))
        probs = np.array([[0.5, 0.5], [0.49, 0.51]])
        assert point.predict(probs).tolist() == probs.argmax(axis=1).tolist() == [0, 1]


def test_from_json_round_trip_and_defaults() -> None:
    point = OperatingPoint(1.83, 0.27)
    text = json.dumps(point.to_json())
    assert json.loads(text) == {"temperature": 1.83, "threshold": 0.27}
    assert OperatingPoint.from_json(json.loads(text)) == point
    assert OperatingPoint.from_json({"temperature": 2}) == OperatingPoint(2.0, None)
    assert OperatingPoint.from_json({"threshold": 0.4}) == OperatingPoint(1.0, 0.4)
    assert OperatingPoint.from_json({"temperature": None, "threshold": None}) == \
        OperatingPoint(1.0, None)
    assert OperatingPoint.from_json({"temperature": "1.5", "threshold": "0.2"}) == \
        OperatingPoint(1.5, 0.2)


@pytest.mark.parametrize("temperature", [0, -1.0, math.nan, math.inf, "hot", True])
def test_a_bad_temperature_is_named(temperature) -> None:
    with pytest.raises(ValueError, match="temperature"):
        OperatingPoint(temperature, 0.5)
    with pytest.raises(ValueError, match="temperature"):
        OperatingPoint.from_json({"temperature": temperature, "threshold": 0.5})


@pytest.mark.parametrize("threshold", [-0.1, 1.5, math.nan, "high", [0.5]])
def test_a_bad_threshold_is_named(threshold) -> None:
    with pytest.raises(ValueError, match="threshold"):
        OperatingPoint(1.0, threshold)
    with pytest.raises(ValueError, match="threshold"):
        OperatingPoint.from_json({"temperature": 1.0, "threshold": threshold})


def test_from_json_refuses_a_non_mapping() -> None:
    with pytest.raises(ValueError, match="operating_point"):
        OperatingPoint.from_json([1.0, 0.5])  # type: ignore[arg-type]
