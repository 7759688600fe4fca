"""Study view latency: what a reader waits for on each click, for a large CT study.

Writes one CT study of N axial slices (pydicom-generated int16 pixels, two VOI presets
with explanations, descriptions, ImagePositionPatient; files in shuffled order) into a
fresh state directory, ingests them through the real Ingestor, routes the study to the
review queue as the scoring worker stores it, then GETs /api/studies/{id} through the
real FastAPI app (Starlette's TestClient: authentication, the store, the audit row of
each view) R times and reports p50/p95. Also timed once: the first view of the same
study as if it had been stored before migration 8 (every header read from the archive,
as each view did before the cache). Prints one JSON object.

    .venv/bin/python bench/study_view.py                # 600 slices of 512x512
    .venv/bin/python bench/study_view.py --slices 60    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from monai.data import set_track_meta
from prometheus_client import CollectorRegistry

from triage.api.app import create_app
from triage.config import load_settings
from triage.daemon import Daemon
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.review.auth import create_token
from triage.review.queue import enqueue
from triage.store import db as store
from triage.telemetry.metrics import build_metrics

TARGET_P95_MS = 200.0


def write_study(inbox: Path, slices: int, size: int) -> list[Path]:
    """One axial CT series, 1 mm apart, in shuffled arrival order."""
    rng = np.random.default_rng(0)
    study, series = "2.25.61600", "2.25.61600.1"
    base = rng.normal(40, 300, (size, size)).astype(np.int16)
    paths = []
    for k in rng.permutation(slices):
        pixels = np.roll(base, int(k), axis=0)  # distinct slices, cheap to make
        ds = image_dataset(pixels, study_uid=study, series_uid=series,
                           instance_number=int(k) + 1, rescale=(1.0, -1024.0))
        ds.WindowCenter, ds.WindowWidth = [-600.0, 40.0], [1500.0, 400.0]
        ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(k)]
        ds.SeriesNumber = 2
        ds.SeriesDescription = "Thorax 1.0 B70f"
        ds.StudyDescription = "CT THORAX"
        paths.append(write_dataset(ds, inbox / f"{int(k):06d}.dcm"))
    return paths


def route(db, study_id: int) -> None:  # type: ignore[no-untyped-def]
    """A routed decision and its queue item, as the scoring worker stores them."""
    with store.transaction(db):
        result = db.execute("INSERT INTO study_results (study_id, round, status, created_at) "
                            "VALUES (?, 1, 'routed', ?)", [study_id, time.time()]).lastrowid
        decision = db.execute(
            "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
            "strategy, needs_label, reason, combined, decision) "
            "VALUES (?, ?, 1, 1, ?, 'combined', 1, 'uncertainty', 0.9, '{}')",
            [result, study_id, time.time()]).lastrowid
        enqueue(db, study_id=study_id, decision_id=int(decision), reason="uncertainty",
                combined=0.9, now=time.time())


def timed_views(client: TestClient, url: str, headers: dict[str, str],
                requests: int) -> list[float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600, help="instances in the study")
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--requests", type=int, default=50, help="timed views")
    args = parser.parse_args()
    set_track_meta(False)
    torch.set_num_threads(1)  # as the daemon does
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        # fsync off: the ingest is set-up here, not what is measured
        settings = load_settings(None, home=Path(tmp), environ={"TRIAGE__INGEST__FSYNC": "false"})
        started = time.perf_counter()
        paths = write_study(settings.path("inbox"), args.slices, args.size)
        written = time.perf_counter() - started
        db = store.connect(settings.path("database"))
        ingestor = Ingestor(settings, db, build_metrics(CollectorRegistry()))
        started = time.perf_counter()
        states = [ingestor.ingest(ReadyFile(path)) for path in paths]
        ingested = time.perf_counter() - started
        study_id = int(db.execute("SELECT id FROM studies").fetchone()[0])
        route(db, study_id)
        _, token = create_token(db, name="bench", role="radiologist")
        url, headers = f"/api/studies/{study_id}", {"Authorization": f"Bearer {token}"}
        with TestClient(create_app(Daemon(settings))) as client:
            view = client.get(url, headers=headers).json()  # warm-up (imports, caches)
            times = timed_views(client, url, headers, args.requests)
            db.execute("UPDATE instances SET view_cached = 0")  # as stored before step 8
            uncached = timed_views(client, url, headers, 1)[0]
            after = timed_views(client, url, headers, args.requests)
        db.close()
    p95 = percentile(times, 95)
    print(json.dumps({
        "benchmark": "study_view",
        "slices": args.slices,
        "image": f"{args.size}x{args.size} int16 CT, explicit VR little endian",
        "archived": states.count("archived"),
        "images_in_view": len(view["images"]),
        "requests": args.requests,
        "p50_ms": round(percentile(times, 50), 1),
        "p95_ms": round(p95, 1),
        "mean_ms": round(statistics.fmean(times), 1),
        "max_ms": round(max(times), 1),
        "target_p95_ms": TARGET_P95_MS,
        "meets_target": p95 <= TARGET_P95_MS,
        "uncached_first_view_ms": round(uncached, 1),
        "p95_ms_after_refill": round(percentile(after, 95), 1),
        "setup_seconds": {"write": round(written, 1), "ingest": round(ingested, 1)},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2))


if __name__ == "__main__":
    main()
