"""Wall time of one retrain in 1 and in 2 processes (`retrain.nproc`); prints ONE JSON object.

Each arm is a real run as the daemon starts it: a fresh state directory whose store
holds the same labelled studies (single-image studies of the PneumoniaMNIST dev train
split for training, of dev val for validation; never the holdout) and the same serving
model, then `RetrainScheduler.start` (the worker, under torchrun for nproc > 1) and a
wait for the process to exit. The default model and recipe (`model:` defaults, seed
`--seed`), `retrain.threads` torch threads per process.

The serving model is trained once, in this process, on the first `--serving-share` of
the training studies (no refit), and registered and promoted in each arm's store, so the
candidate is judged against a real model and the decision can go either way.

Reported per arm: `wall_seconds` (start of the process to its exit: interpreter and
torch start-up, the launcher, loading the labels, training, judging, the refit after a
promotion, registration), `run_seconds` (the worker's own count, loading the labels to
deciding), `training_seconds` (the candidate's epochs) and `refit_seconds`, the
candidate's validation AUROC (at its operating point), the decision (`promoted` /
`rejected`) and its message; then whether the arms agree and their AUROC difference.
The arms differ only in dropout masks (each process has its own; one step is the
one-process step otherwise, tests/training/test_distributed_step.py).

    .venv/bin/python bench/retrain_nproc.py [--nproc 1,2] [--train N] [--validation N]
        [--threads N] [--seed N] [--quick] [--out PATH]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.config import Settings  # noqa: E402
from triage.model.checkpoint import save_checkpoint  # noqa: E402
from triage.model.registry import ModelRegistry  # noqa: E402
from triage.model.settings import ModelSettings  # noqa: E402
from triage.replay.datasets import (  # noqa: E402
    find_data_dir,
    images_to_tensor,
    load_pneumoniamnist_dev,
)
from triage.store import db as store  # noqa: E402
from triage.store.images import to_storage  # noqa: E402
from triage.training.dataset import LabeledSet  # noqa: E402
from triage.training.pipeline import train_and_judge  # noqa: E402
from triage.training.runs import last_run  # noqa: E402
from triage.training.scheduler import RetrainScheduler  # noqa: E402
from triage.training.settings import RetrainSettings  # noqa: E402


def pick(data, split, n, seed):
    """`n` random images of a dev split (all when `n` is None) with their labels."""
    labels = data[f"{split}_labels"].reshape(-1)
    order = np.random.default_rng(seed).permutation(len(labels))[:n]
    return data[f"{split}_images"][order], labels[order].astype(np.int64)


def fill(db, images, labels, split, class_names):
    """One single-image study per image, labelled by a radiologist into `split`, with
    the rows ingestion, the gate and the review queue would have written."""
    now = time.time()
    with store.transaction(db):
        token = db.execute("SELECT id FROM tokens WHERE name = 'bench'").fetchone()
        if token is None:
            token = [db.execute("INSERT INTO tokens (name, role, token_hash, created_at) "
                                "VALUES ('bench', 'radiologist', 'hash', 0)").lastrowid]
        start = db.execute("SELECT COUNT(*) FROM studies").fetchone()[0]
        for k, (image, label) in enumerate(zip(images, labels, strict=True)):
            n = start + k + 1
            study = db.execute(
                "INSERT INTO studies (study_uid, state, first_seen_at, last_instance_at, "
                "completed_at, n_instances, n_images, round) VALUES (?, 'scored', ?, ?, ?, 1, 1, "
                "1)", [f"1.2.826.0.2.{n}", now, now, now]).lastrowid
            instance = db.execute(
                "INSERT INTO instances (sop_uid, sha256, study_id, frames, scoreable, path, "
                "created_at) VALUES (?, 'x', ?, 1, 1, 'a.dcm', ?)",
                [f"1.2.826.0.2.{n}.0", study, now]).lastrowid
            db.execute("INSERT INTO images (instance_id, size, frames, data) VALUES (?, ?, 1, ?)",
                       [instance, image.shape[-1], to_storage(image.reshape(1, *image.shape[-2:]))])
            result = db.execute("INSERT INTO study_results (study_id, round, status, created_at) "
                                "VALUES (?, 1, 'routed', ?)", [study, now]).lastrowid
            decision = db.execute(
                "INSERT INTO decisions (result_id, study_id, round, sequence, created_at, "
                "strategy, needs_label, reason, decision) VALUES (?, ?, 1, ?, ?, 'combined', 1, "
                "'audit', '{}')", [result, study, result, now]).lastrowid
            item = db.execute(
                "INSERT INTO queue_items (study_id, decision_id, reason, priority, state, "
                "routed_at) VALUES (?, ?, 'audit', 0.5, 'labeled', ?)",
                [study, decision, now]).lastrowid
            db.execute("INSERT INTO labels (study_id, item_id, label, token_id, role, created_at, "
                       "split) VALUES (?, ?, ?, ?, 'radiologist', ?, ?)",
                       [study, item, class_names[int(label)], token[0], now, split])


def labeled_set(images, labels):
    n = len(labels)
    return LabeledSet(images, torch.as_tensor(labels), torch.arange(n), list(range(n)),
                      list(range(n)), [int(v) for v in labels])


def serving_checkpoint(settings, train, validation, folder):
    """The serving model: trained here on `train`, judged and calibrated on `validation`."""
    alone = settings.model_copy(update={"retrain": settings.retrain.model_copy(
        update={"refit_on_all_labels": False})})
    judged = train_and_judge(train, validation, alone, [])
    return save_checkpoint(folder / "serving.pt", judged.network, judged.loss_predictor,
                           settings.model,
                           metadata={"operating_point": judged.operating_point.to_json()},
                           epistemic=judged.epistemic)


def run_arm(nproc, base, data, serving, home):
    """One retrain with `nproc` processes in a fresh state directory `home`."""
    settings = base.model_copy(update={
        "home": home, "retrain": base.retrain.model_copy(update={"nproc": nproc})})
    names = list(settings.model.labels)
    home.mkdir(parents=True)
    db = store.connect(settings.database())
    try:
        for split, (x, y) in data.items():
            fill(db, x, y, split, names)
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        registry.promote(registry.add(serving, source="import").version)
        scheduler = RetrainScheduler(settings, settings.database())
        started = time.perf_counter()
        run_id = scheduler.start("manual")
        code = scheduler.processes[run_id].wait()
        wall = time.perf_counter() - started
        run = last_run(db)
    finally:
        db.close()
    metrics = run["metrics"] or {}
    epochs = metrics.get("epochs", [])
    log = (settings.path("logs") / "retrain.log").read_text().splitlines()
    refit = [json.loads(line) for line in log if '"retrain_refit"' in line]
    return {
        "nproc": nproc, "exit_code": code, "wall_seconds": round(wall, 2),
        "run_seconds": round(metrics["seconds"], 2) if "seconds" in metrics else None,
        "training_seconds": round(sum(e["seconds"] for e in epochs), 2),
        "refit_seconds": refit[0]["seconds"] if refit else None,
        "epochs": len(epochs), "final_loss": round(epochs[-1]["loss"], 5) if epochs else None,
        "candidate_auroc": (metrics.get("candidate") or {}).get("auroc"),
        "serving_auroc": (metrics.get("champion") or {}).get("auroc"),
        "decision": run["state"], "message": run["message"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", default="1,2", help="process counts to time (default 1,2)")
    parser.add_argument("--train", type=int, default=2000,
                        help="labelled training studies from dev train (default 2000)")
    parser.add_argument("--validation", type=int, default=200,
                        help="validation studies from dev val (default 200)")
    parser.add_argument("--serving-share", type=float, default=0.5,
                        help="share of the training studies the serving model saw")
    parser.add_argument("--threads", type=int, default=1,
                        help="retrain.threads: torch threads per process (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="model.training.seed")
    parser.add_argument("--quick", action="store_true",
                        help="a check that it runs: 300/100 studies at 28 px")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON here (bench/results/retrain_nproc.json)")
    args = parser.parse_args(argv)
    if find_data_dir() is None:
        raise SystemExit("PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place the "
                         "files in ../shared/data (see README, 'Data')")
    counts = [int(v) for v in args.nproc.split(",")]
    model = ModelSettings()
    n_train, n_val = args.train, args.validation
    if args.quick:
        model = model.model_copy(update={"input_size": 28})
        n_train, n_val = 300, 100
    training = model.training.model_copy(update={"seed": args.seed})
    model = model.model_copy(update={"training": training})
    retrain = RetrainSettings(threads=args.threads, min_validation_studies=2,
                              min_train_studies=4)
    dev = load_pneumoniamnist_dev()
    train_x, train_y = pick(dev, "train", n_train, args.seed)
    val_x, val_y = pick(dev, "val", n_val, args.seed)
    size = model.input_size
    train_t, val_t = images_to_tensor(train_x, size), images_to_tensor(val_x, size)
    first = int(round(args.serving_share * len(train_y)))
    base = Settings(home=Path("."), model=model, retrain=retrain)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="retrain_nproc-") as tmp:
        folder = Path(tmp)
        serving = serving_checkpoint(base, labeled_set(train_t[:first], train_y[:first]),
                                     labeled_set(val_t, val_y), folder)
        data = {"train": (train_t, train_y), "validation": (val_t, val_y)}
        arms = [run_arm(k, base, data, serving, folder / f"nproc-{k}") for k in counts]
    aurocs = [arm["candidate_auroc"] for arm in arms]
    report = {
        "benchmark": "retrain_nproc",
        "date": datetime.now(UTC).date().isoformat(),
        "quick": args.quick,
        "data": {"train_studies": len(train_y), "validation_studies": len(val_y),
                 "serving_trained_on": first, "input_size": size, "seed": args.seed,
                 "epochs": training.epochs, "min_steps": training.min_steps,
                 "batch_size": training.batch_size},
        "arms": arms,
        "decisions_agree": len({arm["decision"] for arm in arms}) == 1,
        "auroc_spread": (round(max(aurocs) - min(aurocs), 4)
                         if all(a is not None for a in aurocs) else None),
        "speedup": {f"{arm['nproc']}": round(arms[0]["wall_seconds"] / arm["wall_seconds"], 3)
                    for arm in arms},
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads_per_process": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.machine(),
            "cuda": torch.cuda.is_available(),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
