"""Study-level scoring: MC dropout, uncertainty and predicted loss of one study."""

import time
from dataclasses import dataclass, field

import torch

from triage.model.calibration import OperatingPoint
from triage.model.embedding import FeatureSpace, StudyEmbedding
from triage.model.epistemic import EpistemicHead, laplace_predict
from triage.model.lossnet import LossPredictor
from triage.model.mc_dropout import mc_predict
from triage.model.measures import MEASURES, all_measures
from triage.model.network import TriageNet
from triage.model.settings import ModelSettings

STAGES: tuple[str, ...] = ("trunk", "mc", "lossnet")


@dataclass(frozen=True)
class StudyResult:
    """Scores of one study.

    Attributes:
        probs: Class probabilities averaged over MC samples and scored images, one per
            label (sums to 1).
        uncertainty: Every measure of `triage.model.measures.MEASURES`, reduced
            over images: with reduction `max` the most uncertain image counts (the
            largest value, except `margin`, where the smallest is the most uncertain),
            with `mean` the mean. Entropy and BALD are in bits.
        predicted_loss: Output of the loss predictor reduced like `uncertainty` (max or
            mean over images); None without a loss predictor. Only its order matters.
        num_images: Images scored (<= max_images_per_study).
        num_images_total: Images in the study.
        durations: Wall time in seconds of the stages `trunk`, `mc` and `lossnet`.
        predicted: Predicted class index at the model's operating point (threshold on
            the calibrated probability of class 1 for two classes, else argmax); None
            means argmax of `probs`.
        ood: How unlike the training data the study looks (larger = less like it), max
            over images: the `EpistemicHead.ood` score of `triage.model.epistemic` (the
            feature density, and the input quality where the head has its reference);
            None for a model without a fitted density.
        ood_term: Which of `OOD_TERMS` gave `ood` (`features`, `sharpness`, `contrast`
            or `brightness`); None for a head without the quality reference.
        sampler: Where the T samples came from: `mc_dropout` or `laplace`.
        embedding: The scored images' pooled features with the model's last layer and
            training-feature summary (`triage.model.embedding`), for the strategies that
            score by them; None for a model without an epistemic head.
    """

    probs: tuple[float, ...]
    uncertainty: dict[str, float]
    predicted_loss: float | None
    num_images: int
    num_images_total: int
    durations: dict[str, float] = field(default_factory=dict)
    predicted: int | None = None
    ood: float | None = None
    ood_term: str | None = None
    sampler: str = "mc_dropout"
    embedding: StudyEmbedding | None = field(default=None, compare=False, repr=False)

    @property
    def predicted_index(self) -> int:
        """The predicted class: at the operating point when scored with one, else argmax."""
        if self.predicted is not None:
            return self.predicted
        return max(range(len(self.probs)), key=self.probs.__getitem__)


def pick_images(num_images: int, max_images: int) -> list[int]:
    """Evenly spaced indices of at most `max_images` of `num_images` images.

    The first and last image are always included when two or more are picked.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if num_images <= max_images:
        return list(range(num_images))
    if max_images == 1:
        return [num_images // 2]
    step = (num_images - 1) / (max_images - 1)
    return [round(i * step) for i in range(max_images)]


def score_study(
    net: TriageNet,
    loss_predictor: LossPredictor | None,
    images: torch.Tensor,
    settings: ModelSettings,
    *,
    seed: int | None = None,
    operating_point: OperatingPoint | None = None,
    epistemic: EpistemicHead | None = None,
) -> StudyResult:
    """Score one study: T predictive samples, their uncertainty, and the loss predictor.

    The T samples are MC-dropout masks, or, with `settings.epistemic == "laplace"` and
    a model that has an `epistemic` head, last-layer weight samples from its Laplace
    posterior over the deterministic pass's features (one small product instead of T
    stochastic passes). A model with a head also gets its `ood` score.

    Args:
        net: The classifier.
        loss_predictor: The loss predictor, or None (then `predicted_loss` is None).
        images: The study's images, float [K, 1, S, S] in [0, 1], S = input_size.
        settings: Model settings (`mc_samples`, `mc_scope`, `max_images_per_study`,
            `image_reduction`).
        seed: Optional seed of the dropout masks (the global RNG is left untouched).
        operating_point: The model's temperature and threshold (`Checkpoint.operating_point`);
            None: temperature 1 and argmax.
        epistemic: The model's Laplace posterior and feature density
            (`Checkpoint.epistemic`), or None.

    Returns:
        The study's `StudyResult`.
    """
    size = settings.input_size
    if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"images must be [K, 1, {size}, {size}], got {tuple(images.shape)}")
    total = images.shape[0]
    if total < 1:
        raise ValueError("images must hold at least one image")
    picks = pick_images(total, settings.max_images_per_study)
    if len(picks) < total:
        images = images[picks]
    temperature = operating_point.temperature if operating_point is not None else 1.0
    laplace = settings.epistemic == "laplace" and epistemic is not None
    if laplace:
        out = laplace_predict(net, epistemic, images, with_features=loss_predictor is not None,
                              temperature=temperature)  # fmt: skip
    else:
        out = mc_predict(
            net,
            images,
            samples=settings.mc_samples,
            scope=settings.mc_scope,
            with_features=loss_predictor is not None,
            seed=seed,
            temperature=temperature,
            with_pooled=epistemic is not None,
        )
    ood = ood_term = None
    mc_seconds = out.mc_seconds
    predicted_loss = None
    with torch.inference_mode():
        if epistemic is not None:
            start = time.perf_counter()
            ood, ood_term = epistemic.ood_term(out.pooled, images)
            mc_seconds += time.perf_counter() - start
        start = time.perf_counter()
        if loss_predictor is not None:
            # no dropout or BatchNorm in the loss predictor: its train/eval mode is irrelevant
            losses = loss_predictor.predict(out.stage_maps)
            reduced = losses.max() if settings.image_reduction == "max" else losses.mean()
            predicted_loss = float(reduced)
        lossnet_seconds = time.perf_counter() - start

    samples = out.probs.numpy()  # [T, K, C]; numpy is faster than torch on tiny arrays
    measures = all_measures(samples)
    if settings.image_reduction == "mean":
        values = [float(measures[name].mean()) for name in MEASURES]
    else:  # the most uncertain image: largest value, smallest margin
        values = [
            float(measures[name].min() if name == "margin" else measures[name].max())
            for name in MEASURES
        ]
    probs = samples.mean(axis=(0, 1))
    predicted = None
    if operating_point is not None:
        predicted = int(operating_point.predict(probs[None, :])[0])
    return StudyResult(
        probs=tuple(probs.tolist()),
        uncertainty=dict(zip(MEASURES, values, strict=True)),
        predicted_loss=predicted_loss,
        num_images=len(picks),
        num_images_total=total,
        durations={
            "trunk": out.trunk_seconds,
            "mc": mc_seconds,
            "lossnet": lossnet_seconds,
        },
        predicted=predicted,
        ood=ood,
        ood_term=ood_term,
        sampler="laplace" if laplace else "mc_dropout",
        embedding=(None if epistemic is None or out.pooled is None else
                   StudyEmbedding(out.pooled.numpy(), FeatureSpace.of(net.fc, epistemic))),
    )


@torch.inference_mode()
def embed(net: TriageNet, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (pooled last stage, before the head's dropout) in eval mode.

    Args:
        net: The classifier.
        images: Float [N, 1, S, S] in [0, 1].
        batch_size: Images per forward pass.

    Returns:
        Float [N, F], F = the last stage's channels.
    """
    was = net.training
    net.eval()
    try:
        parts = [net.trunk(images[i : i + batch_size], "head")[0]
                 for i in range(0, images.shape[0], batch_size)]
    finally:
        net.train(was)
    if not parts:
        return torch.zeros(0, net.stage_channels[-1])
    return torch.cat(parts).float()
