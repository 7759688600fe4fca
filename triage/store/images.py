"""Preprocessed pixels in the store: how they are packed, and a study's images read back.

Ingest writes each instance's preprocessed frames (:func:`to_storage`) into the
``images`` table; the gate, retraining and DICOMweb read them back in
:data:`INSTANCE_ORDER`. Imports nothing from the stages.
"""

from __future__ import annotations

import numpy as np
import sqlite_utils
import torch


def to_storage(tensor: torch.Tensor) -> bytes:
    """Pack a preprocessed tensor as float16 bytes for the store."""
    return tensor.to(torch.float16).numpy().tobytes()


def from_storage(data: bytes, n_frames: int, size: int) -> torch.Tensor:
    """Unpack :func:`to_storage` bytes to float32 [n_frames, size, size]."""
    array = np.frombuffer(data, dtype=np.float16).reshape(n_frames, size, size)
    return torch.from_numpy(array.astype(np.float32))


# A study's instances in an order that does not depend on their arrival: series (by
# number, then UID), position along the slice normal, InstanceNumber, SOP Instance UID
# (unique, so the order is total). Missing values sort last; instances stored before
# these columns existed fall back to series UID and SOP Instance UID.
INSTANCE_ORDER = (
    "instances.series_number IS NULL, instances.series_number, instances.series_uid, "
    "instances.slice_position IS NULL, instances.slice_position, "
    "instances.instance_number IS NULL, instances.instance_number, instances.sop_uid"
)


def load_study_images(db: sqlite_utils.Database, study_id: int) -> torch.Tensor:
    """All preprocessed frames of a study's scoreable instances, [n_images, 1, S, S].

    Instances are in :data:`INSTANCE_ORDER` and frames in file order, so evenly spaced
    picks over the result follow the anatomy, and the same study scores the same
    whatever order its files arrived in.
    """
    frames = []
    for size, n_frames, data in db.execute(
        "SELECT images.size, images.frames, images.data FROM images "
        "JOIN instances ON instances.id = images.instance_id "
        f"WHERE instances.study_id = ? ORDER BY {INSTANCE_ORDER}",
        [study_id],
    ).fetchall():
        frames.append(from_storage(data, n_frames, size))
    if not frames:
        return torch.empty(0, 1, 0, 0)
    return torch.cat(frames).unsqueeze(1)
