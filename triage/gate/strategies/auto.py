"""`auto`: the gate chooses among strategies while it runs, rewarded by the audits alone.

The candidates (`gate.auto_strategies`) are *experts* in the sense of prediction with
expert advice. Each study gets every candidate's components (named ``<expert>.<key>``);
the gate draws one expert from the current *mix* for the study (a seeded draw, so a
decision replays) and routes it by that expert's own weighted quantile against that
expert's own window threshold (`BudgetGate`). Every expert's routed share is r_s, so
any mix keeps the label budget, and audits are drawn before any of this, so no mix
starves them.

The mix comes from the audits, the uniform random sample of studies whose labels the
gate does not choose: for an audited study the store holds every expert's quantile at
its decision and the serving model's probabilities, and its label reveals the model's
loss on it. An expert is rewarded by how much of that loss its ranking would have
caught: r_k = (l / l_max) * c_k, where l is the cross-entropy of the reader's label
under the served prediction, clipped at l_max = ln 100, and c_k in [0, 1] is the
expert's combined quantile of the study. Because audits are uniform, the mean of r_k
over audits is an unbiased estimate of E[l c_k], whose differences between experts are
the covariance of each expert's ranking with the model's actual loss: the premise that
both the MC uncertainty and the loss predictor (Yoo & Kweon 2019) rest on, measured on
the site's own stream.

The mix is probability matching (Thompson 1933): p_k is the probability that expert k
has the largest mean reward, under the normal approximation of the experts' paired
mean rewards over the n audits (mean vector, covariance / n), integrated by a fixed set
of draws. It moves as fast as the evidence allows: an expert whose lead is within the
audits' noise keeps a share, one that is clearly ahead takes almost all. Hedge
(exponential weights at the worst-case rate sqrt(8 ln K / n)) was tried first and is not
used: on 2,000 synthetic audits where one expert clearly ranks the misses higher it had
still put only 0.81 on it, and it would not leave the uniform mix within the hundred or
so audits a site gathers in weeks. Every audit rewards every expert (full information),
so no expert needs exploring and a new lead is seen whatever the mix.

Why not Active Learning by Learning (Hsu & Lin, AAAI 2015) as written: its reward is
the importance-weighted accuracy of the model retrained after each query, credited to
the expert whose query it was (an EXP4.P bandit). Here a model is retrained every
`retrain.min_new_labels` labels, so a run of the benchmark sees about ten rewards for
five arms, too few for a bandit to leave its prior.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Self

import numpy as np

from triage.gate.strategies.base import Strategy, StrategyOptions

if TYPE_CHECKING:
    from triage.model.inference import StudyResult

SEPARATOR = "."
"""Joins an expert's name and its component's key: ``entropy.uncertainty``."""
LOSS_CAP = math.log(100.0)
"""Largest audit loss counted (nats): a confident miss at p = 0.01 or worse."""
MIX_DRAWS = 20_000
"""Draws that integrate the probability of each expert being best (Monte Carlo error of
a share below 0.004)."""


@dataclass(frozen=True)
class AuditOutcome:
    """What one labelled audit tells the experts.

    Attributes:
        quantiles: Every component's window quantile at the study's decision (keys
            ``<expert>.<key>``), as the gate stored them.
        probability: The served model's (calibrated) probability of the reader's label.
    """

    quantiles: Mapping[str, float]
    probability: float

    @property
    def loss(self) -> float:
        """Cross-entropy of the reader's label, clipped to [0, LOSS_CAP], over LOSS_CAP."""
        p = min(max(float(self.probability), 0.0), 1.0)
        return min(-math.log(max(p, 1e-300)), LOSS_CAP) / LOSS_CAP


def expert_rewards(
    experts: Mapping[str, Mapping[str, float]], outcomes: Iterable[AuditOutcome]
) -> np.ndarray:
    """Each counted audit's reward to each expert, [n, K] in `experts` order: the audit's
    clipped loss (`AuditOutcome.loss`) times the expert's combined quantile of the study.
    An outcome that lacks a quantile of some expert (decided before the window warmed
    up, or under other candidates) is not counted."""
    names = list(experts)
    rows = []
    for outcome in outcomes:
        q = outcome.quantiles
        if any(key not in q for name in names for key in experts[name]):
            continue
        loss = outcome.loss
        rows.append([loss * sum(w * q[key] for key, w in experts[name].items())
                     / sum(experts[name].values()) for name in names])
    return np.array(rows, dtype=np.float64).reshape(-1, len(names))


def audit_mix(
    experts: Mapping[str, Mapping[str, float]], outcomes: Iterable[AuditOutcome]
) -> dict[str, float]:
    """The probability, given the audits, that each expert has the largest mean reward
    (see the module docstring); uniform with fewer than two counted audits.

    Deterministic: the normal approximation is integrated by `MIX_DRAWS` draws from a
    fixed generator. Experts whose sampled means tie share the draw.
    """
    names = list(experts)
    rewards = expert_rewards(experts, outcomes)
    n = rewards.shape[0]
    if n < 2:
        return {name: 1.0 / len(names) for name in names}
    mean = rewards.mean(axis=0)
    covariance = np.atleast_2d(np.cov(rewards, rowvar=False)) / n
    # a symmetric square root that tolerates the singular covariance of duplicate experts
    values, vectors = np.linalg.eigh(covariance)
    values[values < 1e-9 * max(values.max(), 0.0)] = 0.0  # rounding noise of a zero
    root = vectors * np.sqrt(values)
    noise = np.random.default_rng(0).standard_normal((MIX_DRAWS, len(names)))
    draws = mean + noise @ root.T
    best = draws.max(axis=1, keepdims=True)
    ties = draws >= best - 1e-12 * (np.abs(best) + 1e-12)
    wins = (ties / ties.sum(axis=1, keepdims=True)).mean(axis=0)
    return {name: float(p) for name, p in zip(names, wins, strict=True)}


class AutoStrategy(Strategy):
    """Online choice among candidate strategies, by probability matching on the audits.

    Args:
        candidates: The candidate strategies (at least two, with scores, distinct names).
    """

    name: ClassVar[str] = "auto"

    def __init__(self, candidates: Sequence[Strategy]) -> None:
        names = [c.name for c in candidates]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"auto needs two or more distinct candidates, got {names}")
        bad = [c.name for c in candidates if not c.has_scores or isinstance(c, AutoStrategy)]
        if bad:
            raise ValueError(f"auto's candidates must be scoring strategies, got {bad}")
        self.candidates = tuple(candidates)
        self.needs_embedding = any(c.needs_embedding for c in candidates)

    @classmethod
    def from_settings(cls, options: StrategyOptions) -> Self:
        from triage.gate.strategies import STRATEGIES  # the registry imports this module

        return cls([STRATEGIES[name].from_settings(options) for name in options.auto_strategies])

    @property
    def experts(self) -> dict[str, dict[str, float]]:  # type: ignore[override]
        """Each candidate's positive weights over the shared keys ``<expert>.<key>``."""
        return {c.name: {f"{c.name}{SEPARATOR}{k}": w for k, w in c.weights.items() if w > 0}
                for c in self.candidates}

    def components(self, result: StudyResult) -> dict[str, float]:
        return {f"{c.name}{SEPARATOR}{k}": v for c in self.candidates
                for k, v in c.components(result).items()}

    def components_with_fallback(self, result: StudyResult) -> tuple[dict[str, float], str | None]:
        """Each candidate's own `components_with_fallback`: a candidate that lacks its
        input is ranked by the uncertainty; the first fallback reason is returned."""
        out: dict[str, float] = {}
        reason = None
        for c in self.candidates:
            parts, why = c.components_with_fallback(result)
            out.update({f"{c.name}{SEPARATOR}{k}": v for k, v in parts.items()})
            reason = reason or why
        return out, reason

    def missing_input(self, result: StudyResult) -> str | None:
        return None  # per candidate, in components_with_fallback

    @property
    def weights(self) -> dict[str, float]:
        """The uniform mix: each expert's weights normalised to sum 1/K (offline ranking,
        the queue's priorities); the gate routes by the current mix instead."""
        out = {}
        for weights in self.experts.values():
            total = sum(weights.values()) * len(self.candidates)
            out.update({key: w / total for key, w in weights.items()})
        return out

    def mix(self, outcomes: Iterable[AuditOutcome]) -> dict[str, float]:
        """The mix after the labelled audits `outcomes` (`audit_mix`)."""
        return audit_mix(self.experts, outcomes)
