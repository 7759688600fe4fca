"""Training-batch augmentation for chest radiographs, with MONAI transforms.

Small rotations, zoom and shifts and mild contrast/brightness changes. Never a left-right
flip: the heart's side is anatomy, a mirrored film is a different (abnormal) finding.
Random draws come from the generator `fit` passes in, so a seeded run is reproducible.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import set_track_meta
from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandShiftIntensity

from triage.model.training import Augment
from triage.retrain.settings import RetrainSettings


def make_augment(settings: RetrainSettings, input_size: int) -> Augment | None:
    """The `fit` augmentation hook described by `settings`, or None when it is off.

    Args:
        settings: `augment`, `rotate_degrees`, `zoom`, `shift_fraction`, `intensity`.
        input_size: Image side in pixels (shifts are a fraction of it).

    Returns:
        A callable(batch [B, 1, S, S], generator) -> augmented batch [B, 1, S, S] in [0, 1].
    """
    if not settings.augment:
        return None
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    shift = settings.shift_fraction * input_size
    transform = Compose([
        RandAffine(
            prob=0.8,
            rotate_range=math.radians(settings.rotate_degrees),
            scale_range=(settings.zoom, settings.zoom),
            translate_range=(shift, shift),
            padding_mode="zeros",
            mode="bilinear",
        ),
        RandAdjustContrast(prob=0.5, gamma=(1 - settings.intensity, 1 + settings.intensity)),
        RandShiftIntensity(prob=0.5, offsets=settings.intensity / 2),
    ])

    def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        transform.set_random_state(state=np.random.RandomState(seed))
        set_track_meta(False)
        out = torch.stack([torch.as_tensor(transform(image)) for image in batch])
        return out.clamp_(0.0, 1.0)

    return augment
