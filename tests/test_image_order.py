"""A study's images are ordered by series, position along the slice normal, InstanceNumber
and SOP Instance UID, so the same real DICOM files ingested in any order give the same
image list and the same scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from prometheus_client import CollectorRegistry
from pydicom.dataset import Dataset

from conftest import store_settings

from triage.config import ScopeSettings, Settings
from triage.ingest.dicom import slice_position
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.model.inference import score_study
from triage.model.lossnet import build_loss_predictor
from triage.model.network import build_network
from triage.model.settings import ModelSettings
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store
from triage.store.images import INSTANCE_ORDER, load_study_images
from triage.telemetry.metrics import build_metrics

TINY = ModelSettings(input_size=32, channels=(4, 8), subunits=1, lossnet_width=8, mc_samples=3,
                     max_images_per_study=3)
CT_SCOPE = ScopeSettings(modalities=["CT"])  # multi-series CT studies
STUDY = "2.25.5150"
AXIAL = [1, 0, 0, 0, 1, 0]  # normal +z
SAGITTAL = [0, 1, 0, 0, 0, -1]  # normal -x: larger x comes first

# (name, series number, orientation, position, instance number), in the expected order.
EXPECTED = [
    ("sag-x30", 1, SAGITTAL, [30, 0, 0], 3),
    ("sag-x20", 1, SAGITTAL, [20, 0, 0], 1),
    ("sag-x10", 1, SAGITTAL, [10, 0, 0], 2),
    ("sag-nopos-1", 1, None, None, 1),  # no plane: after the positioned ones
    ("ax-z-5", 2, AXIAL, [0, 0, -5], 9),  # InstanceNumber contradicts the position
    ("ax-z0-a", 2, AXIAL, [0, 0, 0], 4),
    ("ax-z0-b", 2, AXIAL, [0, 0, 0], 5),  # same plane: InstanceNumber decides
    ("ax-z7", 2, AXIAL, [0, 0, 7], 1),
]


def _write(folder: Path) -> dict[str, Path]:
    """One real DICOM file per entry of EXPECTED, each with its own pixels."""
    paths = {}
    for k, (name, series, orientation, position, number) in enumerate(EXPECTED):
        pixels = (np.arange(64 * 64).reshape(64, 64) * (k + 1) % 997).astype(np.int16)
        ds = image_dataset(pixels, study_uid=STUDY, series_uid=f"2.25.5150.{series}",
                           sop_uid=f"2.25.5150.{series}.{k}", instance_number=number)
        ds.SeriesNumber = series
        if orientation is not None:
            ds.ImageOrientationPatient = orientation
            ds.ImagePositionPatient = position
        paths[name] = write_dataset(ds, folder / f"{name}.dcm")
    return paths


def _ingest(home: Path, source: dict[str, Path], order: list[str]
            ) -> tuple[list[str], torch.Tensor]:
    """Ingest the files in ``order``; the study's instances as ordered, and its images."""
    settings = Settings(home=home, store=store_settings(home), model=TINY, scope=CT_SCOPE)
    settings.path("inbox").mkdir(parents=True)
    db = store.connect(settings.database())
    ingestor = Ingestor(settings, db, build_metrics(CollectorRegistry()))
    for name in order:
        target = settings.path("inbox") / f"{name}.dcm"
        target.write_bytes(source[name].read_bytes())
        assert ingestor.ingest(ReadyFile(target)) == "archived"
    sops = [row[0] for row in db.execute(
        f"SELECT instances.sop_uid FROM instances ORDER BY {INSTANCE_ORDER}").fetchall()]
    (study_id,) = db.execute("SELECT id FROM studies").fetchone()
    images = load_study_images(db, study_id)
    db.close()
    return sops, images


def test_the_same_instances_arriving_in_two_orders_give_the_same_images_and_scores(
    tmp_path: Path,
) -> None:
    source = _write(tmp_path / "source")
    names = [name for name, *_ in EXPECTED]
    arrival_a = names[::-1]
    arrival_b = [names[i] for i in (4, 0, 6, 2, 7, 3, 5, 1)]
    sops_a, images_a = _ingest(tmp_path / "a", source, arrival_a)
    sops_b, images_b = _ingest(tmp_path / "b", source, arrival_b)
    expected = [f"2.25.5150.{series}.{k}" for k, (_, series, *_) in enumerate(EXPECTED)]
    assert sops_a == sops_b == expected
    assert images_a.shape == (len(EXPECTED), 1, 32, 32)
    assert torch.equal(images_a, images_b)
    # distinct pixels per instance: equal tensors mean the same order, not look-alikes
    assert len({images_a[i].sum().item() for i in range(len(EXPECTED))}) == len(EXPECTED)

    torch.manual_seed(0)
    net, lossnet = build_network(TINY).eval(), build_loss_predictor(TINY).eval()
    result_a = score_study(net, lossnet, images_a, TINY, seed=11)
    result_b = score_study(net, lossnet, images_b, TINY, seed=11)
    assert result_a.num_images == 3  # evenly spaced picks: the same three images
    assert result_a.uncertainty == result_b.uncertainty
    assert result_a.predicted_loss == result_b.predicted_loss


def test_slice_position_reads_enhanced_multiframe_functional_groups() -> None:
    plane = Dataset()
    plane.PlanePositionSequence = [Dataset()]
    plane.PlanePositionSequence[0].ImagePositionPatient = [0, 0, 12.5]
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = AXIAL
    ds = Dataset()
    ds.PerFrameFunctionalGroupsSequence = [plane]
    ds.SharedFunctionalGroupsSequence = [shared]
    assert slice_position(ds) == 12.5
    ds.ImageOrientationPatient = [1, 0, 0, 1, 0, 0]  # degenerate: no plane
    assert slice_position(ds) is None
