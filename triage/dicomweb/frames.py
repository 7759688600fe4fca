"""Frames of an archived instance as WADO-RS returns them: decoded, uncompressed.

Whatever the stored transfer syntax, a frame leaves as its native pixel values in
Explicit VR Little Endian layout (row by row, samples interleaved, little-endian),
which every viewer can display without a codec. Only the frames asked for are decoded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.pixels import pixel_array

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"


class FrameError(ValueError):
    """The frame list is malformed or names frames the instance does not have."""


def parse_frame_list(text: str, n_frames: int | None = None) -> list[int]:
    """``"1,3,2"`` -> ``[1, 3, 2]`` (1-based, as in the URL), checked against ``n_frames``."""
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise FrameError("frame numbers must be integers separated by commas") from None
    if not numbers:
        raise FrameError("no frame number given")
    if any(n < 1 for n in numbers):
        raise FrameError("frame numbers start at 1")
    if n_frames is not None and any(n > n_frames for n in numbers):
        raise FrameError(f"this instance has {n_frames} frame{'s' * (n_frames != 1)}")
    return numbers


def frame_bytes(path: Path, number: int) -> bytes:
    """Frame ``number`` (1-based) of the file at ``path``, uncompressed little-endian."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pixels = pixel_array(str(path), index=number - 1)
    return np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("<")).tobytes()
