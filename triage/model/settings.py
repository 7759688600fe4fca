"""Configuration of the classifier (the `model:` section of config.yaml)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

McScope = Literal["head", "last_block", "full"]
"""Which part of the network is sampled T times in MC dropout (see `triage.model.mc_dropout`)."""

ImageReduction = Literal["max", "mean"]
"""How per-image scores of a study are reduced to one study score."""


class TrainSettings(BaseModel):
    """The `model.training:` section: joint training of classifier and loss predictor.

    Attributes:
        epochs: Passes over the training tensors (at least; see `min_steps`).
        min_steps: Fewest optimiser steps of a run: a small labelled set gets more
            epochs, so a first model is not served with half-settled weights and
            BatchNorm statistics.
        schedule: Learning-rate schedule of the run: `onecycle` (warm-up to
            `learning_rate`, cosine decay to 1/1000 of it; one optimiser for the whole
            run), `constant`, or `restarts`: `cycles` cosine cycles of equal length, each
            from `learning_rate` down to 1/1000 of it (the schedule of snapshot ensembles,
            Huang et al. 2017; the final weights are served, bench/ensemble.py measures
            the cycles' snapshots as an ensemble).
        cycles: Cycles of the `restarts` schedule (ignored by the others).
        batch_size: Images per optimiser step; the ranking loss pairs the two halves of
            each batch, so it must be even.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW decoupled weight decay.
        ranking_margin: Margin of the pairwise ranking loss of the loss predictor
            (Yoo & Kweon 2019 use 1.0).
        ranking_weight: Weight of the ranking loss relative to the classification loss.
        detach_after_fraction: From this fraction of the epochs on, the loss predictor's
            input features are detached so its gradient no longer reaches the backbone
            (Yoo & Kweon stop it after 120 of 200 epochs, i.e. 0.6). 1.0 never detaches,
            0.0 (the default) always does: measured better than 0.6 on a fresh model
            (bench/recipe.py, README "The served model").
        class_weighted: Weight the cross-entropy by inverse class frequency of the
            training labels (useful for skewed streams).
        seed: Seed of weight initialisation, shuffling and dropout during `fit`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(20, ge=1, le=10_000)
    min_steps: int = Field(100, ge=0, le=10_000_000)
    schedule: Literal["onecycle", "constant", "restarts"] = "onecycle"
    cycles: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(64, ge=2, le=65_536)
    learning_rate: float = Field(2e-3, gt=0, le=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    ranking_margin: float = Field(1.0, ge=0)
    ranking_weight: float = Field(1.0, ge=0)
    detach_after_fraction: float = Field(0.0, ge=0, le=1)
    class_weighted: bool = True
    seed: int = 0

    @field_validator("batch_size")
    @classmethod
    def _even_batch(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"batch_size must be even (pairs come from batch halves), got {value}")
        return value


class ModelSettings(BaseModel):
    """The `model:` section.

    Attributes:
        input_size: Side in pixels of the square tensor every image is resampled to
            at ingest; the network's input size.
        labels: Class names, in output order (two or more).
        channels: Output channels of each backbone stage, a MONAI `ResidualUnit`. Two or
            more stages (the loss predictor reads every stage).
        strides: Stride of each stage (1 or 2), as many as `channels`; a stride-1 first
            stage computes its features at the input's full resolution. None: 2 for every
            stage (so a 64 px input leaves 4 px after 4 stages), the layout of every model
            trained before this setting existed.
        subunits: Convolutions per residual stage.
        dropout: Dropout probability before the final linear layer (the `head`).
        block_dropout: Dropout probability inside each residual stage. It is active in
            training; at inference only in the stages inside the MC scope.
        mc_scope: Part of the network sampled T times: `head` (dropout + linear layer on
            the pooled features), `last_block` (last stage + head) or `full` (everything,
            the classic and T times more expensive MC dropout).
        mc_samples: Number of MC dropout samples T.
        epistemic: Where the T predictive samples of the uncertainty measures come from:
            `mc_dropout` (T dropout masks at `mc_scope`) or `laplace` (T weight samples
            of the last layer from its Laplace posterior, `triage.model.epistemic`,
            stored with every model trained by this version; a model without one is
            scored by MC dropout).
        lossnet_width: Width of the per-stage linear layer of the loss predictor.
        max_images_per_study: At most this many images of a study are scored (evenly
            spaced picks).
        image_reduction: How per-image uncertainty and predicted loss are reduced to one
            study score: `max` (the most uncertain image) or `mean`.
        training: Joint training settings.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(64, ge=16, le=1024)
    labels: list[str] = Field(default_factory=lambda: ["normal", "pneumonia"], min_length=2)
    channels: tuple[int, ...] = Field((16, 32, 64, 128), min_length=2, max_length=8)
    strides: tuple[int, ...] | None = None
    subunits: int = Field(2, ge=1, le=4)
    dropout: float = Field(0.5, ge=0, lt=1)
    block_dropout: float = Field(0.1, ge=0, lt=1)
    mc_scope: McScope = "head"
    mc_samples: int = Field(20, ge=1, le=1000)
    epistemic: Literal["mc_dropout", "laplace"] = "mc_dropout"
    lossnet_width: int = Field(128, ge=1, le=4096)
    max_images_per_study: int = Field(8, ge=1, le=1024)
    image_reduction: ImageReduction = "max"
    training: TrainSettings = Field(default_factory=TrainSettings)

    @field_validator("channels")
    @classmethod
    def _positive_channels(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(c < 1 for c in value):
            raise ValueError(f"channels must all be positive, got {value}")
        return value

    @field_validator("strides")
    @classmethod
    def _valid_strides(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and any(s not in (1, 2) for s in value):
            raise ValueError(f"strides must each be 1 or 2, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _strides_match_channels(self) -> "ModelSettings":
        if self.strides is not None and len(self.strides) != len(self.channels):
            raise ValueError(f"strides must list one stride per stage of channels "
                             f"({len(self.channels)}), got {list(self.strides)}")
        return self

    @property
    def stage_strides(self) -> tuple[int, ...]:
        """The stride of every stage (`strides`, or 2 each when unset)."""
        return self.strides if self.strides is not None else (2,) * len(self.channels)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"labels must be distinct, got {value}")
        return value
