"""Training noise and ensembles: the shipped recipe trained K times on the same labels.

Issue 22 asks how much of a served model's AUROC is the draw of its training seed, and
whether averaging several networks buys quality worth their cost. For each label seed
this bench draws the same `--labels` random studies of the dev `train` split that
`bench/recipe.py` draws, trains the shipped recipe (config.yaml at the data's native
28 px) from scratch with `--members` training seeds (seed, seed + 1000, ...), and scores
every member and the ensembles of its first k members (mean of the eval-mode class
probabilities) on dev `val` and on the holdout.

It reports, per metric:
- `members`: the mean single network, its spread over training seeds at fixed labels
  (`train_seed_sd`, the mean over label seeds of the sd over members) beside its spread
  over label draws (`label_draw_sd`, the sd over label seeds of member 0);
- `ensemble_k`: the mean of k members, and its paired difference with member 0 over the
  label seeds (mean, 95% CI);
- the cost: training seconds per member and inference milliseconds per study per member.

With `--snapshots` it measures ensembles within one training instead (one network's
training, k weights kept; Huang et al. 2017 "Snapshot ensembles", Izmailov et al. 2018
"Averaging weights leads to wider optima"), per label seed and per schedule of
`SNAPSHOT_ARMS`: the shipped one-cycle schedule with its last 5 epochs kept, and the
`restarts` schedule with 4 cosine cycles and a snapshot at each cycle's end, in the
shipped 20 epochs and in 40. Each arm reports its final network, the mean of its
snapshots' probabilities (`snapshots`, k forward passes per study) and the network with
the snapshots' weights averaged (`swa`, batch-norm statistics recomputed on the training
images: one pass), each paired against the shipped recipe's final network.

The holdout scores the shipped recipe and its ensembles here as final figures; nothing in
this bench is chosen on it (the choice of k would be made on dev val).

    .venv/bin/python bench/ensemble.py --seeds 0 1 2 3 4 --members 5 --jobs 2
    .venv/bin/python bench/ensemble.py --snapshots --seeds 0 1 2 3 4 --jobs 2 \
        --out bench/results/ensemble.snapshots.json
"""

from __future__ import annotations

import argparse
import copy
import math
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
from recipe import (  # noqa: E402
    arm_settings, bench_meta, pool_runs, probabilities, random_picks, train_model, write_result,
)

from triage.model.training import classifier_auroc  # noqa: E402
from triage.training.evaluate import expected_calibration_error  # noqa: E402

OUT = REPO / "bench" / "results" / "ensemble.json"
MEMBER_OFFSET = 1000
SPLITS = ("val", "holdout")
# schedules of one training whose snapshots are kept: overrides, and how many of the
# last epochs (`last`) or which cycle ends (`cycles`) give the snapshots
SNAPSHOT_ARMS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "onecycle_last5": ((), "last", 5),
    "restarts4": (("model.training.schedule=restarts", "model.training.cycles=4"), "cycles", 4),
    "restarts4_40epochs": (("model.training.schedule=restarts", "model.training.cycles=4",
                            "model.training.epochs=40", "model.training.min_steps=200"),
                           "cycles", 4),
}


def train_member(task: tuple[int, int, int]) -> dict[str, Any]:
    """One network of the shipped recipe on the label seed's studies; its probabilities
    of class 1 on dev val and the holdout, and its costs."""
    seed, member, n_labels = task
    torch.set_num_threads(1)
    data = load_data()
    train_seed = seed + member * MEMBER_OFFSET
    settings = arm_settings((), train_seed)
    picks = random_picks(len(data.stream_labels), seed, n_labels)
    net, seconds = train_model(settings, data.stream_images[picks], data.stream_labels[picks],
                               train_seed)
    out: dict[str, Any] = {"seed": seed, "member": member, "train_seed": train_seed,
                           "labels": n_labels, "train_seconds": round(seconds, 2)}
    images = {"val": data.val_images, "holdout": data.holdout_images}
    for split in SPLITS:
        x = images[split]
        started = time.perf_counter()
        probs = probabilities(net, x)
        out[f"{split}_ms_per_study"] = round(1000 * (time.perf_counter() - started)
                                             / x.shape[0], 4)
        out[f"{split}_p1"] = [round(float(p), 6) for p in probs[:, 1]]
    return out


def snapshot_epochs(epochs: int, how: str, k: int) -> list[int]:
    """Indices of the epochs after which a snapshot is kept: the last `k`, or the ends
    of `k` equal cycles (the epoch in which each cycle's last step falls)."""
    if how == "last":
        return list(range(max(0, epochs - k), epochs))
    return sorted({math.ceil((c + 1) * epochs / k) - 1 for c in range(k)})


def train_snapshots(task: tuple[int, str, int]) -> dict[str, Any]:
    """One training of arm `name` on the seed's labels; per snapshot and for their
    weight average, the probabilities of class 1 on dev val and the holdout."""
    from torch.optim.swa_utils import AveragedModel, update_bn

    from triage.model.training import planned_epochs

    seed, name, n_labels = task
    torch.set_num_threads(1)
    overrides, how, k = SNAPSHOT_ARMS[name]
    data = load_data()
    settings = arm_settings(overrides, seed)
    picks = random_picks(len(data.stream_labels), seed, n_labels)
    images, labels = data.stream_images[picks], data.stream_labels[picks]
    keep = set(snapshot_epochs(planned_epochs(n_labels, settings.model.training), how, k))
    states: list[dict[str, torch.Tensor]] = []

    def keep_snapshot(net, epoch: int) -> None:
        if epoch in keep:
            states.append(copy.deepcopy(net.state_dict()))

    net, seconds = train_model(settings, images, labels, seed, after_epoch=keep_snapshot)
    swa = AveragedModel(copy.deepcopy(net))
    for state in states:
        member = copy.deepcopy(net)
        member.load_state_dict(state)
        swa.update_parameters(member)
    update_bn([images[i:i + 256] for i in range(0, images.shape[0], 256)], swa.module)
    swa.module.eval()
    out: dict[str, Any] = {"seed": seed, "arm": name, "labels": n_labels,
                           "snapshot_epochs": sorted(keep), "train_seconds": round(seconds, 2)}
    x = {"val": data.val_images, "holdout": data.holdout_images}
    for split in SPLITS:
        members = []
        for state in states:
            net.load_state_dict(state)
            members.append([round(float(p), 6) for p in probabilities(net, x[split])[:, 1]])
        out[f"{split}_p1_snapshots"] = members
        out[f"{split}_p1_swa"] = [round(float(p), 6)
                                  for p in probabilities(swa.module, x[split])[:, 1]]
    return out


def summarize_snapshots(runs: list[dict[str, Any]], labels: dict[str, np.ndarray]
                        ) -> dict[str, Any]:  # fmt: skip
    """Per arm and split: the final snapshot, the snapshots' ensemble and their weight
    average, each with its paired difference against the shipped recipe's final network
    (`onecycle_last5`'s last snapshot) over the label seeds."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    shipped = by_arm.get("onecycle_last5", {})
    out: dict[str, Any] = {}
    for name, by_seed in by_arm.items():
        seeds = sorted(by_seed)
        row: dict[str, Any] = {"seeds": seeds,
                               "snapshots": len(by_seed[seeds[0]]["holdout_p1_snapshots"]),
                               "train_seconds": round(statistics.fmean(
                                   r["train_seconds"] for r in by_seed.values()), 2)}
        for split in SPLITS:
            y = labels[split]
            models = {
                "final": lambda r, s=split: np.asarray(r[f"{s}_p1_snapshots"][-1]),
                "snapshots": lambda r, s=split: np.mean(r[f"{s}_p1_snapshots"], axis=0),
                "swa": lambda r, s=split: np.asarray(r[f"{s}_p1_swa"]),
            }
            base = {s: _scores(np.asarray(shipped[s][f"{split}_p1_snapshots"][-1]), y)
                    for s in seeds if s in shipped}
            for model, p1 in models.items():
                scores = {s: _scores(p1(by_seed[s]), y) for s in seeds}
                for metric in ("auroc", "accuracy", "ece"):
                    key = f"{split}_{model}_{metric}"
                    row[key] = round(statistics.fmean(v[metric] for v in scores.values()), 4)
                    diffs = [scores[s][metric] - base[s][metric] for s in seeds if s in base]
                    if len(diffs) > 1 and not (name == "onecycle_last5" and model == "final"):
                        row[key + "_vs_shipped"] = paired(diffs)
        out[name] = row
    return out


def _scores(p1: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = np.stack([1 - p1, p1], axis=1)
    return {"auroc": classifier_auroc(torch.from_numpy(probs), torch.from_numpy(labels)),
            "accuracy": float(((p1 >= 0.5).astype(int) == labels).mean()),
            "ece": expected_calibration_error(probs, labels)}


def summarize(runs: list[dict[str, Any]], labels: dict[str, np.ndarray]
              ) -> dict[str, Any]:  # fmt: skip
    by_seed: dict[int, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_seed.setdefault(run["seed"], {})[run["member"]] = run
    seeds = sorted(by_seed)
    members = min(len(m) for m in by_seed.values())
    out: dict[str, Any] = {"seeds": seeds, "members": members}
    for split in SPLITS:
        y = labels[split]
        single = {s: [_scores(np.asarray(by_seed[s][m][f"{split}_p1"]), y)
                      for m in range(members)] for s in seeds}
        row: dict[str, Any] = {}
        for metric in ("auroc", "accuracy", "ece"):
            per_seed_sd = [statistics.stdev([r[metric] for r in single[s]]) for s in seeds]
            row[metric] = {
                "member_mean": round(statistics.fmean(r[metric] for s in seeds
                                                      for r in single[s]), 4),
                "train_seed_sd": round(statistics.fmean(per_seed_sd), 4),
                "label_draw_sd": round(statistics.stdev(single[s][0][metric] for s in seeds), 4)
                if len(seeds) > 1 else None,
            }
            for k in range(2, members + 1):
                ens = {s: _scores(np.mean([by_seed[s][m][f"{split}_p1"] for m in range(k)],
                                          axis=0), y)[metric] for s in seeds}
                row[metric][f"ensemble_{k}"] = round(statistics.fmean(ens.values()), 4)
                if len(seeds) > 1:
                    row[metric][f"ensemble_{k}_vs_member0"] = paired(
                        [ens[s] - single[s][0][metric] for s in seeds])
        out[split] = row
    out["train_seconds_per_member"] = round(statistics.fmean(r["train_seconds"] for r in runs), 2)
    out["inference_ms_per_study_per_member"] = round(statistics.fmean(
        r["holdout_ms_per_study"] for r in runs), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--labels", type=int, default=469)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--snapshots", nargs="*", default=None, choices=list(SNAPSHOT_ARMS),
                        metavar="ARM", help="ensembles within one training instead: these "
                        "arms of SNAPSHOT_ARMS (none named: all)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.snapshots is not None:
        return snapshots_main(args, argv)
    if args.members < 2:
        parser.error("--members must be at least 2")
    tasks = [(seed, member, args.labels) for seed in args.seeds for member in range(args.members)]
    runs = pool_runs(train_member, tasks, args.jobs,
                     lambda r: f"seed {r['seed']} member {r['member']}: {r['train_seconds']} s")
    data = load_data()
    labels = {"val": data.val_labels.numpy(), "holdout": data.holdout_labels.numpy()}
    return write_result(args.out, bench_meta("ensemble.py", argv, labels=args.labels),
                        summarize(runs, labels),
                        sorted(runs, key=lambda r: (r["seed"], r["member"])))


def snapshots_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    arms = args.snapshots or list(SNAPSHOT_ARMS)
    if "onecycle_last5" not in arms:
        arms.insert(0, "onecycle_last5")  # the shipped recipe: what every arm is paired with
    tasks = [(seed, name, args.labels) for seed in args.seeds for name in arms]
    runs = pool_runs(train_snapshots, tasks, args.jobs,
                     lambda r: f"seed {r['seed']} {r['arm']}: {r['train_seconds']} s")
    data = load_data()
    labels = {"val": data.val_labels.numpy(), "holdout": data.holdout_labels.numpy()}
    return write_result(args.out, bench_meta("ensemble.py", argv, labels=args.labels),
                        summarize_snapshots(runs, labels),
                        sorted(runs, key=lambda r: (r["arm"], r["seed"])))


if __name__ == "__main__":
    raise SystemExit(main())
