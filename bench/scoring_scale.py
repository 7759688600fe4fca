"""Decisions per second: one SQLite daemon, and one and two scoring replicas on PostgreSQL.

    .venv/bin/python bench/scoring_scale.py                 # 5,000 studies, three set-ups
    .venv/bin/python bench/scoring_scale.py --n 500 --paced 100 --out /tmp/scale.json

For each set-up, a fresh store gets ``--n`` single-image studies (64x64, smooth random
images, the shipped model's input) and ``--paced`` more, stored as ingestion leaves
them (study, instance, preprocessed image), and the shipped model with random weights
is promoted. Then real ``triage serve --roles score`` processes score them (the
shipped configuration: MC dropout with 20 samples, loss predictor, the gate), and the
bench reads what they stored:

* throughput: the ``--n`` studies are completed at once; decisions per second is ``n``
  over the time from then to the last decision;
* latency: the ``--paced`` studies are then completed one every ``1 / --rate`` seconds
  (10 per second: 36,000 images an hour); the p50/p95 of (decision time - completion
  time).

Set-ups: ``sqlite``: one daemon on its SQLite file (the default); ``postgres-1`` and
``postgres-2``: one and two daemons on one PostgreSQL database (a private server,
tests/pg_server.py, fsync on). Each daemon scores with one torch thread, as the daemon
always does. Writes ``bench/results/scoring_scale.json`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from conftest import DaemonProcess  # noqa: E402
from pg_server import PostgresServer, missing_reason  # noqa: E402

from triage.config import load_settings  # noqa: E402
from triage.model.checkpoint import save_checkpoint  # noqa: E402
from triage.model.lossnet import build_loss_predictor  # noqa: E402
from triage.model.network import build_network  # noqa: E402
from triage.model.registry import ModelRegistry  # noqa: E402
from triage.store import db as store  # noqa: E402
from triage.store.images import to_storage  # noqa: E402

ENV = {"TRIAGE__REPLICA__ROLES": "[score]", "TRIAGE__RETRAIN__ENABLED": "false",
       "TRIAGE__GATE__DAILY_CAP": "100000"}


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth random images in [0, 1]: low-frequency noise, upsampled."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 1, 8, 8), dtype=np.float32))
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=False)
    return fine.numpy()


def _fill(target: Path | str, images: np.ndarray) -> list[int]:
    """Store one `open` study per image as ingestion leaves it; their ids."""
    db = store.connect(target)
    ids = []
    now = time.time()
    try:
        with store.transaction(db):
            for k, image in enumerate(images):
                study = db.execute(
                    "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, "
                    "n_instances, n_images, round) VALUES (?, 'open', ?, ?, 1, 1, 1)",
                    [f"2.25.{800000 + k}", now, now]).lastrowid
                instance = db.execute(
                    "INSERT INTO instances (sop_uid, sha256, study_id, frames, scoreable, "
                    "path, created_at) VALUES (?, 'x', ?, 1, 1, 'x.dcm', ?)",
                    [f"2.25.{800000 + k}.1", study, now]).lastrowid
                db.execute("INSERT INTO images (instance_id, size, frames, data) "
                           "VALUES (?, ?, 1, ?)",
                           [instance, image.shape[-1], to_storage(torch.from_numpy(image[0]))])
                ids.append(int(study))
    finally:
        db.close()
    return ids


def _promote(target: Path | str, home: Path, env: dict[str, str]) -> None:
    settings = load_settings(REPO / "config.yaml", home=home, environ={**os.environ, **env})
    torch.manual_seed(0)
    path = save_checkpoint(home.parent / "model.pt", build_network(settings.model),
                           build_loss_predictor(settings.model), settings.model)
    db = store.connect(target)
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        registry.promote(registry.add(path, source="import:bench").version, note="bench")
    finally:
        db.close()


def _complete(target: Path | str, ids: list[int]) -> float:
    db = store.connect(target)
    try:
        now = time.time()
        marks = ", ".join("?" * len(ids))
        with store.transaction(db):
            db.execute(f"UPDATE studies SET state = 'complete', completed_at = ? "
                       f"WHERE id IN ({marks})", [now, *ids])
        store.notify(db)
        return now
    finally:
        db.close()


def _decided(target: Path | str, ids: list[int]) -> list[tuple[float, float, str]]:
    db = store.connect(target, readonly=True)
    try:
        marks = ", ".join("?" * len(ids))
        return db.execute(
            "SELECT d.created_at, s.completed_at, s.claimed_by FROM decisions d JOIN studies s "
            f"ON s.id = d.study_id WHERE d.study_id IN ({marks})", ids).fetchall()
    finally:
        db.close()


def _wait(target: Path | str, ids: list[int], timeout: float) -> list[tuple[float, float, str]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _decided(target, ids)
        if len(rows) >= len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def run_setup(name: str, replicas: int, target: Path | str, workdir: Path,
              n: int, paced: int, rate: float) -> dict:
    shared = workdir / "shared"
    homes = [workdir / f"home{i}" for i in range(replicas)]
    env = {**ENV, **({"TRIAGE__STORE__URL": str(target)} if isinstance(target, str) else {}),
           "TRIAGE__PATHS__MODELS": str(shared / "models")}
    homes[0].mkdir(parents=True)
    ids = _fill(target, _images(n + paced, 64, seed=1))
    _promote(target, homes[0], env)
    procs = [DaemonProcess(home, {**env, "TRIAGE__REPLICA__NAME": f"{name}-{i}"}, [])
             for i, home in enumerate(homes)]
    try:
        for proc in procs:
            proc.start()
        time.sleep(2.0)  # the model loaded, the loops idle
        burst, later = ids[:n], ids[n:]
        started = _complete(target, burst)
        rows = _wait(target, burst, timeout=3600)
        last = max(created for created, _, _ in rows)
        seconds = last - started
        by_replica: dict[str, int] = {}
        for _, _, who in rows:
            by_replica[who] = by_replica.get(who, 0) + 1
        started_paced = time.time()
        for k, study_id in enumerate(later):  # paced arrivals
            wait = started_paced + k / rate - time.time()
            if wait > 0:
                time.sleep(wait)
            _complete(target, [study_id])
        paced_rows = _wait(target, later, timeout=600)
        latency = np.array([created - completed for created, completed, _ in paced_rows])
        paced_seconds = max(c for c, _, _ in paced_rows) - started_paced if paced_rows else None
    finally:
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop(signal.SIGTERM)
    return {
        "setup": name, "replicas": replicas, "store": "sqlite" if replicas == 1 and not
        isinstance(target, str) else "postgresql",
        "studies": n, "decided": len(rows), "seconds": round(seconds, 2),
        "decisions_per_second": round(len(rows) / seconds, 2),
        "by_replica": by_replica,
        "paced": {"studies": paced, "rate_per_second": rate, "decided": len(paced_rows),
                  "latency_p50_s": round(float(np.percentile(latency, 50)), 3)
                  if len(latency) else None,
                  "latency_p95_s": round(float(np.percentile(latency, 95)), 3)
                  if len(latency) else None,
                  "latency_max_s": round(float(latency.max()), 3) if len(latency) else None,
                  "seconds": None if paced_seconds is None else round(paced_seconds, 1)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="studies completed at once")
    parser.add_argument("--paced", type=int, default=500, help="studies completed one by one")
    parser.add_argument("--rate", type=float, default=10.0, help="paced studies per second")
    parser.add_argument("--setups", default="sqlite,postgres-1,postgres-2")
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/scoring_scale.json")
    args = parser.parse_args()
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    root = Path(tempfile.mkdtemp(prefix="triage-scale-"))
    server = None
    results = []
    started = time.monotonic()
    try:
        for name in setups:
            workdir = root / name
            if name == "sqlite":
                target: Path | str = workdir / "home0" / "triage.db"
                replicas = 1
            else:
                if server is None:
                    reason = missing_reason()
                    if reason is not None:
                        print(f"scoring_scale: {reason}", file=sys.stderr)
                        return 2
                    server = PostgresServer(fsync=True).start()
                target = server.new_database()
                replicas = int(name.split("-")[1])
            results.append(run_setup(name, replicas, target, workdir, args.n, args.paced,
                                     args.rate))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "command": "python bench/scoring_scale.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count()},
        "setups": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
