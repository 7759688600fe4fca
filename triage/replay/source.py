"""Where replayed images and their truth come from.

Two sources:

- ``pneumoniamnist``: the development file (`triage.replay.datasets.load_pneumoniamnist_dev`),
  split ``train`` or ``val``. Never the holdout: that file is read only by the final
  ``--holdout-eval`` step (`triage.replay.report.holdout_eval`).
- ``folder``: DICOM files under a directory with a CSV of ``file,label`` (``file``
  relative to the directory; ``label`` a class name or its index). The files are copied
  into the inbox as they are, so their own UIDs are kept; a study's truth is the label
  of its files (which must agree).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from triage.errors import TriageError
from triage.replay.datasets import load_pneumoniamnist_dev

SPLITS = ("train", "val")


class SourceError(TriageError):
    """The replay source cannot be read."""


@dataclass(frozen=True)
class Item:
    """One image of the source.

    Attributes:
        key: Stable name within the source (index or relative path).
        label: Truth as a class index into the daemon's `model.labels`.
        pixels: uint8/uint16 [rows, cols] to be written as a new instance, or None.
        path: An existing DICOM file to copy, or None.
        study_uid: The file's StudyInstanceUID (folder source only).
    """

    key: str
    label: int
    pixels: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None
    study_uid: str | None = None


def pneumoniamnist_items(split: str = "train", n: int | None = None, *, seed: int = 0,
                         data_dir: Path | None = None) -> list[Item]:
    """Images of the PneumoniaMNIST development file (0 normal, 1 pneumonia).

    Args:
        split: ``train`` or ``val`` of the development file.
        n: Take a seeded random subset of this many (None: all).
        seed: Seed of that subset.
    """
    if split not in SPLITS:
        raise SourceError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    try:
        data = load_pneumoniamnist_dev(data_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(str(exc)) from None
    images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
    index = np.arange(len(labels))
    if n is not None:
        if n < 1:
            raise SourceError(f"--n must be at least 1 (got {n})")
        index = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return [Item(key=f"{split}:{i}", label=int(labels[i]), pixels=images[i]) for i in index]


def folder_items(dicom_dir: Path, labels_csv: Path, class_names: list[str],
                 n: int | None = None, *, seed: int = 0) -> list[Item]:
    """DICOM files named in a ``file,label`` CSV, with their study UIDs read from the files."""
    import pydicom

    if not dicom_dir.is_dir():
        raise SourceError(f"--dicom-dir {dicom_dir} is not a directory")
    try:
        with open(labels_csv, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise SourceError(f"--labels-csv {labels_csv}: {exc.strerror or exc}") from None
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise SourceError(f"--labels-csv {labels_csv} needs the columns file,label")
    items: list[Item] = []
    truth_of_study: dict[str, int] = {}
    for number, row in enumerate(rows, start=2):
        label = _class_index(row["label"], class_names, f"{labels_csv}:{number}")
        path = dicom_dir / row["file"]
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
                "StudyInstanceUID"])
            uid = str(header.StudyInstanceUID)
        except Exception as exc:  # pydicom raises many types
            raise SourceError(f"{path}: not a readable DICOM file with a StudyInstanceUID "
                              f"({type(exc).__name__})") from None
        if truth_of_study.setdefault(uid, label) != label:
            raise SourceError(f"{labels_csv}:{number}: {row['file']} is labelled "
                              f"{class_names[label]!r} but another file of its study is not")
        items.append(Item(key=row["file"], label=label, path=path, study_uid=uid))
    if n is not None and n < len(items):
        keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
        items = [items[i] for i in keep]
    return items


def _class_index(value: str, class_names: list[str], where: str) -> int:
    text = value.strip()
    if text in class_names:
        return class_names.index(text)
    if text.isdigit() and int(text) < len(class_names):
        return int(text)
    raise SourceError(f"{where}: label {value!r} is not one of {class_names} or an index")
