"""Configuration of periodic retraining (the `retrain:` section of config.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class RetrainSettings(BaseModel):
    """The `retrain:` section. Optimiser, epochs, batch size, seed and class weighting come
    from `model.training`; this section says when to retrain, how to split and sample the
    labels, and when a candidate may replace the serving model.

    Attributes:
        enabled: Let the daemon start runs by itself (`triage retrain` works regardless).
        min_new_labels: Start a run once this many new class labels arrived since the
            last run started.
        idle_minutes: ...or, with new labels waiting, once no label came for this many
            minutes: when the stream goes quiet, the labels of its tail still train the
            served model instead of waiting for `min_new_labels` more.
        every_hours: ...or once this many hours passed since the last run started (only
            with at least one new label: retraining on unchanged data is pointless).
        validation_source: Which labels form the fixed validation set: `audit` (only
            the studies the gate routed at random, an unbiased sample of the stream;
            every other label trains) or `mixed` (audits plus a stratified
            `validation_fraction` of the gate's own picks, which are biased toward hard
            cases).
        validation_fraction: With `mixed`, the target share of each class's non-audit
            labels held out.
        min_validation_studies: Fewest validation studies (with every class present)
            a run needs: no model is served that was judged on less.
        promotion_tolerance: A candidate is promoted when its validation AUROC is at
            least the reference's minus this. The reference is the best of the serving
            model and its last `reference_models` - 1 promoted ancestors, all
            re-evaluated on today's validation set, so the tolerance cannot ratchet the
            chain down model after model.
        reference_models: How many recent serving models (the current one included)
            the candidate is compared with (default 1: the serving model alone).
        promotion_test: `none`: the AUROC rule above as it is. `delong` (default): the
            candidate is also allowed the validation set's sampling noise, 1.645 DeLong
            standard errors of its paired AUROC difference with the reference
            (one-sided 95%), so it is rejected only when it is worse beyond chance.
            Measured with the raw training set (README, "The served model"): the same
            served AUROC as the best-of-three rule, no rejection in 10 runs, and the
            served model equal to a fresh model on the same labels in every run.
        refit_on_all_labels: Once a candidate is promoted, train the served network again,
            with the same recipe and seed, on the training and the validation labels
            together, so that no label bought is left out of the served model. The
            promotion decision, the operating point and the stored validation metrics
            stay those of the candidate judged on held-out labels; the candidate is kept
            in the checkpoint as its `judge`, and later runs compare their candidates
            with the judges, which never saw the validation labels. Costs a second
            training per promoted run.
        auto_promote: Promote (or reject) automatically; False leaves the candidate for an
            admin (`triage models promote V`).
        warm_start: Start from the serving model's weights when there is one (off:
            every run trains from scratch and depends only on the labels; the two
            measured alike at 5 seeds, see the README).
        min_train_studies: Fewest labelled training studies a run needs.
        augment: Random small shifts and intensity changes (and rotations and zoom where
            set) on training batches (MONAI's affine layer); never left-right flips.
        rotate_degrees: Largest rotation of the augmentation, degrees (default 0: a
            rotation resamples and blurs; measured worse than none, bench/recipe.py).
        zoom: Largest relative zoom in or out of the augmentation (default 0, likewise).
        shift_fraction: Largest shift of the augmentation, as a fraction of the side;
            whole pixels when `rotate_degrees` and `zoom` are both 0 (then nothing is
            resampled, so nothing is blurred).
        intensity: Largest relative contrast/brightness change of the augmentation.
        rebalance: Draw each epoch's training sample with core-set coverage weights
            (embeddings from the serving model) instead of the raw set. Off by default:
            with the class-weighted loss already correcting the class mix, it cost the
            served model about 0.02 holdout AUROC on both benchmark streams (README,
            "The served model"), and without it the served model is the model a fresh
            training on the same labels gives.
        unforgettable_weight: Sampling weight, in each run's draws, of the images of a
            study that every earlier run learned and never forgot (Toneva et al. 2019:
            such examples can be dropped with little loss); 1 (the default) draws every
            image alike, as a plain shuffle. Measured under Benchmarks.
        coverage_power: Exponent p of the coverage weights |cell|^-p (1: equal mass per cell).
        coverage_cells: Number of k-center cells (default ceil(sqrt(n))).
        coverage_outlier_fraction: Share of the points (training images for the cells,
            pool studies for the queries) that k-center with outliers may leave
            uncovered, so a few corrupt or exotic studies cannot capture centres.
        pool_max: Most recent unlabelled scored studies considered by coverage queries.
        coverage_queries: After each promotion, route at most this many unlabelled studies
            farthest from every labelled one (reason `coverage`), within the daily cap.
        threads: Torch threads of the training process (the daemon keeps the other cores);
            of each process with `nproc` > 1.
        nproc: Training processes (default 1). Above 1 the run starts under torchrun
            (``python -m torch.distributed.run --standalone``) with DistributedDataParallel
            (gloo on the CPU): every process draws the same batches of
            `model.training.batch_size` images and trains on its share of each, with the
            batch normalisation statistics of the whole batch, so a step is the
            one-process step but for dropout masks; rank 0 alone evaluates, registers and
            decides. Uses `nproc` x `threads` cores. Keep `model.training.batch_size` a
            multiple of 2 x `nproc`: the loss-ranking pairs are then one process's. Measured
            under Benchmarks.
        nice: Scheduling niceness added to the training process.
        poll_seconds: How often `triage retrain` in the foreground reads the run's progress.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    min_new_labels: int = Field(50, ge=1, le=1_000_000)
    idle_minutes: float = Field(30.0, gt=0, le=7 * 24 * 60)
    every_hours: float = Field(24.0, gt=0, le=24 * 365)
    validation_source: Literal["audit", "mixed"] = "audit"
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    min_validation_studies: int = Field(20, ge=2, le=1_000_000)
    promotion_tolerance: float = Field(0.01, ge=0, le=1)
    reference_models: int = Field(1, ge=1, le=100)
    promotion_test: Literal["none", "delong"] = "delong"
    refit_on_all_labels: bool = True
    auto_promote: bool = True
    warm_start: bool = False
    min_train_studies: int = Field(10, ge=2)
    augment: bool = True
    rotate_degrees: float = Field(0.0, ge=0, le=45)
    zoom: float = Field(0.0, ge=0, lt=1)
    shift_fraction: float = Field(0.05, ge=0, lt=0.5)
    intensity: float = Field(0.1, ge=0, lt=1)
    rebalance: bool = False
    unforgettable_weight: float = Field(1.0, gt=0, le=1)
    coverage_power: float = Field(1.0, ge=0, le=4)
    coverage_cells: int | None = Field(None, ge=1)
    coverage_outlier_fraction: float = Field(0.02, ge=0, lt=1)
    pool_max: int = Field(5000, ge=1)
    coverage_queries: int = Field(10, ge=0, le=10_000)
    threads: int = Field(1, ge=1, le=256)
    nproc: int = Field(1, ge=1, le=64)
    nice: int = Field(10, ge=0, le=19)
    poll_seconds: float = Field(0.5, gt=0, le=60)
