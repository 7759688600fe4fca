"""Acquisition functions: which studies are most worth a radiologist's label.

Use `make_acquisition(settings)` to build the function named by
`GateSettings.strategy`. To add one, write a file with an `Acquisition`
subclass and add it to `REGISTRY` below.
"""

from types import MappingProxyType
from typing import TYPE_CHECKING

from triage.acquisition.base import (
    NO_LOSS_PREDICTOR,
    PREDICTED_LOSS,
    UNCERTAINTY,
    Acquisition,
    uncertainty_score,
)
from triage.acquisition.combined import CombinedAcquisition
from triage.acquisition.predicted_loss import PredictedLossAcquisition
from triage.acquisition.random_baseline import RandomAcquisition
from triage.acquisition.uncertainty import BaldAcquisition, EntropyAcquisition

if TYPE_CHECKING:
    from triage.gate import GateSettings

REGISTRY = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            RandomAcquisition,
            EntropyAcquisition,
            BaldAcquisition,
            PredictedLossAcquisition,
            CombinedAcquisition,
        )
    }
)
"""Acquisition classes by name (read-only)."""


def make_acquisition(settings: "GateSettings") -> Acquisition:
    """The acquisition function named by `settings.strategy`, built from `settings`."""
    try:
        cls = REGISTRY[settings.strategy]
    except KeyError:
        raise ValueError(
            f"strategy must be one of {sorted(REGISTRY)}, got {settings.strategy!r}"
        ) from None
    return cls.from_settings(settings)


__all__ = [
    "NO_LOSS_PREDICTOR",
    "PREDICTED_LOSS",
    "REGISTRY",
    "UNCERTAINTY",
    "Acquisition",
    "BaldAcquisition",
    "CombinedAcquisition",
    "EntropyAcquisition",
    "PredictedLossAcquisition",
    "RandomAcquisition",
    "make_acquisition",
    "uncertainty_score",
]
