"""Ingestion throughput: read, decode, preprocess and store, no model.

Writes N single-frame 512x512 CT instances (int16, random anatomy-like noise) into a
fresh state directory, then ingests them one by one through the real Ingestor (SHA-256,
pydicom parse and pixel decode, MONAI preprocessing, file move with fsync, SQLite
transaction, or PostgreSQL's with ``--store-url``). The watcher's settle delays are
latency, not throughput, so files are handed over directly. Prints one JSON object.

    .venv/bin/python bench/ingest.py --n 500
    .venv/bin/python bench/ingest.py --n 500 --store-url postgresql://triage@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import set_track_meta
from prometheus_client import CollectorRegistry

from triage.config import load_settings
from triage.ingest.ingestor import Ingestor
from triage.ingest.watcher import ReadyFile
from triage.replay.dicom_writer import image_dataset, write_dataset
from triage.store import db as store
from triage.telemetry.metrics import build_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="instances to ingest")
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    parser.add_argument("--no-fsync", action="store_true", help="skip fsync of moves")
    parser.add_argument("--store-url", default=None,
                        help="a PostgreSQL database (empty or triage's) instead of SQLite")
    args = parser.parse_args()
    set_track_meta(False)
    torch.set_num_threads(1)  # as the daemon's ingest thread does
    with tempfile.TemporaryDirectory(prefix="triage-bench-") as tmp:
        home = Path(tmp)
        # Any modality in scope: these CT instances are decoded and preprocessed, not
        # archived unscored as out of the shipped chest-radiograph scope.
        env = {"TRIAGE__SCOPE__MODALITIES": "[]", "TRIAGE__SCOPE__BODY_PARTS": "[]"}
        if args.no_fsync:
            env["TRIAGE__INGEST__FSYNC"] = "false"
        if args.store_url:
            env["TRIAGE__STORE__URL"] = args.store_url
        settings = load_settings(None, home=home, environ=env)
        inbox = settings.path("inbox")
        rng = np.random.default_rng(0)
        study = None
        paths = []
        for i in range(args.n):
            if i % 50 == 0:
                study = f"2.25.{rng.integers(1, 2**62)}"
            pixels = (rng.normal(40, 300, (args.size, args.size))).astype(np.int16)
            ds = image_dataset(pixels, study_uid=study, instance_number=i + 1,
                               window=(40.0, 400.0), rescale=(1.0, -1024.0))
            paths.append(write_dataset(ds, inbox / f"{i:06d}.dcm"))
        db = store.connect(settings.database())
        ingestor = Ingestor(settings, db, build_metrics(CollectorRegistry()))
        started = time.perf_counter()
        states = [ingestor.ingest(ReadyFile(path)) for path in paths]
        elapsed = time.perf_counter() - started
        db.close()
    print(json.dumps({
        "benchmark": "ingest",
        "instances": args.n,
        "image": f"{args.size}x{args.size} int16 CT, explicit VR little endian",
        "fsync": not args.no_fsync,
        "store": "postgresql" if args.store_url else "sqlite",
        "archived": states.count("archived"),
        "states": {state: states.count(state) for state in sorted(set(states))},
        "seconds": round(elapsed, 3),
        "instances_per_second": round(args.n / elapsed, 1),
        "target_instances_per_second": 100,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }, indent=2))


if __name__ == "__main__":
    main()
