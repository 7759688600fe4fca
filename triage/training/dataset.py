"""The labelled studies of the store as training and validation tensors.

Only current labels (``superseded_by IS NULL``) that name a class and carry a split are
used; `skip` and `not-diagnostic` never are. Every image of a study (at most
`model.max_images_per_study`, evenly spaced) carries the study's label; `groups` maps
images back to studies so validation metrics are computed per study.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils
import torch

from triage.model.inference import pick_images
from triage.model.settings import ModelSettings
from triage.store.images import load_study_images


@dataclass(frozen=True)
class LabeledSet:
    """One side of the split.

    Attributes:
        images: Float [N, 1, S, S] in [0, 1] (N images of the studies below).
        labels: Class index of each image, torch.long [N].
        groups: Position in `study_ids` of each image's study, torch.long [N].
        study_ids: Study ids [M], in label id order.
        label_ids: Label row id of each study [M].
        study_labels: Class index of each study [M].
    """

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    study_ids: list[int]
    label_ids: list[int]
    study_labels: list[int]

    @property
    def num_studies(self) -> int:
        return len(self.study_ids)

    def class_counts(self, class_names: list[str]) -> dict[str, int]:
        """Studies per class name."""
        counts = dict.fromkeys(class_names, 0)
        for index in self.study_labels:
            counts[class_names[index]] += 1
        return counts

    def plus(self, other: "LabeledSet") -> "LabeledSet":
        """Both sets as one (this one's studies first; `other`'s groups shifted)."""
        return LabeledSet(
            torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]),
            torch.cat([self.groups, other.groups + self.num_studies]),
            [*self.study_ids, *other.study_ids], [*self.label_ids, *other.label_ids],
            [*self.study_labels, *other.study_labels],
        )

    def summary(self, class_names: list[str]) -> dict[str, object]:
        """JSON-ready counts and the label ids used (stored with the candidate)."""
        return {
            "studies": self.num_studies,
            "images": int(self.images.shape[0]),
            "classes": self.class_counts(class_names),
            "label_ids": list(self.label_ids),
        }


def current_labels(db: sqlite_utils.Database, split: str, class_names: list[str]) -> list[tuple]:
    """(label id, study id, label) of the current class labels of one split, by label id."""
    marks = ",".join("?" * len(class_names))
    return db.execute(
        f"SELECT id, study_id, label FROM labels WHERE superseded_by IS NULL AND split = ? "
        f"AND label IN ({marks}) ORDER BY id",
        [split, *class_names],
    ).fetchall()


def load_split(db: sqlite_utils.Database, split: str, settings: ModelSettings) -> LabeledSet:
    """Load one split (`train` or `validation`) of the labelled studies.

    Args:
        db: The store.
        split: `train` or `validation`.
        settings: Model settings (`labels`, `input_size`, `max_images_per_study`).

    Returns:
        The `LabeledSet`; studies without an image of the configured size are left out.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    names = list(settings.labels)
    size = settings.input_size
    images, labels, groups = [], [], []
    study_ids, label_ids, study_labels = [], [], []
    for label_id, study_id, label in current_labels(db, split, names):
        frames = load_study_images(db, study_id)
        if frames.shape[0] == 0 or tuple(frames.shape[2:]) != (size, size):
            continue
        frames = frames[pick_images(frames.shape[0], settings.max_images_per_study)]
        index = names.index(label)
        position = len(study_ids)
        study_ids.append(int(study_id))
        label_ids.append(int(label_id))
        study_labels.append(index)
        images.append(frames)
        labels.append(torch.full((frames.shape[0],), index, dtype=torch.long))
        groups.append(torch.full((frames.shape[0],), position, dtype=torch.long))
    if not images:
        empty = torch.zeros(0, dtype=torch.long)
        return LabeledSet(torch.zeros(0, 1, size, size), empty, empty, [], [], [])
    return LabeledSet(
        torch.cat(images), torch.cat(labels), torch.cat(groups), study_ids, label_ids,
        study_labels,
    )
