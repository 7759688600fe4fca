"""Budget managers: from a study's strategy scores to "route it or not", under a budget.

The gate has two swappable parts, as scikit-activeml splits stream-based selection: a
*strategy* (`triage.gate.strategies`) gives each study its scores, and a *budget
manager* decides from them whether the study is routed, so that routes track the label
budget. `BudgetGate` keeps what every manager shares (audits, cold start, the daily cap,
coverage offsets, the rolling window of scored studies and its persistence) and asks
its manager for the rest, one study at a time. A new manager is one `BudgetManager`
subclass here and one line in `BUDGET_MANAGERS`.

Managers are pure and stateless between calls: all the state they may use (the window's
raw scores, their ranks within it, its realised routed rate) is passed in by the gate,
so a restored gate decides exactly as before its restart.
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
    ordered: ClassVar[bool] = False
    """Whether `route` needs the window oldest first with its routed flags (a manager
    whose state is a function of the sequence, rebuilt from the window each time)."""
    buffered: ClassVar[bool] = False
    """Whether studies wait in a buffer and are decided together (`BudgetGate.decide_batch`
    and `select`) instead of one by one (`route`)."""

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
        routed: np.ndarray | None = None,
        ranks: np.ndarray | None = None,
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
            routed: Whether each window study was routed (any reason) or its slot went
                to a coverage query, [n]; given, with the window oldest first, to a
                manager that is `ordered`.
            ranks: `window_ranks(window)`, columns as `window`'s, when the caller keeps
                them up to date (the gate does, at O(n) a study); computed if None.
        """


class CoinBudget(BudgetManager):
    """Route each study with probability r_s, whatever its scores: the random baseline."""

    name: ClassVar[str] = "coin"
    uses_scores: ClassVar[bool] = False

    def route(  # noqa: D102
        self, scores, window, realised, draw, score_rate, weights=None, routed=None, ranks=None
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
        self, scores, window, realised, draw, score_rate, weights=None, routed=None, ranks=None
    ) -> Route:
        n = window.shape[1]
        if n < self.warmup:
            return Route(draw < score_rate, "warmup")
        ranked = self._rank(scores, window, weights, ranks)
        return self._decide(ranked, realised, score_rate, routed)

    def _decide(self, ranked: "_Ranked", realised: float | None, score_rate: float,
                routed: np.ndarray | None) -> Route:  # fmt: skip
        """The route of a study ranked in a warm window."""
        rate = score_rate
        if realised is not None:
            rate += self.feedback_gain * (self.label_rate - realised)
        rate = min(max(rate, 0.0), 1.0)
        threshold = _quantile(np.sort(ranked.members), 1.0 - rate)
        return ranked.route(ranked.combined > threshold, threshold)

    def _rank(self, scores, window, weights, ranks=None) -> "_Ranked":
        """Each component's mid-rank quantile of the study and of every window member
        within the window, and their weighted combinations."""
        twice = 2.0 * window.shape[1]
        member_q = (window_ranks(window) if ranks is None else ranks) / twice
        value = np.array([scores[key] for key in self.keys])[:, None]
        new_q = (np.count_nonzero(window < value, axis=1)
                 + np.count_nonzero(window <= value, axis=1)) / twice  # fmt: skip
        w = self.weights if weights is None else np.asarray(weights, dtype=np.float64)
        total = w.sum()
        return _Ranked(self.keys, w, dict(zip(self.keys, new_q.tolist(), strict=True)),
                       float(w @ new_q / total), w @ member_q / total)


def window_ranks(window: np.ndarray) -> np.ndarray:
    """Twice the mid-rank of each member of `window` [K, n] within its row, [K, n] int:
    #(row < value) + #(row <= value), so that a member's quantile is it / (2 n)."""
    ordered = np.sort(window, axis=1)
    ranks = np.empty(window.shape, dtype=np.int64)
    for j in range(window.shape[0]):
        row = ordered[j]
        ranks[j] = row.searchsorted(window[j], "left") + row.searchsorted(window[j], "right")
    return ranks


def update_ranks(ranks: np.ndarray, window: np.ndarray, slot: int,
                 old: np.ndarray | None) -> None:  # fmt: skip
    """Keep `window_ranks` current, in place, as member `slot` of `window` [K, n] changes
    from `old` (None: it is new, and `window`'s last column) to its value in `window`:
    O(n) per row instead of a sort.

    Args:
        ranks: The ranks [K, n] of the window before the change (its first n - 1 columns
            when `old` is None); updated to those of `window`.
        window: The window after the change.
        slot: The changed member's column.
        old: Its previous values [K], or None when the member entered a window that was
            not full.
    """
    new = window[:, slot, None]
    if old is not None:  # the leaving value no longer counts for the others
        ranks -= (old[:, None] < window).view(np.int8)
        ranks -= (old[:, None] <= window).view(np.int8)
    below, within = new < window, new <= window
    ranks += below.view(np.int8)  # the entering value counts for the others
    ranks += within.view(np.int8)
    # its own, from the same comparisons: #(row < new) = n - #(new <= row), and
    # #(row <= new) = n - #(new < row)
    n = window.shape[1]
    ranks[:, slot] = 2 * n - np.count_nonzero(within, axis=1) - np.count_nonzero(below, axis=1)


@dataclass(frozen=True)
class _Ranked:
    """A study ranked in its window: component quantiles, combined score, and the window
    members' combined scores under the same weights."""

    keys: tuple[str, ...]
    weights: np.ndarray
    quantiles: dict[str, float]
    combined: float
    members: np.ndarray

    def route(self, want: bool, threshold: float) -> Route:
        """The route, its reason the component(s) whose quantile passed `threshold`."""
        above = [k for k, wk in zip(self.keys, self.weights, strict=True)
                 if wk > 0 and self.quantiles[k] > threshold]
        reason = above[0] if len(above) == 1 else "both"
        return Route(bool(want), reason, self.quantiles, self.combined, threshold)


class BiqfBudget(QuantileBudget):
    """scikit-activeml's Balanced Incremental Quantile Filter (Kottke et al. 2015) behind
    the gate's interface: the (1 - budget) quantile of the last w utilities, lowered by
    the utility range times (acquisitions left / w_tol), acquisitions left = budget *
    seen - queried.

    The study's utility is its combined quantile score, as `quantile` ranks it; the
    library's filter is built for each study from the window, oldest first (w is the
    window, its members' combined scores and routed flags are the library's history and
    counts), and asked whether the study's utility is worth a label. So its state is the
    window's, which the gate keeps across restarts, and a restored gate decides as
    before. Its budget is `label_rate`: audits are routed studies of the window too, and
    count as spent. w_tol is the library's default (50). Imported on first use
    (scikit-learn is slow to import).
    """

    name: ClassVar[str] = "biqf"
    ordered: ClassVar[bool] = True
    w_tol: ClassVar[int] = 50

    def _decide(self, ranked, realised, score_rate, routed) -> Route:  # noqa: D102
        from skactiveml.stream.budgetmanager import BalancedIncrementalQuantileFilter

        history, utility = ranked.members, ranked.combined
        n = history.shape[0]
        if routed is None or len(routed) != n:
            raise ValueError(f"{self.name} needs the window's routed flags")
        manager = BalancedIncrementalQuantileFilter(w=n, w_tol=self.w_tol,
                                                    budget=self.label_rate)
        manager.update(np.zeros((n, 1)), np.flatnonzero(routed), history)
        want = bool(manager.query_by_utility(np.array([utility])))
        # the threshold it compared against, for the decision's explanation: its history
        # of the last w utilities (the oldest leaves as the study's enters) and counts
        seen = [*list(manager.history_sorted_)[1:], utility]
        theta = float(np.quantile(seen, 1 - manager.budget_))
        left = manager.budget_ * (manager.observed_samples_ + 1) - manager.queried_samples_
        return ranked.route(want, theta - (max(seen) - min(seen)) * left / self.w_tol)


class BatchBudget(BudgetManager):
    """BADGE's batch half (Ash et al., "Deep Batch Active Learning by Diverse, Uncertain
    Gradient Lower Bounds", ICLR 2020): scored studies wait in a buffer, and the gate
    routes a batch of them chosen by k-means++ seeding over their gradient embeddings.

    k-means++ draws each next pick with probability proportional to its squared distance
    from the picks so far, so a batch spreads over the buffer's directions, and since a
    gradient embedding's norm grows with the model's doubt, far-out (uncertain) studies
    are likely picks: uncertain and diverse, without a weight between the two. The
    seeding is scikit-learn's `kmeans_plusplus` with one trial per pick (the vanilla
    algorithm the paper uses), seeded by the gate's (seed, sequence).

    The buffer (`gate.batch_size` studies or `gate.batch_seconds`, whichever first) is
    the caller's: the daemon keeps it in the store (`triage.gate.scorer`), the lockstep
    bench in memory. Of the buffer's non-audit studies, k = floor(r_s n + u) are picked
    (u a uniform draw), so the expected routed share is r_s exactly, with no window and
    no feedback. `route` is never asked: a buffered manager decides through `select`.
    """

    name: ClassVar[str] = "batch"
    buffered: ClassVar[bool] = True

    def route(  # noqa: D102
        self, scores, window, realised, draw, score_rate, weights=None, routed=None, ranks=None
    ) -> Route:
        raise TypeError("the batch manager decides buffered studies together: "
                        "use BudgetGate.decide_batch")

    @staticmethod
    def batch_size(pool: int, score_rate: float, draw: float) -> int:
        """How many of `pool` non-audit studies to pick: floor(r_s * pool + draw)."""
        return min(pool, int(math.floor(score_rate * pool + draw)))

    @staticmethod
    def select(embeddings: np.ndarray, k: int, seed: int) -> list[int]:
        """k distinct rows of `embeddings` [n, D] by k-means++ seeding, in pick order.

        Rows that k-means++ cannot tell apart (every remaining one at distance 0 from a
        pick, so its draw has no mass left) are filled by the largest norm first; k >= n
        picks every row, largest norm first.
        """
        n = embeddings.shape[0]
        if k <= 0 or n == 0:
            return []
        norms = np.linalg.norm(embeddings, axis=1)
        by_norm = [int(i) for i in np.argsort(-norms, kind="stable")]
        if k >= n:
            return by_norm
        from sklearn.cluster import kmeans_plusplus  # slow to import: on first batch

        data = np.ascontiguousarray(embeddings, dtype=np.float64)
        _, indices = kmeans_plusplus(data, k, random_state=seed % 2**32, n_local_trials=1)
        picked = list(dict.fromkeys(int(i) for i in indices))
        chosen = set(picked)
        picked += [i for i in by_norm if i not in chosen][: k - len(picked)]
        return picked


def _quantile(ordered: np.ndarray, level: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an ascending array."""
    position = level * (ordered.shape[0] - 1)
    low = int(math.floor(position))
    high = min(low + 1, ordered.shape[0] - 1)
    return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))


BUDGET_MANAGERS: Mapping[str, type[BudgetManager]] = MappingProxyType(
    {cls.name: cls for cls in (QuantileBudget, CoinBudget, BiqfBudget, BatchBudget)}
)
"""Budget manager classes by name (read-only)."""
