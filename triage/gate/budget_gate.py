"""The needs-label gate: which scored studies a radiologist should label, under a budget.

Pure: no database, no clock (timestamps are passed in). "Ask, then commit":
`BudgetGate.decide(scores, now)` returns a `Decision` and changes nothing; the
caller stores it, then calls `commit(decision)`, which updates the rolling
window and the per-day counter. After a restart, `BudgetGate.restore(settings,
stored_decisions)` (or `from_state_dict`) rebuilds the state.

The gate joins the two swappable parts of acquisition: the *strategy*
(`triage.gate.strategies`, `gate.strategy`) gives each study its raw component scores,
e.g. `uncertainty` and `predicted_loss`, and the *budget manager*
(`triage.gate.budget_managers`, `gate.budget_manager`) turns them into a route. Per
study with scores:

1. Exploration: with probability `exploration_rate` the study is routed as
   `audit` whatever its score. Audits count toward `label_rate`: the manager
   targets r_s = (label_rate - exploration_rate) / (1 - exploration_rate) of the
   rest, so all routed studies together track `label_rate`.
2. Otherwise the manager decides from the study's scores and the rolling window of
   the last `window` scored studies: `quantile` (the default) routes the study when
   its combined within-window quantile passes the threshold that keeps r_s, with
   feedback from the realised rate, after a `warmup` of random routes; `coin` routes
   it with probability r_s (reason `random`).
   Under `auto` (`triage.gate.strategies.auto`) the strategy's components are every
   candidate's; one candidate (expert) is drawn for the study from the current mix
   (`set_mix`; a seeded draw), and the manager ranks by that expert's weights alone,
   against the window's combined scores under the same weights, so every expert routes
   r_s and any mix keeps the budget. The decision keeps the expert, and an audit keeps
   every component's quantile: the audits' rewards from which the caller sets the mix.
3. Cap: at most `daily_cap` routed studies (all reasons) per calendar day in
   `timezone`; a study that would be routed beyond it gets `cap_reached`.

Without scores (no model yet) audits are drawn as above, and otherwise the caller
chooses: `decide(None, now, cold_start=True)` routes the study as `cold_start` while the
day's cap allows, `cold_start=False` skips it (`not_sampled`). The choice is
`triage.gate.coldstart.ColdStartSelector`'s, run at `score_rate` so that audits and cold
start together keep to `label_rate`, picking studies for coverage of the stream; the
selector's novelty may be stored with the decision as its only score
(`{"novelty": x}`). Cold-start decisions never enter the window. Audits are drawn under
every strategy, cold start included: the audit labels are the unbiased validation set
every model is judged and calibrated on (`retrain.validation_source: audit`), so no
model could be trained without them. The `coin` manager (the `random` strategy's) is a
coin throughout: it routes the rest with probability r_s (reason `random`),
`label_rate` in all, ignores the cold-start selector, and gets no coverage queries.
Random draws come from (seed, sequence number), so a decision is reproducible.

A new model (promotion, rollback, first model) gives raw scores on another scale: the
predicted loss has no fixed scale at all, so a window of old-model scores would rank
the new model's scores against the wrong yardstick and the routed share would swing.
Each window entry therefore keeps the key of its study (`decide(..., key=study_id)`);
`window_keys()` lists them and `rescore(scores_by_key)` replaces their raw values
with the new model's (routed/eligible flags kept) and drops the entries that got no
new scores, so the window holds the current model's scores only.
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import date, datetime
from numbers import Integral
from typing import Any, Self
from zoneinfo import ZoneInfo

import numpy as np

from triage.gate.budget_managers import BUDGET_MANAGERS, update_ranks, window_ranks
from triage.gate.settings import GateSettings
from triage.gate.strategies import make_strategy, midranks
from triage.gate.strategies.auto import SEPARATOR

ROUTED_REASONS = (
    "uncertainty", "predicted_loss", "both", "audit", "cold_start", "warmup", "random",
    "batch",
)  # fmt: skip
SKIPPED_REASONS = ("below_threshold", "not_sampled", "cap_reached", "budget_offset",
                   "not_selected")
NOVELTY = "novelty"
"""The only score of a cold-start decision: its `ColdStartSelector` novelty (the value
its threshold compares: divided by the typicality spread with
`gate.cold_start_neighbours`)."""
STATE_VERSION = 2
"""Version of `state_dict()`; 2 added the window's keys (version 1 is still read)."""


_MASK64 = (1 << 64) - 1
_EXPERT_SALT = 0x5DEECE66D  # the `auto` expert draw's own stream of (seed, sequence)
_BATCH_SALT = 0xBAD6E  # the `batch` manager's size draw and k-means++ seed


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform_pair(seed: int, sequence: int) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) determined by (seed, sequence) (SplitMix64)."""
    state = _splitmix64((seed & _MASK64) ^ _splitmix64(sequence & _MASK64))
    second = _splitmix64(state)
    return (state >> 11) / 2.0**53, (second >> 11) / 2.0**53


@dataclass(frozen=True)
class BatchEntry:
    """A scored study waiting in a buffered manager's batch (`BudgetGate.decide_batch`).

    Attributes:
        scores: Its raw component scores (as `decide` takes them).
        key: Its key (the daemon's study id).
        embedding: Its vector for the batch (`Strategy.batch_embedding`), or None.
    """

    scores: Mapping[str, float]
    key: int | None = None
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Decision:
    """One gate decision (JSON-compatible through `to_dict`).

    Attributes:
        sequence: Number of decisions committed before this one.
        timestamp: ISO 8601 time of the study (timezone-aware), as passed to `decide`.
        day: ISO date of `timestamp` in the gate's timezone (the cap's day).
        strategy: The gate strategy.
        needs_label: Whether the study is routed to a radiologist.
        reason: One of ROUTED_REASONS if routed, else one of SKIPPED_REASONS.
        scores: Raw component scores, None without a model (cold start).
        quantiles: Each component's quantile in the window (None in warm-up/random).
        combined: Weighted quantile score in [0, 1] (None in warm-up/random/cold start).
        threshold: Threshold `combined` had to exceed (None likewise).
        key: The caller's key of the study (the daemon's study id), kept with the
            window entry so `rescore` can find it; None in decisions stored before keys.
        expert: Under `auto`, the candidate strategy drawn from the mix whose ranking
            decided the study (None for audits, warm-up and every other strategy).
    """

    sequence: int
    timestamp: str
    day: str
    strategy: str
    needs_label: bool
    reason: str
    scores: dict[str, float] | None = None
    quantiles: dict[str, float] | None = None
    combined: float | None = None
    threshold: float | None = None
    key: int | None = None
    expert: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for storage."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of `to_dict` (a stored decision without `key` gets None)."""
        return cls(**data)


class BudgetGate:
    """Stateful gate; see the module docstring for the algorithm.

    Args:
        settings: Gate settings.
    """

    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self.strategy = make_strategy(settings)
        self._zone = ZoneInfo(settings.timezone)
        weights = self.strategy.weights
        self._keys = tuple(k for k, w in weights.items() if w > 0)
        self._weights = np.array([weights[k] for k in self._keys], dtype=np.float64)
        self.manager = BUDGET_MANAGERS[settings.manager](
            self._keys, self._weights, label_rate=settings.label_rate, warmup=settings.warmup,
            feedback_gain=settings.feedback_gain,
        )  # fmt: skip
        self._values = np.zeros((len(self._keys), settings.window))
        # `window_ranks` of the window's members, kept current by `_apply` in O(n)
        self._ranks = np.zeros((len(self._keys), settings.window), dtype=np.int64)
        self._routed = np.zeros(settings.window, dtype=bool)
        self._eligible = np.zeros(settings.window, dtype=bool)
        self._window_keys: list[int | None] = [None] * settings.window
        self._filled = 0
        self._next = 0
        self._sequence = 0
        self._day_counts: dict[str, int] = {}
        self._offset = 0  # external routes (coverage) still to offset against the budget
        experts = self.strategy.experts or {}
        self._experts = {
            name: np.array([weights.get(k, 0.0) for k in self._keys], dtype=np.float64)
            for name, weights in experts.items()
        }
        self._mix = {name: 1.0 / len(experts) for name in experts}
        score_share = settings.label_rate - settings.exploration_rate
        self._score_rate = score_share / (1 - settings.exploration_rate) if score_share else 0.0

    @property
    def mix(self) -> dict[str, float] | None:
        """Under `auto`: the probability of each candidate being drawn for a study
        (uniform until `set_mix`); None for every other strategy."""
        return dict(self._mix) if self._experts else None

    def set_mix(self, mix: Mapping[str, float]) -> None:
        """Set the `auto` mix (the caller's `AutoStrategy.mix` of the labelled audits).

        Raises:
            ValueError: Not `auto`, or `mix` does not give every candidate a finite,
                non-negative probability with a positive sum (it is normalised).
        """
        if not self._experts:
            raise ValueError(f"strategy {self.settings.strategy!r} has no mix")
        if set(mix) != set(self._experts):
            raise ValueError(f"mix must give {sorted(self._experts)}, got {sorted(mix)}")
        values = {k: float(v) for k, v in mix.items()}
        if any(not math.isfinite(v) or v < 0 for v in values.values()) or not sum(
            values.values()
        ):
            raise ValueError(f"mix must be finite, non-negative, not all 0: {values}")
        total = sum(values.values())
        self._mix = {k: values[k] / total for k in self._experts}

    def _draw_expert(self) -> str:
        """The expert for the next study: drawn from the mix by (seed, sequence)."""
        u = uniform_pair(self.settings.seed ^ _EXPERT_SALT, self._sequence)[0]
        cumulative = 0.0
        for name, p in self._mix.items():
            cumulative += p
            if u < cumulative:
                return name
        return next(reversed(self._mix))

    @property
    def score_rate(self) -> float:
        """r_s: the share of non-audit studies the score rule (or cold start, or the
        random strategy) routes, so that with audits all routes track `label_rate`."""
        return self._score_rate

    @property
    def pending_offset(self) -> int:
        """Coverage routes (`note_routed` against the budget) not yet offset: the next
        this many studies the score rule would route get `budget_offset`."""
        return self._offset

    @property
    def sequence(self) -> int:
        """Number of committed decisions."""
        return self._sequence

    def routed_on(self, day: date | str) -> int:
        """Studies routed on `day` (a date in the gate's timezone)."""
        return self._day_counts.get(str(day), 0)

    def note_routed(self, day: date | str, count: int, *, against_budget: bool = True) -> None:
        """Count ``count`` studies routed outside `decide` (coverage queries) on ``day``.

        They count against the daily cap and, with ``against_budget``, against the label
        budget too: the next ``count`` studies the score rule would route are not routed
        (reason `budget_offset`), so all routes together still track `label_rate`.
        Audits are never offset.
        """
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._day_counts[str(day)] = self._day_counts.get(str(day), 0) + count
        if against_budget:
            self._offset += count

    def remaining_on(self, day: date | str) -> int:
        """Studies that may still be routed on ``day`` under the daily cap."""
        return max(0, self.settings.daily_cap - self.routed_on(day))

    def day_of(self, now: datetime) -> str:
        """The cap's day (ISO date in the gate's time zone) of a timezone-aware time."""
        return now.astimezone(self._zone).date().isoformat()

    @property
    def window_filled(self) -> int:
        """Scored studies in the window (with or without a key)."""
        return self._filled

    def realised_rate(self) -> float | None:
        """Routed fraction of the window's non-cap-blocked studies (None if none)."""
        eligible = self._eligible[: self._filled]
        count = np.count_nonzero(eligible)
        if not count:
            return None
        return np.count_nonzero(self._routed[: self._filled] & eligible) / count

    def decide(
        self,
        scores: Mapping[str, float] | None,
        now: datetime,
        *,
        key: int | None = None,
        cold_start: bool = False,
        novelty: float | None = None,
    ) -> Decision:
        """Decide for one study without changing the gate.

        Args:
            scores: Raw component scores from `self.strategy.components(result)`
                (e.g. {"uncertainty": .., "predicted_loss": ..}), or None when no model
                exists yet (cold start).
            now: Timezone-aware time of the study (its day is taken in `timezone`).
            key: The study's key (the daemon's study id), kept with its window entry.
            cold_start: Without scores only: route the study as `cold_start` (if the
                day's cap allows); False skips it as `not_sampled`. Ignored with scores.
            novelty: Without scores only: the cold-start selector's novelty of the study,
                stored as the decision's scores ({"novelty": x}); must be finite.

        Returns:
            The `Decision`; pass it to `commit` once stored.
        """
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"now must be a timezone-aware datetime, got {now!r}")
        if key is not None:
            if isinstance(key, bool) or not isinstance(key, Integral):
                raise ValueError(f"key must be an int or None, got {key!r}")
            key = int(key)
        day = now.astimezone(self._zone).date().isoformat()
        cap_open = self._day_counts.get(day, 0) < self.settings.daily_cap
        base = {
            "sequence": self._sequence,
            "timestamp": now.isoformat(),
            "day": day,
            "strategy": self.settings.strategy,
            "key": key,
        }
        u_audit, u_sample = uniform_pair(self.settings.seed, self._sequence)
        coin = not self.manager.uses_scores
        if scores is None:
            audit = u_audit < self.settings.exploration_rate
            if coin:  # a coin, before and after the first model
                cold_start = u_sample < self._score_rate
            return self._decide_cold_start(
                base, cap_open, cold_start, novelty, audit, "random" if coin else None
            )
        if self.manager.buffered:
            raise ValueError(f"budget manager {self.manager.name!r} decides scored studies "
                             "together: use decide_batch")
        clean = self._check_scores(scores)
        quantiles = combined = threshold = expert = None
        window, routed = self._values[:, : self._filled], None
        ranks = self._ranks[:, : self._filled]
        if self.manager.ordered:  # oldest first, with the routed flags
            order = self._order()
            window, routed, ranks = self._values[:, order], self._routed[order], ranks[:, order]
        if u_audit < self.settings.exploration_rate:
            want, reason = True, "audit"
            if self._experts:  # every expert's quantiles: the audit's reward (`auto`)
                route = self.manager.route(clean, window, None, u_sample, self._score_rate,
                                           routed=routed, ranks=ranks)  # fmt: skip
                quantiles = route.quantiles
        else:
            weights = None
            if self._experts:
                expert = self._draw_expert()
                weights = self._experts[expert]
            route = self.manager.route(
                clean, window, self.realised_rate(), u_sample, self._score_rate, weights,
                routed, ranks,
            )  # fmt: skip
            want, reason = route.want, route.reason
            quantiles, combined, threshold = route.quantiles, route.combined, route.threshold
            if expert is not None and route.quantiles is None:
                expert = None  # warm-up: no expert ranked the study
            if expert is not None and want:
                reason = reason.partition(SEPARATOR)[2] or reason  # the expert's own
        if not want:
            reason = "below_threshold" if combined is not None else "not_sampled"
        elif not cap_open:
            want, reason = False, "cap_reached"
        elif self._offset > 0 and reason != "audit":
            want, reason = False, "budget_offset"
        return Decision(
            **base, needs_label=bool(want), reason=reason, scores=clean,
            quantiles=quantiles, combined=combined, threshold=threshold, expert=expert,
        )  # fmt: skip

    def batch_due(self, waiting: int, oldest: float | None, now: float) -> str | None:
        """Why a buffered manager's batch is to be decided at `now` (Unix seconds), or
        None: `size` when `waiting` studies reach `batch_size`, `age` when the oldest,
        scored at `oldest`, has waited `batch_seconds` (or was scored at a time the
        clock has not reached again: it stepped back)."""
        if not waiting or oldest is None:
            return None
        if waiting >= self.settings.batch_size:
            return "size"
        if not oldest <= now < oldest + self.settings.batch_seconds:
            return "age"
        return None

    def decide_batch(self, entries: Sequence[BatchEntry], now: datetime) -> list[Decision]:
        """Decide for a buffered manager's batch together, without changing the gate.

        Each entry takes the next sequence number, in order, and its audit draw as in
        `decide`. Of the others, the manager picks k = floor(r_s n + u) (`select`, by
        k-means++ over the entries' embeddings; by score when any lacks one), routed as
        `batch`; the rest get `not_selected`. Audits take today's cap first, then the
        picks in pick order (`cap_reached` beyond it); a pending budget offset is paid
        by the last picks (`budget_offset`). Each decision's `quantiles` and `combined`
        rank its scores within the batch, so the review queue shows the most uncertain
        first.

        Args:
            entries: The batch, oldest first.
            now: Timezone-aware time of the decision (every entry's `timestamp`).

        Returns:
            The decisions in entry order; `commit` each, in order, once stored.
        """
        if not self.manager.buffered:
            raise ValueError(f"budget manager {self.manager.name!r} decides one study at a "
                             "time: use decide")
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"now must be a timezone-aware datetime, got {now!r}")
        if not entries:
            return []
        day = now.astimezone(self._zone).date().isoformat()
        clean = [self._check_scores(entry.scores) for entry in entries]
        audit = [uniform_pair(self.settings.seed, self._sequence + j)[0]
                 < self.settings.exploration_rate for j in range(len(entries))]
        pool = [j for j in range(len(entries)) if not audit[j]]
        draw = uniform_pair(self.settings.seed ^ _BATCH_SALT, self._sequence)
        k = self.manager.batch_size(len(pool), self._score_rate, draw[0])
        raw = np.array([[row[key] for key in self._keys] for row in clean], dtype=np.float64)
        quantiles = np.stack([midranks(raw[:, i]) for i in range(len(self._keys))], axis=1)
        combined = quantiles @ self._weights / self._weights.sum()
        embeddings = [entries[j].embedding for j in pool]
        if pool and all(e is not None for e in embeddings):
            seed = _splitmix64(int(draw[1] * 2.0**53))
            picks = [pool[i] for i in self.manager.select(np.stack(embeddings), k, seed)]
        else:  # no embedding (a model without an epistemic head): the highest scores
            picks = sorted(pool, key=lambda j: (-combined[j], j))[:k]
        reasons = ["audit" if a else "not_selected" for a in audit]
        cap_left = self.remaining_on(day)
        for j in (j for j in range(len(entries)) if audit[j]):
            if cap_left > 0:
                cap_left -= 1
            else:
                reasons[j] = "cap_reached"
        offset = min(self._offset, len(picks))
        for rank, j in enumerate(picks):
            if rank >= len(picks) - offset:
                reasons[j] = "budget_offset"
            elif cap_left > 0:
                reasons[j], cap_left = "batch", cap_left - 1
            else:
                reasons[j] = "cap_reached"
        return [
            Decision(
                sequence=self._sequence + j, timestamp=now.isoformat(), day=day,
                strategy=self.settings.strategy, needs_label=reasons[j] in ("audit", "batch"),
                reason=reasons[j], scores=clean[j],
                quantiles=dict(zip(self._keys, quantiles[j].tolist(), strict=True)),
                combined=float(combined[j]), key=None if e.key is None else int(e.key),
            )
            for j, e in enumerate(entries)
        ]

    @staticmethod
    def _decide_cold_start(
        base: dict[str, Any],
        cap_open: bool,
        cold_start: bool,
        novelty: float | None,
        audit: bool,
        routed_reason: str | None = None,
    ) -> Decision:
        stored = None
        if novelty is not None:
            if not math.isfinite(float(novelty)):
                raise ValueError(f"novelty must be finite, got {novelty!r}")
            stored = {NOVELTY: float(novelty)}
        if audit:
            reason = "audit" if cap_open else "cap_reached"
            return Decision(**base, needs_label=cap_open, reason=reason, scores=stored)
        if not cold_start:
            return Decision(**base, needs_label=False, reason="not_sampled", scores=stored)
        reason = (routed_reason or "cold_start") if cap_open else "cap_reached"
        return Decision(**base, needs_label=cap_open, reason=reason, scores=stored)

    def enters_window(self, decision: Decision) -> bool:
        """Whether `commit(decision)` adds the decision to the score window: it has
        every component of the strategy and is not a cold-start decision."""
        scores = decision.scores
        return scores is not None and NOVELTY not in scores and all(k in scores for k in self._keys)

    def commit(self, decision: Decision) -> None:
        """Record a stored decision: update the day counter and the rolling window.

        Raises:
            ValueError: `decision` was not made from the gate's current state (its
                sequence is not the next one), e.g. two decides before one commit.
        """
        if decision.sequence != self._sequence:
            raise ValueError(
                f"decision has sequence {decision.sequence}, the gate expects "
                f"{self._sequence}: decide again from the current state"
            )
        self._apply(decision)

    def observe(self, decision: Decision) -> None:
        """Record a stored decision another gate made on the same store (a replica that
        shares the budget, `GateScorer`): as `commit`, from a sequence at or beyond this
        gate's (every replica decides after taking the store's write lock and observing
        the others' decisions, so sequences are one series across replicas).

        Raises:
            ValueError: `decision` is older than this gate's state.
        """
        if decision.sequence < self._sequence:
            raise ValueError(
                f"decision has sequence {decision.sequence}, the gate is at {self._sequence}"
            )
        self._apply(decision)

    def set_pending_offset(self, pending: int) -> None:
        """Set the coverage routes still to offset (the store's count, which the routes
        and offsets of every replica move)."""
        if pending < 0:
            raise ValueError(f"pending_offset must be >= 0, got {pending}")
        self._offset = int(pending)

    def _apply(self, decision: Decision) -> None:
        if decision.needs_label:
            self._day_counts[decision.day] = self._day_counts.get(decision.day, 0) + 1
            if len(self._day_counts) > 8:  # only recent days matter
                for old in sorted(self._day_counts)[:-8]:
                    del self._day_counts[old]
        scores = decision.scores
        if scores is not None and self.enters_window(decision):
            i = self._next
            full = self._filled == self.settings.window  # then slot i's member leaves
            old = self._values[:, i].copy() if full else None
            self._values[:, i] = [scores[k] for k in self._keys]
            members = self._filled if full else self._filled + 1  # i == _filled if not full
            update_ranks(self._ranks[:, :members], self._values[:, :members], i, old)
            self._window_keys[i] = decision.key
            # a budget_offset study's slot went to an external route: for the feedback it
            # counts as routed, so the threshold does not drop to make up for it
            self._routed[i] = decision.needs_label or decision.reason == "budget_offset"
            self._eligible[i] = decision.reason != "cap_reached"
            self._next = (i + 1) % self.settings.window
            self._filled = min(self._filled + 1, self.settings.window)
        if decision.reason == "budget_offset":
            self._offset = max(0, self._offset - 1)
        self._sequence = decision.sequence + 1

    def _check_scores(self, scores: Mapping[str, float]) -> dict[str, float]:
        missing = [k for k in self._keys if k not in scores]
        if missing:
            raise ValueError(
                f"scores lack components {missing} for strategy {self.settings.strategy!r}"
            )
        clean = {k: float(v) for k, v in scores.items()}
        bad = [k for k, v in clean.items() if not math.isfinite(v)]
        if bad:
            raise ValueError(f"scores must be finite, got {bad} non-finite")
        return clean

    def window_keys(self) -> list[int]:
        """Keys of the window's scored studies, oldest first (entries without one skipped)."""
        return [k for k in (self._window_keys[i] for i in self._order()) if k is not None]

    def rescore(self, scores_by_key: Mapping[int, Mapping[str, float]]) -> int:
        """Replace the window's raw scores with a new model's scores of the same studies.

        Entries whose key is in `scores_by_key` get those scores (their routed and
        eligible flags are kept, so the realised rate is unchanged for them); entries
        without new scores (no key, or the study could not be scored again) are dropped,
        so the window holds scores of one model only. Order is kept. Below `warmup`
        entries the gate is back in warm-up until the window refills.

        Args:
            scores_by_key: New raw component scores by study key, each with every
                component of the strategy (see `decide`).

        Returns:
            How many window entries were kept.

        Raises:
            ValueError: A score mapping lacks a component or is not finite (the gate is
                then unchanged).
        """
        keep: list[tuple[int, dict[str, float]]] = []
        for i in self._order():
            key = self._window_keys[i]
            if key is not None and key in scores_by_key:
                keep.append((i, self._check_scores(scores_by_key[key])))
        window = self.settings.window
        values = np.zeros_like(self._values)
        routed = np.zeros(window, dtype=bool)
        eligible = np.zeros(window, dtype=bool)
        keys: list[int | None] = [None] * window
        for j, (i, clean) in enumerate(keep):
            values[:, j] = [clean[k] for k in self._keys]
            routed[j], eligible[j] = self._routed[i], self._eligible[i]
            keys[j] = self._window_keys[i]
        self._values, self._routed, self._eligible = values, routed, eligible
        self._window_keys = keys
        self._filled = len(keep)
        self._ranks[:, : self._filled] = window_ranks(values[:, : self._filled])
        self._next = len(keep) % window
        return len(keep)

    def _order(self) -> list[int]:
        """Slots of the window's entries, oldest first."""
        if self._filled < self.settings.window:
            return list(range(self._filled))
        return [(self._next + i) % self.settings.window for i in range(self._filled)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (window oldest first with its keys, day counters,
        sequence, pending budget offset)."""
        order = self._order()
        return {
            "version": STATE_VERSION,
            "strategy": self.settings.strategy,
            "keys": list(self._keys),
            "sequence": self._sequence,
            "day_counts": dict(self._day_counts),
            "values": [self._values[:, i].tolist() for i in order],
            "routed": [bool(self._routed[i]) for i in order],
            "eligible": [bool(self._eligible[i]) for i in order],
            "window_keys": [self._window_keys[i] for i in order],
            "pending_offset": self._offset,
        }

    @classmethod
    def from_state_dict(cls, settings: GateSettings, state: Mapping[str, Any]) -> Self:
        """Rebuild a gate from `state_dict()` output (window trimmed to `settings.window`).

        Version-1 state (before window keys) is read too; its entries have no key.
        """
        gate = cls(settings)
        version = state.get("version")
        if version not in (1, STATE_VERSION) or list(state.get("keys", ())) != list(gate._keys):
            raise ValueError(
                f"state has version {version!r} and keys {state.get('keys')!r}; "
                f"expected version 1 or {STATE_VERSION} and keys {list(gate._keys)}"
            )
        n = len(state["values"])
        window_keys = state.get("window_keys", [None] * n) if version != 1 else [None] * n
        rows = list(
            zip(state["values"], state["routed"], state["eligible"], window_keys, strict=True)
        )
        for values, routed, eligible, key in rows[-settings.window :]:
            i = gate._next
            gate._values[:, i], gate._routed[i], gate._eligible[i] = values, routed, eligible
            gate._window_keys[i] = None if key is None else int(key)
            gate._next = (i + 1) % settings.window
            gate._filled = min(gate._filled + 1, settings.window)
        gate._ranks[:, : gate._filled] = window_ranks(gate._values[:, : gate._filled])
        gate._sequence = int(state["sequence"])
        gate._day_counts = {str(k): int(v) for k, v in state["day_counts"].items()}
        gate._offset = int(state.get("pending_offset", 0))  # absent before it was kept
        return gate

    @classmethod
    def restore(
        cls, settings: GateSettings, decisions: Iterable[Decision], *, pending_offset: int = 0
    ) -> Self:
        """Rebuild a gate by replaying stored decisions, oldest first.

        Pass at least the last `window` scored decisions and every decision of the
        current day; decisions of another strategy only count toward the day cap.
        Decisions cannot tell how many coverage routes are still to be offset, so
        ``pending_offset`` (as `pending_offset` was after the last decision; the daemon
        keeps it in the store) is set after the replay: without it a restart would route
        studies the running gate would have skipped as `budget_offset`.
        """
        if pending_offset < 0:
            raise ValueError(f"pending_offset must be >= 0, got {pending_offset}")
        gate = cls(settings)
        for decision in decisions:
            gate._apply(decision)
        gate._offset = int(pending_offset)
        return gate
