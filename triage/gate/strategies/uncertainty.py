"""Strategies by one uncertainty measure of the MC-dropout (or Laplace) predictive
distribution: `entropy`, `bald`, `margin` and `least_confidence`.

With two classes, as in the shipped pneumonia model, `entropy`, `margin` and
`least_confidence` are all monotone in |p - 0.5| and route the same studies; they part
only with three classes or more (tests/gate/test_strategies.py shows one case where all
three order two studies differently).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Self

from triage.gate.strategies.base import UNCERTAINTY, Strategy, StrategyOptions, uncertainty_score

if TYPE_CHECKING:
    from triage.model.inference import StudyResult


class EntropyStrategy(Strategy):
    """Predictive entropy (bits) of the MC mean probabilities (Shannon; uncertainty
    sampling, Lewis & Gale 1994). Also the committee's consensus entropy (Settles 2009,
    section 3.4) with the MC samples as the committee: the entropy of their mean."""

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
    """BALD mutual information (bits) between prediction and dropout mask (Houlsby et
    al. 2011; Gal et al. 2017). Also query by committee's maximum disagreement (McCallum
    & Nigam 1998) with the MC samples as the committee: the mean KL divergence of each
    member from the consensus is exactly this mutual information."""

    name: ClassVar[str] = "bald"
    measure: ClassVar[str] = "bald"


class MarginStrategy(EntropyStrategy):
    """1 - (top-1 minus top-2 probability) of the MC mean (Scheffer et al. 2001, margin
    sampling): the study nearest a tie between its two likeliest classes first."""

    name: ClassVar[str] = "margin"
    measure: ClassVar[str] = "margin"


class LeastConfidenceStrategy(EntropyStrategy):
    """1 - the largest MC mean probability (Culotta & McCallum 2005, least confidence):
    the study whose best guess is least sure first."""

    name: ClassVar[str] = "least_confidence"
    measure: ClassVar[str] = "least_confidence"
