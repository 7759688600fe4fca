"""Ordering the source into studies, and writing them into an inbox at a steady rate.

Orders:

- ``shuffled``: a seeded random permutation.
- ``drift``: one class (``scarce_class``, default the rarest) is scarce early and
  arrives later: the first ``drift_at`` share of the stream holds only ``early_share``
  of that class's images; the rest of them come after. Each segment is shuffled.

Each study is written as new DX instances (fresh Study/Series/SOP Instance UIDs, pixel
spacing, a VOI window covering the full 8-bit range so the daemon's ingest windowing is
the identity) to ``<inbox>/replay-<tag>/NNNNNN-K.dcm``, first under a ``.part`` name,
then renamed, as a well-behaved sender does. Folder items are copied the same way,
keeping their own UIDs.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from triage.replay.dicom_writer import image_dataset
from triage.replay.source import Item

ORDERS = ("shuffled", "drift")
FULL_RANGE_WINDOW = {np.dtype(np.uint8): (127.5, 255.0), np.dtype(np.uint16): (32767.5, 65535.0)}
FIELD_OF_VIEW_MM = 350.0  # a chest X-ray's width; the source's pixel spacing follows from it


@dataclass
class Study:
    """One replayed study: its truth and its images, and what the writer did with it."""

    position: int
    uid: str
    label: int
    items: list[Item]
    written_at: float | None = None
    files: list[Path] = field(default_factory=list)


def order_indices(labels: list[int] | np.ndarray, order: str, seed: int, *,
                  scarce_class: int | None = None, drift_at: float = 0.5,
                  early_share: float = 0.1) -> np.ndarray:
    """Positions of the source items in stream order.

    Args:
        labels: Class index per item.
        order: ``shuffled`` or ``drift``.
        scarce_class: Class held back by ``drift`` (default: the rarest one present).
        drift_at: Share of the stream before the held-back images arrive.
        early_share: Share of the scarce class's images allowed before ``drift_at``.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    if order == "shuffled":
        return rng.permutation(len(y))
    if order != "drift":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not 0 < drift_at < 1 or not 0 <= early_share <= 1:
        raise ValueError("drift needs 0 < drift_at < 1 and 0 <= early_share <= 1")
    if scarce_class is None:
        present, counts = np.unique(y, return_counts=True)
        scarce_class = int(present[np.argmin(counts)])
    scarce = rng.permutation(np.flatnonzero(y == scarce_class))
    others = rng.permutation(np.flatnonzero(y != scarce_class))
    n_early_scarce = int(round(early_share * len(scarce)))
    early_len = int(round(drift_at * len(y)))
    n_early_others = max(0, min(len(others), early_len - n_early_scarce))
    early = np.concatenate([scarce[:n_early_scarce], others[:n_early_others]])
    late = np.concatenate([scarce[n_early_scarce:], others[n_early_others:]])
    return np.concatenate([rng.permutation(early), rng.permutation(late)]).astype(np.int64)


def build_studies(items: list[Item], order: np.ndarray, images_per_study: int = 1) -> list[Study]:
    """Group ordered items into studies.

    Items with their own ``study_uid`` (folder source) keep their studies, placed where
    their first image falls. Otherwise consecutive same-class images form studies of
    ``images_per_study`` (leftovers end as smaller studies), each with a new UID.
    """
    if images_per_study < 1:
        raise ValueError("images_per_study must be at least 1")
    studies: list[Study] = []
    if items and items[0].study_uid is not None:
        by_uid: dict[str, Study] = {}
        for i in order:
            item = items[int(i)]
            assert item.study_uid is not None
            study = by_uid.get(item.study_uid)
            if study is None:
                study = by_uid[item.study_uid] = Study(len(studies), item.study_uid,
                                                       item.label, [])
                studies.append(study)
            study.items.append(item)
        return studies
    pending: dict[int, list[Item]] = {}
    for i in order:
        item = items[int(i)]
        group = pending.setdefault(item.label, [])
        group.append(item)
        if len(group) == images_per_study:
            studies.append(Study(len(studies), generate_uid(), item.label, group))
            pending[item.label] = []
    for label, group in pending.items():
        if group:
            studies.append(Study(len(studies), generate_uid(), label, group))
    return studies


class StreamWriter:
    """Writes studies into an inbox at ``rate`` studies per second (0: as fast as possible).

    Study ``i`` is written no earlier than ``start + i / rate``, so a slow write is made
    up for by the next ones rather than slowing the whole stream.
    """

    def __init__(self, inbox: Path, studies: list[Study], *, rate: float, tag: str,
                 pixel_spacing: float | None = None,
                 on_written: Callable[[Study], None] | None = None) -> None:
        self.inbox = inbox
        self.studies = studies
        self.rate = rate
        self.folder = inbox / f"replay-{tag}"
        self.pixel_spacing = pixel_spacing
        self.on_written = on_written
        self.written = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> StreamWriter:
        self._thread = threading.Thread(target=self._run, name="replay-writer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            for study in self.studies:
                if self.rate > 0:
                    delay = start + study.position / self.rate - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                if self._stop.is_set():
                    return
                self.write_study(study)
                self.written += 1
                if self.on_written is not None:
                    self.on_written(study)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def write_study(self, study: Study) -> list[Path]:
        """Write one study's instances (``.part`` first, then renamed); return the paths."""
        series_uid = generate_uid()
        for number, item in enumerate(study.items, start=1):
            target = self.folder / f"{study.position:06d}-{number}.dcm"
            partial = target.with_name(target.name + ".part")
            partial.parent.mkdir(parents=True, exist_ok=True)
            if item.path is not None:
                shutil.copyfile(item.path, partial)
            else:
                assert item.pixels is not None
                ds = study_instance(item.pixels, study, series_uid, number, self.pixel_spacing)
                ds.save_as(partial, enforce_file_format=True)
            os.replace(partial, target)
            study.files.append(target)
        study.written_at = time.time()
        return study.files


def study_instance(pixels: np.ndarray, study: Study, series_uid: str, number: int,
                   pixel_spacing: float | None = None):  # -> pydicom Dataset
    """A DX instance of ``pixels`` belonging to ``study`` (no real patient attributes)."""
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16):
        pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    spacing = pixel_spacing or round(FIELD_OF_VIEW_MM / max(pixels.shape), 4)
    return image_dataset(
        pixels, modality="DX", study_uid=study.uid, series_uid=series_uid,
        patient_name=f"REPLAY^{study.position:06d}", patient_id=f"REPLAY-{study.position:06d}",
        accession=f"R{study.position:06d}", pixel_spacing=spacing,
        window=FULL_RANGE_WINDOW[pixels.dtype], instance_number=number,
    )
