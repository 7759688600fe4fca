"""Strategy by MC uncertainty and predicted loss together."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.gate.strategies.base import (
    PREDICTED_LOSS,
    UNCERTAINTY,
    Strategy,
    StrategyOptions,
    uncertainty_score,
)
from triage.gate.strategies.predicted_loss import predicted_loss_of
from triage.model.measures import MEASURES

if TYPE_CHECKING:
    from triage.model.inference import StudyResult


class CombinedStrategy(Strategy):
    """Weighted uncertainty (one MC measure) + predicted loss, combined on ranks.

    Without a loss predictor, `components_with_fallback` uses the uncertainty for both.

    Args:
        measure: Uncertainty measure (see `triage.model.measures.MEASURES`).
        uncertainty_weight: Weight of the uncertainty component (>= 0).
        loss_weight: Weight of the predicted-loss component (>= 0); the two weights
            must not both be 0.
    """

    name: ClassVar[str] = "combined"

    def __init__(
        self, measure: str = "bald", uncertainty_weight: float = 0.5, loss_weight: float = 0.5
    ) -> None:
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if uncertainty_weight < 0 or loss_weight < 0 or uncertainty_weight + loss_weight <= 0:
            raise ValueError(
                "uncertainty_weight and loss_weight must be >= 0 and not both 0, got "
                f"{uncertainty_weight} and {loss_weight}"
            )
        self.measure = measure
        self.fallback_measure = measure
        self._weights = {UNCERTAINTY: uncertainty_weight, PREDICTED_LOSS: loss_weight}

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        return cls(options.uncertainty_measure, options.uncertainty_weight, options.loss_weight)

    def components(self, result: StudyResult) -> dict[str, float]:
        return {
            UNCERTAINTY: uncertainty_score(result, self.measure),
            PREDICTED_LOSS: predicted_loss_of(result),
        }

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)
