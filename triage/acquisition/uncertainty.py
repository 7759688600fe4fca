"""Acquisition by one MC-dropout uncertainty measure: `entropy` and `bald`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.acquisition.base import UNCERTAINTY, Acquisition, uncertainty_score

if TYPE_CHECKING:
    from triage.gate import GateSettings
    from triage.model.inference import StudyResult


class EntropyAcquisition(Acquisition):
    """Predictive entropy (bits) of the MC mean probabilities."""

    name: ClassVar[str] = "entropy"
    measure: ClassVar[str] = "entropy"

    @classmethod
    def from_settings(cls, settings: GateSettings) -> Self:
        return cls()

    def components(self, result: StudyResult) -> dict[str, float]:
        return {UNCERTAINTY: uncertainty_score(result, self.measure)}

    @property
    def weights(self) -> dict[str, float]:
        return {UNCERTAINTY: 1.0}


class BaldAcquisition(EntropyAcquisition):
    """BALD mutual information (bits) between prediction and dropout mask."""

    name: ClassVar[str] = "bald"
    measure: ClassVar[str] = "bald"
