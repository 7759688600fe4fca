"""Strategies: the score of each study, larger = more worth a radiologist's label.

Use `make_strategy(settings)` to build the strategy named by `gate.strategy`. To add
one, write a file with a `Strategy` subclass and add it to `STRATEGIES` below; which
scored studies are routed is the budget manager's part (`triage.gate.budget_managers`).
"""

from collections.abc import Mapping
from types import MappingProxyType

from triage.gate.strategies.alfa_mix import AlfaMixStrategy
from triage.gate.strategies.auto import AuditOutcome, AutoStrategy, audit_mix
from triage.gate.strategies.badge import BadgeStrategy
from triage.gate.strategies.base import (
    FALLBACK_REASONS,
    NO_DISCRIMINATOR,
    NO_EPISTEMIC_HEAD,
    NO_LOSS_PREDICTOR,
    PREDICTED_LOSS,
    UNCERTAINTY,
    Strategy,
    StrategyOptions,
    midranks,
    uncertainty_score,
)
from triage.gate.strategies.combined import CombinedStrategy
from triage.gate.strategies.committee import (
    ConsensusEntropyStrategy,
    MaxDisagreementStrategy,
    VoteEntropyStrategy,
)
from triage.gate.strategies.dal import DalStrategy
from triage.gate.strategies.emoc import EmocStrategy
from triage.gate.strategies.predicted_loss import PredictedLossStrategy
from triage.gate.strategies.random import RandomStrategy
from triage.gate.strategies.uncertainty import (
    BaldStrategy,
    EntropyStrategy,
    LeastConfidenceStrategy,
    MarginStrategy,
)

STRATEGIES: Mapping[str, type[Strategy]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            RandomStrategy,
            EntropyStrategy,
            BaldStrategy,
            MarginStrategy,
            LeastConfidenceStrategy,
            VoteEntropyStrategy,
            ConsensusEntropyStrategy,
            MaxDisagreementStrategy,
            BadgeStrategy,
            AlfaMixStrategy,
            EmocStrategy,
            DalStrategy,
            PredictedLossStrategy,
            CombinedStrategy,
            AutoStrategy,
        )
    }
)
"""Strategy classes by name (read-only)."""


def make_strategy(options: StrategyOptions) -> Strategy:
    """The strategy named by `options.strategy` (a `GateSettings`), built from `options`."""
    try:
        cls = STRATEGIES[options.strategy]
    except KeyError:
        raise ValueError(
            f"strategy must be one of {sorted(STRATEGIES)}, got {options.strategy!r}"
        ) from None
    return cls.from_settings(options)


__all__ = [
    "FALLBACK_REASONS",
    "NO_DISCRIMINATOR",
    "NO_EPISTEMIC_HEAD",
    "NO_LOSS_PREDICTOR",
    "PREDICTED_LOSS",
    "STRATEGIES",
    "UNCERTAINTY",
    "AlfaMixStrategy",
    "AuditOutcome",
    "AutoStrategy",
    "BadgeStrategy",
    "BaldStrategy",
    "CombinedStrategy",
    "ConsensusEntropyStrategy",
    "DalStrategy",
    "EmocStrategy",
    "EntropyStrategy",
    "LeastConfidenceStrategy",
    "MarginStrategy",
    "MaxDisagreementStrategy",
    "PredictedLossStrategy",
    "RandomStrategy",
    "Strategy",
    "StrategyOptions",
    "VoteEntropyStrategy",
    "audit_mix",
    "make_strategy",
    "midranks",
    "uncertainty_score",
]
