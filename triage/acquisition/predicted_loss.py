"""Acquisition by the learned loss predictor (Yoo & Kweon 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.acquisition.base import PREDICTED_LOSS, Acquisition

if TYPE_CHECKING:
    from triage.gate import GateSettings
    from triage.model.inference import StudyResult


def predicted_loss_of(result: StudyResult) -> float:
    """The study's predicted loss; ValueError when the model has no loss predictor."""
    if result.predicted_loss is None:
        raise ValueError("result has no predicted_loss (the model lacks a loss predictor)")
    return result.predicted_loss


class PredictedLossAcquisition(Acquisition):
    """The loss predictor's output (only its order is meaningful)."""

    name: ClassVar[str] = "predicted_loss"

    @classmethod
    def from_settings(cls, settings: GateSettings) -> Self:
        return cls()

    def components(self, result: StudyResult) -> dict[str, float]:
        return {PREDICTED_LOSS: predicted_loss_of(result)}

    @property
    def weights(self) -> dict[str, float]:
        return {PREDICTED_LOSS: 1.0}
