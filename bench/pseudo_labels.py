"""Pseudo-labels from the unlabelled pool: does the shipped recipe gain from them?

Issue 22 item 5(a), measured outside the chain before anything is built into the daemon:
CEAL (Wang et al., 2017) lets a model's confident predictions on unlabelled studies join
training as pseudo-labels. For each seed this bench draws the same `--labels` random dev
`train` studies as `bench/recipe.py` and `bench/ensemble.py`, trains the shipped recipe
(the teacher), pseudo-labels the rest of dev `train` (about 4,200 images the daemon would
hold unlabelled) where the teacher's eval-mode confidence reaches each threshold, keeps
their class shares at most those of the bought labels (the class-balance guard: a
confident majority class cannot flood the set), and trains a student from scratch, same
recipe and training seed, on bought labels plus pseudo-labels. Teacher and student are
scored on dev `val` (where the choice is made) and, as final figures, on the holdout.
The pseudo-labels' own accuracy is reported from the pool's true labels (a diagnostic
the daemon would not have). One round only: CEAL's tightening threshold needs rounds,
which the thresholds stand in for here.

    .venv/bin/python bench/pseudo_labels.py --seeds 0 1 2 3 4 --thresholds 0.95 0.99 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from label_efficiency import load_data, paired  # noqa: E402
from recipe import bench_meta, random_picks, train_model  # noqa: E402

from triage.config import load_settings  # noqa: E402
from triage.model.training import classifier_auroc  # noqa: E402
from triage.replay.lockstep import RunSpec, run_settings  # noqa: E402
from triage.training.evaluate import study_probabilities  # noqa: E402

OUT = REPO / "bench" / "results" / "pseudo_labels.json"


def balanced_confident(probs: torch.Tensor, threshold: float, prior: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Pool positions and classes of the pseudo-labels: confidence >= threshold, the most
    confident first within each class, each class's share at most `prior`'s."""
    confidence, predicted = probs.max(dim=1)
    confidence, predicted = confidence.numpy(), predicted.numpy()
    keep = confidence >= threshold
    counts = np.array([int((keep & (predicted == c)).sum()) for c in range(len(prior))])
    total = min(counts[c] / prior[c] for c in range(len(prior)) if prior[c] > 0)
    chosen = []
    for c in range(len(prior)):
        mine = np.flatnonzero(keep & (predicted == c))
        mine = mine[np.argsort(-confidence[mine], kind="stable")]
        chosen.append(mine[: int(np.floor(total * prior[c]))])
    positions = np.sort(np.concatenate(chosen)).astype(np.int64)
    return positions, predicted[positions]


def run_seed(task: tuple[int, tuple[float, ...], int]) -> list[dict[str, Any]]:
    seed, thresholds, n_labels = task
    torch.set_num_threads(1)
    data = load_data()
    settings = run_settings(load_settings(REPO / "config.yaml", environ={}),
                            RunSpec("uniform", 0.1, "default", seed))
    model = settings.model
    picks = random_picks(len(data.stream_labels), seed, n_labels)
    pool = torch.from_numpy(np.setdiff1d(np.arange(len(data.stream_labels)), picks.numpy()))
    x, y = data.stream_images[picks], data.stream_labels[picks]
    prior = np.bincount(y.numpy(), minlength=len(model.labels)) / len(y)

    def train(images: torch.Tensor, labels: torch.Tensor):
        return train_model(settings, images, labels, seed)

    def probs(net, images: torch.Tensor) -> torch.Tensor:
        return study_probabilities(net, images, torch.arange(images.shape[0]), images.shape[0])

    def scores(net) -> dict[str, float]:
        return {"val_auroc": classifier_auroc(probs(net, data.val_images), data.val_labels),
                "holdout_auroc": classifier_auroc(probs(net, data.holdout_images),
                                                  data.holdout_labels)}

    teacher, seconds = train(x, y)
    out = [{"arm": "teacher", "seed": seed, "labels": n_labels, "pseudo_labels": 0,
            "train_seconds": round(seconds, 1), **scores(teacher)}]
    pool_probs = probs(teacher, data.stream_images[pool])
    for threshold in thresholds:
        positions, classes = balanced_confident(pool_probs, threshold, prior)
        truth = data.stream_labels[pool][positions].numpy()
        student, seconds = train(torch.cat([x, data.stream_images[pool][positions]]),
                                 torch.cat([y, torch.from_numpy(classes)]))
        out.append({"arm": f"pseudo@{threshold:g}", "seed": seed, "labels": n_labels,
                    "pseudo_labels": len(positions),
                    "pseudo_label_accuracy": round(float((truth == classes).mean()), 4)
                    if len(positions) else None,
                    "pseudo_class_counts": np.bincount(classes, minlength=len(prior)).tolist(),
                    "train_seconds": round(seconds, 1), **scores(student)})
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    teacher = by_arm["teacher"]
    rows = []
    for name, by_seed in by_arm.items():
        row: dict[str, Any] = {"arm": name, "seeds": sorted(by_seed)}
        for metric in ("val_auroc", "holdout_auroc", "pseudo_labels", "pseudo_label_accuracy",
                       "train_seconds"):
            values = [r[metric] for r in by_seed.values() if r.get(metric) is not None]
            if values:
                row[metric] = round(statistics.fmean(values), 4)
        if name != "teacher":
            for metric in ("val_auroc", "holdout_auroc"):
                diffs = [by_seed[s][metric] - teacher[s][metric] for s in by_seed]
                if len(diffs) > 1:
                    row[f"{metric}_vs_teacher"] = paired(diffs)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.99])
    parser.add_argument("--labels", type=int, default=469)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if not all(0.5 < t < 1 for t in args.thresholds):
        parser.error("--thresholds must lie in (0.5, 1)")
    tasks = [(seed, tuple(args.thresholds), args.labels) for seed in args.seeds]
    started = time.time()
    runs: list[dict[str, Any]] = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for done, out in enumerate(pool.imap_unordered(run_seed, tasks), 1):
            runs.extend(out)
            print(f"[{done}/{len(tasks)}] seed {out[0]['seed']}: "
                  + ", ".join(f"{r['arm']} val {r['val_auroc']:.4f}" for r in out)
                  + f" ({time.time() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
    result = {
        "meta": bench_meta("pseudo_labels.py", argv, labels=args.labels),
        "summary": summarize(runs),
        "runs": sorted(runs, key=lambda r: (r["arm"], r["seed"])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
