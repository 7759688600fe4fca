"""Strategy by one MC-dropout uncertainty measure: `entropy` and `bald`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.gate.strategies.base import UNCERTAINTY, Strategy, StrategyOptions, uncertainty_score

if TYPE_CHECKING:
    from triage.model.inference import StudyResult


class EntropyStrategy(Strategy):
    """Predictive entropy (bits) of the MC mean probabilities."""

    name: ClassVar[str] = "entropy"
    measure: ClassVar[str] = "entropy"

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        return cls()

    def components(self, result: StudyResult) -> dict[str, float]:
        return {UNCERTAINTY: uncertainty_score(result, self.measure)}

    @property
    def weights(self) -> dict[str, float]:
        return {UNCERTAINTY: 1.0}


class BaldStrategy(EntropyStrategy):
    """BALD mutual information (bits) between prediction and dropout mask."""

    name: ClassVar[str] = "bald"
    measure: ClassVar[str] = "bald"
