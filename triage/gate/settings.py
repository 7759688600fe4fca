"""The `gate:` section of config.yaml.

Imports no torch: `triage.config` reads it before any model is loaded.
"""

from typing import Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from triage.gate.budget_managers import BUDGET_MANAGERS
from triage.gate.strategies import STRATEGIES


class GateSettings(BaseModel):
    """The `gate:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = "combined"
    """Strategy, the score of each study (`triage.gate.strategies.STRATEGIES`): random,
    entropy, bald, margin, least_confidence, vote_entropy, consensus_entropy,
    max_disagreement, badge, alfa_mix, emoc, dal, predicted_loss, combined, or auto (the
    gate chooses among `auto_strategies` from the audits, `triage.gate.strategies.auto`)."""
    budget_manager: str | None = None
    """How scores become routes under the budget (`triage.gate.budget_managers`):
    `quantile` routes a study whose combined score passes the window quantile that keeps
    `label_rate`; `biqf` is scikit-activeml's balanced incremental quantile filter on
    the same combined score; `batch` (strategy `badge` only) lets scored studies wait,
    `batch_size` of them or `batch_seconds`, and routes a diverse k-means++ batch of
    them; `coin` routes each study with probability `label_rate` whatever its scores (no
    cold-start selection, no coverage queries). None: the strategy's own (`coin` for
    random, `quantile` for the others)."""
    uncertainty_measure: Literal[
        "entropy", "bald", "variation_ratio", "least_confidence", "margin", "vote_entropy"
    ] = "entropy"
    """MC uncertainty measure of the `combined` strategy. Entropy of the MC-averaged
    prediction: at the default `head` scope it flags the classifier's own errors better
    than BALD (bench/gate_cost.py, 2026-12-02: error AUROC 0.952 against 0.910 on the dev
    val split; BALD from `model.epistemic: laplace` samples reaches 0.952 too)."""
    label_rate: float = Field(0.2, gt=0, le=1)
    """Target fraction of studies routed to a radiologist (audits and cold start included)."""
    window: int = Field(500, ge=10, le=100_000)
    """Rolling window (scored studies) for quantiles, threshold and realised rate; the
    cold-start selector keeps as many cold-start studies for its novelty threshold."""
    warmup: int = Field(50, ge=1)
    """Scored studies needed in the window before scores are used (<= window); likewise
    cold-start studies before the selector uses novelty."""
    uncertainty_weight: float = Field(0.5, ge=0)
    """Weight of the uncertainty quantile in the combined score."""
    loss_weight: float = Field(0.5, ge=0)
    """Weight of the predicted-loss quantile in the combined score."""
    daily_cap: int = Field(200, ge=0)
    """Radiologist capacity: most studies routed per calendar day (all reasons)."""
    exploration_rate: float = Field(0.02, ge=0, le=1)
    """Probability that a study is routed as `audit` regardless of its score. Audit labels
    are the validation set (`retrain.validation_source: audit`) and the live-accuracy
    estimate; at label_rate 0.1 the default gives them a fifth of the labels."""
    feedback_gain: float = Field(8.0, ge=0, le=100)
    """Gain of the correction from the realised routed fraction (0 disables it). With the
    window-long realised rate, a high gain is needed on drifting score streams: 8 keeps
    500-study blocks within about 2 points of label_rate on the drift tests."""
    cold_start_neighbours: int = Field(0, ge=0, le=500)
    """Before the first model: 0 picks the studies farthest from those already routed
    (coverage); k >= 1 weights that distance by typicality, dividing it by the study's
    mean distance to its k nearest recent studies, so outliers are not taken for new
    ground (`triage.gate.coldstart`)."""
    auto_strategies: tuple[str, ...] = ("combined", "entropy", "alfa_mix", "badge", "emoc")
    """The candidates `strategy: auto` chooses among (two or more scoring strategies, not
    random, dal or auto itself)."""
    batch_size: int = Field(100, ge=2, le=10_000)
    """`budget_manager: batch`: scored studies that wait before the batch is decided."""
    batch_seconds: float = Field(3600.0, gt=0, le=7 * 86400)
    """`budget_manager: batch`: the longest a scored study waits for its batch (seconds,
    from its scoring); a smaller batch is decided then."""
    seed: int = 0
    """Seed of the exploration, warm-up and random-strategy draws."""
    timezone: str = "UTC"
    """IANA time zone whose midnight starts a new day for `daily_cap`."""

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {value!r}")
        return value

    @field_validator("auto_strategies")
    @classmethod
    def _known_candidates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        allowed = sorted(n for n, c in STRATEGIES.items()
                         if c.has_scores and not c.fits_discriminator and n != "auto")
        unknown = [n for n in value if n not in allowed]
        if unknown:
            raise ValueError(f"auto_strategies must be taken from {allowed}, got {unknown}")
        if len(value) < 2 or len(set(value)) != len(value):
            raise ValueError(f"auto_strategies must name two or more distinct strategies, "
                             f"got {list(value)}")
        return value

    @field_validator("budget_manager")
    @classmethod
    def _known_manager(cls, value: str | None) -> str | None:
        if value is not None and value not in BUDGET_MANAGERS:
            raise ValueError(
                f"budget_manager must be one of {sorted(BUDGET_MANAGERS)}, got {value!r}"
            )
        return value

    @property
    def manager(self) -> str:
        """The budget manager in use: `budget_manager`, or the strategy's own."""
        return self.budget_manager or STRATEGIES[self.strategy].default_budget_manager

    @property
    def uses_scores(self) -> bool:
        """Whether the budget manager looks at scores; False is the random baseline (no
        cold-start selection, no coverage queries, no queue rescoring)."""
        return BUDGET_MANAGERS[self.manager].uses_scores

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"timezone must be an IANA zone name, got {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        if self.exploration_rate > self.label_rate:
            raise ValueError(
                f"exploration_rate ({self.exploration_rate}) must not exceed "
                f"label_rate ({self.label_rate})"
            )
        if self.uncertainty_weight + self.loss_weight <= 0:
            raise ValueError("uncertainty_weight and loss_weight must not both be 0")
        if BUDGET_MANAGERS[self.manager].buffered and not STRATEGIES[
            self.strategy
        ].batch_embeddings:
            batched = sorted(n for n, c in STRATEGIES.items() if c.batch_embeddings)
            raise ValueError(f"budget_manager {self.manager!r} needs a strategy that embeds "
                             f"studies for its batches ({batched}), got {self.strategy!r}")
        if self.uses_scores and not STRATEGIES[self.strategy].has_scores:
            raise ValueError(
                f"budget_manager {self.manager!r} ranks scores and strategy "
                f"{self.strategy!r} gives none: use budget_manager coin"
            )
        return self
