"""The random baseline: every study equally likely to be routed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

from triage.gate.strategies.base import Strategy, StrategyOptions

if TYPE_CHECKING:
    from triage.model.inference import StudyResult


class RandomStrategy(Strategy):
    """No components; its budget manager (`coin`) routes at label_rate without ranking.

    Args:
        seed: Seed of this instance's generator (used by `score` only).
    """

    name: ClassVar[str] = "random"
    has_scores: ClassVar[bool] = False
    default_budget_manager: ClassVar[str] = "coin"

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        return cls(options.seed)

    def components(self, result: StudyResult) -> dict[str, float]:
        return {}

    @property
    def weights(self) -> dict[str, float]:
        return {}

    def score(self, result: StudyResult) -> float:
        """A uniform draw in [0, 1) from this instance's generator."""
        return float(self._rng.random())

    def score_pool(self, results: Sequence[StudyResult]) -> np.ndarray:
        return self._rng.random(len(results))
