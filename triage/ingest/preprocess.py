"""Decoded pixels to the fixed-size tensor the model sees, with MONAI transforms.

Pure functions, no I/O. The result is cached with the instance at ingest, so retraining
never decodes DICOM again (packed by :func:`triage.store.images.to_storage`).
"""

from __future__ import annotations

import torch
from monai.transforms import (
    Compose,
    Lambda,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    SpatialPad,
)

from triage.ingest.dicom import DecodedImage


def preprocess(
    image: DecodedImage, size: int, percentile_window: tuple[float, float] = (0.5, 99.5)
) -> torch.Tensor:
    """Window, invert and resample an image to ``size`` x ``size``.

    Steps: VOI window from the DICOM window centre/width, else a robust percentile window
    over the whole instance; scale to [0, 1]; MONOCHROME1 inversion; resize keeping the
    aspect ratio (longest side to ``size``, area interpolation) and zero-pad to a square.

    Args:
        image: Frames in modality units, [n_frames, rows, cols].
        size: Output side in pixels (``model.input_size``).
        percentile_window: Lower and upper percentiles for images without a DICOM window.

    Returns:
        float32 tensor [n_frames, size, size] with values in [0, 1]. Frames are channels
        here, so one transform call handles a multi-frame instance.
    """
    return _pipeline(image, size, percentile_window)(torch.from_numpy(image.frames))


def _pipeline(
    image: DecodedImage, size: int, percentile_window: tuple[float, float]
) -> Compose:
    if image.window is not None:
        centre, width = image.window
        window = ScaleIntensityRange(
            a_min=centre - width / 2, a_max=centre + width / 2, b_min=0.0, b_max=1.0, clip=True
        )
    else:
        low, high = percentile_window
        window = ScaleIntensityRangePercentiles(
            lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True, channel_wise=False
        )
    steps = [window]
    if image.invert:
        steps.append(Lambda(lambda x: 1.0 - x))
    steps += [
        Resize(spatial_size=size, size_mode="longest", mode="area"),
        SpatialPad(spatial_size=(size, size)),
    ]
    return Compose(steps)

