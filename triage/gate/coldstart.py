"""Cold start: which studies a radiologist should label before any model exists.

Without a model the gate has no scores to rank, and routing every study up to the daily
cap spent over a third of a 10% label budget in one run. Cold start is therefore held
to `gate.label_rate` like the rest, and the studies it does route are chosen to cover
the stream (different anatomy, exposure, positioning, acquisition styles) rather than
to follow arrival order, so that the first training set is diverse.

Each study gets a label-free, model-free embedding (`coldstart_embedding`), and
`ColdStartSelector` runs online farthest-first selection on it:

* novelty(e) = Euclidean distance from e to the nearest embedding already routed
  (`NOVELTY_CAP`, a large finite stand-in for infinity, while none is);
* a study is routed when its novelty is above the (1 - r) quantile of the novelty
  values of the last `window` studies seen (each as it was when that study was seen),
  where r = clip(label_rate + feedback_gain * (label_rate - realised), 0, 1) and
  `realised` is the routed fraction of those studies that the daily cap did not block
  (proportional feedback, as in `triage.gate.BudgetGate`): novelty only falls as
  routed studies accumulate, so the older values in the window are too high and the
  feedback keeps the routed share on `label_rate`;
* while fewer than `warmup` studies have been seen, a study is routed with probability
  `label_rate`, drawn from `uniform_pair(seed, sequence)`.

Everything is deterministic: the same studies in the same order give the same choices.
"""

from __future__ import annotations

import math
from collections import deque
from numbers import Integral, Real

import numpy as np
import torch
import torch.nn.functional as F

from triage.gate import uniform_pair

GRID = 8
"""Side of the pooled thumbnail: embeddings have GRID * GRID = 64 values."""
EMBEDDING_SIZE = GRID * GRID
NOVELTY_CAP = 1e6
"""Novelty while nothing is routed yet (a finite stand-in for infinity: scores are
stored as finite JSON numbers). Standardised embeddings are at most about 2 * sqrt(64)
= 16 apart, so every real novelty is far below it."""
_EPS = 1e-6


def coldstart_embedding(images: torch.Tensor) -> np.ndarray:
    """A study's cold-start embedding: its contrast-normalised 8x8 mean thumbnail.

    At cold start there are no labels and no trained model, so the embedding must need
    neither. The mean image of the study, average-pooled to 8x8 and standardised (minus
    its mean, divided by its standard deviation + 1e-6), keeps the coarse anatomy,
    exposure pattern, positioning and field of view that separate case types and
    acquisition styles, while the standardisation removes global brightness and
    contrast. It is deterministic, costs microseconds, and cannot be fooled by the
    random features of an untrained network.

    Args:
        images: The study's images, float [K, 1, S, S] in [0, 1], K >= 1.

    Returns:
        float64 array of EMBEDDING_SIZE (64) values, row-major over the 8x8 grid.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must be [K, 1, S, S] with K >= 1, got {tuple(images.shape)}")
    mean = images.detach().to(torch.float64).mean(dim=0, keepdim=True)  # [1, 1, S, S]
    pooled = F.adaptive_avg_pool2d(mean, GRID).reshape(-1).numpy()
    if not np.isfinite(pooled).all():
        raise ValueError("images must be finite")
    return (pooled - pooled.mean()) / (pooled.std() + _EPS)


class ColdStartSelector:
    """Online farthest-first selection of cold-start studies at a target rate.

    "Ask, then commit", like the gate: `wants` decides without side effects and
    `commit` records the outcome. After a restart, replay the stored cold-start
    decisions: `commit(..., novelty=stored)` for the last `window` of them (the
    embedding is needed only for routed ones) and `add_selected` for the embeddings of
    older routed studies.

    Args:
        label_rate: Target routed fraction, in (0, 1].
        seed: Seed of the warm-up draws.
        window: Studies whose novelty values set the threshold (>= 1).
        warmup: Studies routed at random (probability label_rate) before novelty is used,
            0 <= warmup <= window.
        feedback_gain: Gain of the correction from the realised routed fraction (>= 0).
        typical_neighbours: 0 (the default): farthest-first on novelty alone. k >= 1:
            typicality-weighted, the value compared with the threshold is novelty divided
            by the study's mean distance to its k nearest neighbours among the last
            `window` studies seen (Hacohen et al. 2022's typicality, inverted), so that
            an outlier, far from everything, is not mistaken for new ground.
    """

    def __init__(
        self,
        label_rate: float,
        seed: int,
        window: int = 500,
        warmup: int = 50,
        feedback_gain: float = 8.0,
        typical_neighbours: int = 0,
    ) -> None:
        if not isinstance(label_rate, Real) or not 0 < label_rate <= 1:
            raise ValueError(f"label_rate must be in (0, 1], got {label_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, Integral):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if isinstance(window, bool) or not isinstance(window, Integral) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, Integral) or not 0 <= warmup:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        if warmup > window:
            raise ValueError(f"warmup ({warmup}) must not exceed window ({window})")
        if not isinstance(feedback_gain, Real) or not 0 <= feedback_gain < math.inf:
            raise ValueError(f"feedback_gain must be a finite number >= 0, got {feedback_gain!r}")
        self.label_rate = float(label_rate)
        self.seed = int(seed)
        self.window = int(window)
        self.warmup = int(warmup)
        self.feedback_gain = float(feedback_gain)
        if (isinstance(typical_neighbours, bool) or not isinstance(typical_neighbours, Integral)
                or typical_neighbours < 0):
            raise ValueError(f"typical_neighbours must be an int >= 0, got {typical_neighbours!r}")
        self.typical_neighbours = int(typical_neighbours)
        self._recent: deque[np.ndarray] = deque(maxlen=self.window)
        self._selected = np.zeros((64, EMBEDDING_SIZE))
        self._count = 0
        self._novelty: deque[float] = deque(maxlen=self.window)
        self._routed: deque[bool] = deque(maxlen=self.window)
        self._eligible: deque[bool] = deque(maxlen=self.window)
        self._seen = 0

    @property
    def seen(self) -> int:
        """Studies committed (replayed ones included)."""
        return self._seen

    @property
    def selected(self) -> int:
        """Routed embeddings that novelty is measured against."""
        return self._count

    def novelty(self, embedding: np.ndarray) -> float:
        """Distance from `embedding` to the nearest routed one (NOVELTY_CAP if none)."""
        e = self._check(embedding)
        if self._count == 0:
            return NOVELTY_CAP
        distances = np.sqrt(((self._selected[: self._count] - e) ** 2).sum(axis=1))
        return min(float(distances.min()), NOVELTY_CAP)

    def spread(self, embedding: np.ndarray) -> float | None:
        """Mean distance from `embedding` to its `typical_neighbours` nearest among the
        recent studies seen (small in a dense, typical region); None when off or while
        fewer have been seen."""
        k = self.typical_neighbours
        if k == 0 or len(self._recent) < k:
            return None
        e = self._check(embedding)
        distances = np.sqrt(((np.stack(self._recent) - e) ** 2).sum(axis=1))
        return float(np.partition(distances, k - 1)[:k].mean())

    def value(self, embedding: np.ndarray) -> float:
        """What the threshold is compared with: `novelty`, divided by `spread` when
        typicality-weighted (and it is known)."""
        novelty = self.novelty(embedding)
        spread = self.spread(embedding)
        if spread is None or novelty >= NOVELTY_CAP:
            return novelty
        return novelty / (spread + _EPS)

    def realised_rate(self) -> float | None:
        """Routed fraction of the window's studies not blocked by the cap (None if none)."""
        eligible = [r for r, ok in zip(self._routed, self._eligible, strict=True) if ok]
        return sum(eligible) / len(eligible) if eligible else None

    def rate(self) -> float:
        """The share r to route now: label_rate corrected by the realised fraction."""
        rate = self.label_rate
        realised = self.realised_rate()
        if realised is not None:
            rate += self.feedback_gain * (self.label_rate - realised)
        return min(max(rate, 0.0), 1.0)

    def threshold(self) -> float | None:
        """Novelty a study must exceed to be routed; None in warm-up."""
        if self._seen < self.warmup or not self._novelty:
            return None
        ordered = np.sort(np.fromiter(self._novelty, dtype=np.float64))
        position = (1.0 - self.rate()) * (ordered.shape[0] - 1)
        low = int(math.floor(position))
        high = min(low + 1, ordered.shape[0] - 1)
        return float(ordered[low] + (position - low) * (ordered[high] - ordered[low]))

    def wants(self, embedding: np.ndarray, sequence: int) -> bool:
        """Whether the study should be routed; changes nothing.

        Args:
            embedding: The study's `coldstart_embedding`.
            sequence: The decision's sequence number (seeds the warm-up draw).
        """
        novelty = self.value(embedding)
        threshold = self.threshold()
        if threshold is None:
            return uniform_pair(self.seed, sequence)[1] < self.label_rate
        return self.rate() >= 1.0 or novelty > threshold

    def commit(
        self,
        embedding: np.ndarray | None,
        routed: bool,
        *,
        eligible: bool = True,
        novelty: float | None = None,
    ) -> None:
        """Record one study's outcome.

        Args:
            embedding: The study's embedding; may be None only when replaying a stored
                decision (then `novelty` is required), e.g. one not routed, or a routed
                one whose images are gone (it counts in the rate, not in the routed set).
            routed: Whether it was routed (its embedding then joins the routed set).
            eligible: False when the daily cap blocked it (left out of the realised rate).
            novelty: Its novelty as stored with the decision; computed from `embedding`
                when None.
        """
        if novelty is None:
            if embedding is None:
                raise ValueError("embedding or novelty must be given")
            novelty = self.value(embedding)
        elif not math.isfinite(novelty) or novelty < 0:
            raise ValueError(f"novelty must be finite and >= 0, got {novelty!r}")
        if routed and embedding is not None:
            self.add_selected(embedding)
        if embedding is not None and self.typical_neighbours:
            self._recent.append(self._check(embedding))
        self._novelty.append(float(novelty))
        self._routed.append(bool(routed))
        self._eligible.append(bool(eligible))
        self._seen += 1

    def record(self, embedding: np.ndarray | None, reason: str, *,
               novelty: float | None = None) -> None:
        """Record the gate's decision on a cold-start study by its reason.

        `cold_start` was this selector's pick. An `audit` (routed at random by the gate)
        is labelled too, so it joins the covered set, but it is not the selector's pick
        and stays out of its realised rate, like a study the cap blocked."""
        if reason == "audit":
            self.commit(embedding, False, eligible=False, novelty=novelty)
            if embedding is not None:
                self.add_selected(embedding)
            return
        self.commit(embedding, reason == "cold_start", eligible=reason != "cap_reached",
                    novelty=novelty)

    def add_selected(self, embedding: np.ndarray) -> None:
        """Add a routed study's embedding without counting it as seen (restart rebuild)."""
        e = self._check(embedding)
        if self._count == self._selected.shape[0]:
            self._selected = np.concatenate([self._selected, np.zeros_like(self._selected)])
        self._selected[self._count] = e
        self._count += 1

    @staticmethod
    def _check(embedding: np.ndarray) -> np.ndarray:
        e = np.asarray(embedding, dtype=np.float64)
        if e.shape != (EMBEDDING_SIZE,) or not np.isfinite(e).all():
            raise ValueError(
                f"embedding must be {EMBEDDING_SIZE} finite values, got shape {e.shape}"
            )
        return e
