"""Budget managers: from a study's strategy scores to "route it or not", under a budget.

The gate has two swappable parts, as scikit-activeml splits stream-based selection: a
*strategy* (`triage.gate.strategies`) gives each study its scores, and a *budget
manager* decides from them whether the study is routed, so that routes track the label
budget. `BudgetGate` keeps what every manager shares (audits, cold start, the daily cap,
coverage offsets, the rolling window of scored studies and its persistence) and asks
its manager for the rest, one study at a time. A new manager is one `BudgetManager`
subclass here and one line in `BUDGET_MANAGERS`.

Managers are pure and stateless between calls: all the state they may use (the window's
raw scores, its realised routed rate) is passed in by the gate, so a restored gate
decides exactly as before its restart.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Route:
    """A manager's answer for one study.

    Attributes:
        want: Whether the manager would route the study (the cap and offsets come after).
        reason: Why, when routed: `warmup`, `random`, or the component(s) whose quantile
            passed the threshold (`uncertainty`, `predicted_loss`, `both`).
        quantiles: Each component's quantile in the window (None without ranking).
        combined: The weighted quantile score in [0, 1] (None without ranking).
        threshold: The threshold `combined` had to exceed (None without ranking).
    """

    want: bool
    reason: str
    quantiles: dict[str, float] | None = None
    combined: float | None = None
    threshold: float | None = None


class BudgetManager(ABC):
    """Base of the budget managers.

    Args:
        keys: The strategy's components with a positive weight, in window order.
        weights: Their weights [K] (positive).
        label_rate: Target routed fraction of all studies (audits included).
        warmup: Scored studies the window needs before scores are ranked.
        feedback_gain: Gain of the correction from the realised routed fraction.

    Attributes:
        name: Registry name (`gate.budget_manager`).
        uses_scores: Whether the manager looks at scores. One that does not (`coin`)
            also routes cold-start studies by its coin instead of the cold-start
            selector, and gets no coverage queries: it is the random baseline.
    """

    name: ClassVar[str]
    uses_scores: ClassVar[bool] = True

    def __init__(
        self,
        keys: Sequence[str],
        weights: np.ndarray,
        *,
        label_rate: float,
        warmup: int,
        feedback_gain: float,
    ) -> None:
        self.keys = tuple(keys)
        self.weights = np.asarray(weights, dtype=np.float64)
        self.label_rate = label_rate
        self.warmup = warmup
        self.feedback_gain = feedback_gain

    @abstractmethod
    def route(
        self,
        scores: Mapping[str, float],
        window: np.ndarray,
        realised: float | None,
        draw: float,
        score_rate: float,
        weights: np.ndarray | None = None,
    ) -> Route:
        """Decide for one study that is not an audit.

        Args:
            scores: The study's raw component scores (finite, every key of `keys`).
            window: Raw scores of the window's studies, [K, n] in `keys` order.
            realised: Routed fraction of the window's non-cap-blocked studies, or None.
            draw: A uniform draw in [0, 1) reserved for this study.
            score_rate: r_s, the share of non-audit studies to route.
            weights: Weights [K] for this study instead of the manager's own (`auto`:
                the drawn expert's, zero for the other experts' components).
        """


class CoinBudget(BudgetManager):
    """Route each study with probability r_s, whatever its scores: the random baseline."""

    name: ClassVar[str] = "coin"
    uses_scores: ClassVar[bool] = False

    def route(  # noqa: D102
        self, scores, window, realised, draw, score_rate, weights=None
    ) -> Route:
        return Route(draw < score_rate, "random")


class QuantileBudget(BudgetManager):
    """Route the studies whose combined quantile score passes the window's quantile.

    Each component is replaced by its quantile (mid-rank) within the window's raw
    scores, and combined = sum_k w_k q_k / sum_k w_k; the window's own studies get
    combined scores the same way, against the same window. The threshold is the
    (1 - r) quantile of those, where r = clip(r_s + feedback_gain * (label_rate -
    realised), 0, 1): proportional feedback from the realised routed fraction. While
    the window holds fewer than `warmup` studies, a study is routed with probability r_s
    (reason `warmup`).
    """

    name: ClassVar[str] = "quantile"

    def route(  # noqa: D102
        self, scores, window, realised, draw, score_rate, weights=None
    ) -> Route:
        n = window.shape[1]
        if n < self.warmup:
            return Route(draw < score_rate, "warmup")
        ordered = np.sort(window, axis=1)
        twice = 2.0 * n
        member_q = np.empty_like(window)
        new_q = np.empty(len(self.keys))
        for j, key in enumerate(self.keys):
            # mid-rank of each member and of the new study (ties averaged)
            row, values, value = ordered[j], window[j], scores[key]
            member_q[j] = (row.searchsorted(values, "left") + row.searchsorted(values, "right")
                           ) / twice  # fmt: skip
            new_q[j] = (row.searchsorted(value, "left") + row.searchsorted(value, "right")) / twice
        w = self.weights if weights is None else np.asarray(weights, dtype=np.float64)
        total = w.sum()
        member_c = w @ member_q / total
        combined = float(w @ new_q / total)
        rate = score_rate
        if realised is not None:
            rate += self.feedback_gain * (self.label_rate - realised)
        rate = min(max(rate, 0.0), 1.0)
        threshold = _quantile(np.sort(member_c), 1.0 - rate)
        quantiles = dict(zip(self.keys, new_q.tolist(), strict=True))
        above = [k for k, wk in zip(self.keys, w, strict=True)
                 if wk > 0 and quantiles[k] > threshold]
        reason = above[0] if len(above) == 1 else "both"
        return Route(combined > threshold, reason, quantiles, combined, threshold)


def _quantile(ordered: np.ndarray, level: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an ascending array."""
    position = level * (ordered.shape[0] - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.shape[0] - 1)
    return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))


BUDGET_MANAGERS: Mapping[str, type[BudgetManager]] = MappingProxyType(
    {cls.name: cls for cls in (QuantileBudget, CoinBudget)}
)
"""Budget manager classes by name (read-only)."""
