"""The random baseline: every study equally likely to be routed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

from triage.acquisition.base import Acquisition

if TYPE_CHECKING:
    from triage.gate import GateSettings
    from triage.model.inference import StudyResult


class RandomAcquisition(Acquisition):
    """Uniform random scores; the gate routes it at label_rate without ranking.

    Args:
        seed: Seed of this instance's generator (used by `score` only).
    """

    name: ClassVar[str] = "random"
    is_random: ClassVar[bool] = True

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_settings(cls, settings: GateSettings) -> Self:
        return cls(settings.seed)

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
