"""The strategy interface: the score of each study.

A strategy turns a study's `StudyResult` into named raw component
scores (larger = more worth labelling) and the weights that combine them. The
gate makes each component scale-free by its rank in a rolling window before
weighting; `score` (weighted raw sum) and `score_pool` (weighted within-pool
ranks) serve offline ranking. A new function is one file: subclass
`Strategy`, then add the class to `triage.gate.strategies.STRATEGIES`.

`components` needs every input its components use (a model without a loss
predictor gives no predicted loss, one without an epistemic head no embedding).
`components_with_fallback`, which the daemon's scorer uses, lets the uncertainty stand
in for a missing predicted loss or embedding instead.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, ClassVar, Protocol, Self

import numpy as np

if TYPE_CHECKING:
    from triage.model.inference import StudyResult

UNCERTAINTY = "uncertainty"
PREDICTED_LOSS = "predicted_loss"
NO_LOSS_PREDICTOR = "no_loss_predictor"
"""Fallback reason: the model has no loss predictor, the uncertainty stands in."""
NO_EPISTEMIC_HEAD = "no_epistemic_head"
"""Fallback reason: a strategy that scores the study's embedding
(`StudyResult.embedding`) met a model without an epistemic head; the uncertainty stands
in."""
NO_DISCRIMINATOR = "no_discriminator"
"""Fallback reason: `dal` met a model whose head has no labelled-versus-unlabelled
classifier (fitted only when a retrain under `dal` promoted it); the uncertainty stands
in."""
FALLBACK_REASONS: tuple[str, ...] = (NO_LOSS_PREDICTOR, NO_EPISTEMIC_HEAD, NO_DISCRIMINATOR)


class StrategyOptions(Protocol):
    """What a strategy is built from: the matching fields of `GateSettings`."""

    strategy: str
    uncertainty_measure: str
    uncertainty_weight: float
    loss_weight: float
    seed: int
    auto_strategies: tuple[str, ...]


def uncertainty_score(result: StudyResult, measure: str) -> float:
    """The study's `measure`, oriented so larger = more uncertain (`margin` -> 1 - margin)."""
    if measure not in result.uncertainty:
        raise ValueError(f"measure must be one of {sorted(result.uncertainty)}, got {measure!r}")
    value = result.uncertainty[measure]
    return 1.0 - value if measure == "margin" else value


def midranks(values: np.ndarray) -> np.ndarray:
    """Quantile of each value within `values` [N]: (rank - 0.5) / N with ties averaged."""
    n = values.shape[0]
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(n)
    ranks[order] = np.repeat(first + counts / 2.0, counts)
    return ranks / n


class Strategy(ABC):
    """Base of all strategies.

    Attributes:
        name: Registry name (`gate.strategy`).
        has_scores: False for a strategy without components (the random baseline),
            which only a budget manager that ignores scores can serve.
        default_budget_manager: The budget manager used when `gate.budget_manager` is
            not set.
        needs_embedding: True for a strategy that scores `StudyResult.embedding`.
        fits_discriminator: True for a strategy whose models need the labelled-versus-
            unlabelled classifier in their head (`dal`): retraining then fits it.
        fallback_measure: Uncertainty measure that stands in for a missing predicted
            loss or embedding in `components_with_fallback`.
        batch_embeddings: True for a strategy that gives each study a vector for the
            `batch` budget manager's diverse batches (`batch_embedding`).
    """

    name: ClassVar[str]
    has_scores: ClassVar[bool] = True
    needs_embedding: ClassVar[bool] = False
    fits_discriminator: ClassVar[bool] = False
    default_budget_manager: ClassVar[str] = "quantile"
    fallback_measure: str = "entropy"
    batch_embeddings: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        """Build the strategy from the gate settings."""

    @abstractmethod
    def components(self, result: StudyResult) -> dict[str, float]:
        """Raw component scores of one study, larger = more worth labelling."""

    @property
    @abstractmethod
    def weights(self) -> dict[str, float]:
        """Weight of each component (keys as in `components`), non-negative."""

    @property
    def experts(self) -> dict[str, dict[str, float]] | None:
        """For a strategy that chooses among others (`auto`): each expert's weights over
        the components; the gate routes each study by one expert drawn from its mix.
        None for a strategy that routes by its own `weights`."""
        return None

    def components_with_fallback(self, result: StudyResult) -> tuple[dict[str, float], str | None]:
        """`components`, with the uncertainty standing in for a missing predicted loss
        or embedding.

        A model without a loss predictor gives `predicted_loss` None, which would make
        every study a scoring error for a function with a predicted-loss component.
        The component then takes the study's uncertainty instead (`fallback_measure`,
        oriented as in `uncertainty_score`), so the study is ranked by uncertainty
        alone: with `combined`, both components are the same uncertainty. Likewise
        every component of a strategy that `needs_embedding`, for a model without an
        epistemic head.

        Returns:
            The components and the fallback reason (`FALLBACK_REASONS`) when the
            uncertainty stood in, else None.
        """
        missing = self.missing_input(result)
        if missing is not None:
            stand_in = uncertainty_score(result, self.fallback_measure)
            return dict.fromkeys(self.weights, stand_in), missing
        if result.predicted_loss is None and PREDICTED_LOSS in self.weights:
            stand_in = uncertainty_score(result, self.fallback_measure)
            return self.components(replace(result, predicted_loss=stand_in)), NO_LOSS_PREDICTOR
        return self.components(result), None

    def batch_embedding(self, result: StudyResult) -> np.ndarray | None:
        """The study's vector for the `batch` budget manager ([D], float32), or None
        when the result lacks its input (then the batch ranks such studies by their
        score alone). Only a strategy with `batch_embeddings` gives one."""
        return None

    def missing_input(self, result: StudyResult) -> str | None:
        """The fallback reason when the result lacks what every component needs
        (`NO_EPISTEMIC_HEAD` for a strategy that `needs_embedding`), else None."""
        if self.needs_embedding and result.embedding is None:
            return NO_EPISTEMIC_HEAD
        return None

    def score(self, result: StudyResult) -> float:
        """Weighted sum of the raw components (exact for one component; use `score_pool`
        or the gate for scale-free combinations)."""
        parts = self.components(result)
        return float(sum(w * parts[k] for k, w in self.weights.items()))

    def score_pool(self, results: Sequence[StudyResult]) -> np.ndarray:
        """Scores [N] of a fixed pool: each component's within-pool quantile, weighted.

        Like the gate, a result without a predicted loss is ranked on the uncertainty
        stand-in (`components_with_fallback`)."""
        if not results:
            return np.zeros(0)
        rows = [self.components_with_fallback(r)[0] for r in results]
        total = np.zeros(len(results))
        for key, weight in self.weights.items():
            total += weight * midranks(np.array([row[key] for row in rows], dtype=np.float64))
        return total
