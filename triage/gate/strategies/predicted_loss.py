"""Strategy by the learned loss predictor (Yoo & Kweon 2019)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.gate.strategies.base import PREDICTED_LOSS, Strategy, StrategyOptions
from triage.model.measures import MEASURES

if TYPE_CHECKING:
    from triage.model.inference import StudyResult


def predicted_loss_of(result: StudyResult) -> float:
    """The study's predicted loss; ValueError when the model has no loss predictor."""
    if result.predicted_loss is None:
        raise ValueError("result has no predicted_loss (the model lacks a loss predictor)")
    return result.predicted_loss


class PredictedLossStrategy(Strategy):
    """The loss predictor's output (only its order is meaningful).

    Args:
        fallback_measure: Uncertainty measure that stands in for the predicted loss of
            a model without a loss predictor (`components_with_fallback`).
    """

    name: ClassVar[str] = "predicted_loss"

    def __init__(self, fallback_measure: str = "entropy") -> None:
        if fallback_measure not in MEASURES:
            raise ValueError(
                f"fallback_measure must be one of {MEASURES}, got {fallback_measure!r}"
            )
        self.fallback_measure = fallback_measure

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        return cls(options.uncertainty_measure)

    def components(self, result: StudyResult) -> dict[str, float]:
        return {PREDICTED_LOSS: predicted_loss_of(result)}

    @property
    def weights(self) -> dict[str, float]:
        return {PREDICTED_LOSS: 1.0}
