"""The training recipe on its own: one model trained from scratch on random labels.

The served model's quality rests first on its network and training recipe. This bench
takes the chain (gate, splits, retrain trigger, promotion) out: for each seed it draws
`--labels` random studies of the dev `train` split (the same draws for every arm), trains
one model from scratch with each arm's settings (config.yaml plus the arm's overrides,
at the data's native 28 px, as `bench/label_efficiency.py` does) and scores it on dev
`val`. Arms are chosen on dev val; the holdout scores only the arms named with
`--holdout` (the shipped recipe and the one it replaced), never to choose.

Every arm is paired against `base` on the same seeds (same labels, same initialisation
seed); `base@seed+1000` is `base` trained with other training seeds on the same labels:
the null, the spread a recipe change must beat.

    .venv/bin/python bench/recipe.py --seeds 0 1 2 3 4 --jobs 2
    .venv/bin/python bench/recipe.py --arms base stem1 --holdout base stem1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from label_efficiency import load_data, paired  # noqa: E402

from triage.config import load_settings, override_environ  # noqa: E402
from triage.model.lossnet import build_loss_predictor  # noqa: E402
from triage.model.network import build_network  # noqa: E402
from triage.model.training import classifier_auroc, fit  # noqa: E402
from triage.replay.lockstep import RunSpec, run_settings  # noqa: E402
from triage.training.augment import make_augment  # noqa: E402
from triage.training.evaluate import study_probabilities  # noqa: E402

OUT = REPO / "bench" / "results" / "recipe.json"
NULL_OFFSET = 1000
ARMS: dict[str, tuple[str, ...]] = {
    "base": (),
    # the first stage keeps the full 28 px (no downsampling before features exist)
    "stem1": ("model.strides=[1, 2, 2, 2]",),
    # dropout only before the head, none inside the stages
    "stem1_noblockdrop": ("model.strides=[1, 2, 2, 2]", "model.block_dropout=0.0"),
    # the loss predictor never sends its gradient into the trunk
    "stem1_detached": ("model.strides=[1, 2, 2, 2]", "model.training.detach_after_fraction=0"),
    # no augmentation (nothing blurred; also nothing varied)
    "stem1_noaugment": ("model.strides=[1, 2, 2, 2]", "retrain.augment=false"),
    # augmentation without resampling blur: integer shifts and intensity only
    "stem1_shiftonly": ("model.strides=[1, 2, 2, 2]", "retrain.rotate_degrees=0",
                        "retrain.zoom=0"),
    "stem1_60epochs": ("model.strides=[1, 2, 2, 2]", "model.training.epochs=60"),
    # the loss predictor's gradient kept out of the trunk, at the old stride-2 stem
    "detached": ("model.training.detach_after_fraction=0",),
    # the three changes that measured best alone, together
    "stem1_detached_shiftonly": ("model.strides=[1, 2, 2, 2]",
                                 "model.training.detach_after_fraction=0",
                                 "retrain.rotate_degrees=0", "retrain.zoom=0"),
    "detached_shiftonly": ("model.training.detach_after_fraction=0", "retrain.rotate_degrees=0",
                           "retrain.zoom=0"),
    # the schedule's length (20 epochs and 100 steps shipped since 2026-12-03; arms
    # relative to config.yaml, so `base` is today's shipped recipe)
    "epochs30": ("model.training.epochs=30", "model.training.min_steps=150"),
    "epochs15": ("model.training.epochs=15", "model.training.min_steps=75"),
    # three stages (about 100k parameters, the size of a plain 3-layer CNN)
    "stem1_small": ("model.channels=[16, 32, 64]", "model.strides=[1, 2, 2]"),
}


def arm_settings(overrides: tuple[str, ...], seed: int):
    """config.yaml with an arm's overrides, as a 10% lockstep run of `seed` reads it (the
    settings of recipe.py, ensemble.py and unlabelled.py)."""
    base = load_settings(REPO / "config.yaml", environ=override_environ(overrides))
    return run_settings(base, RunSpec("uniform", 0.1, "default", seed))


def random_picks(n_stream: int, seed: int, n_labels: int) -> torch.Tensor:
    """The seed's `n_labels` random positions of the dev train split, sorted (the same
    draws in recipe.py, ensemble.py and unlabelled.py)."""
    return torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(n_stream)[:n_labels]))


def train_model(settings, images: torch.Tensor, labels: torch.Tensor, train_seed: int,
                after_epoch=None, init=None, **fit_options: Any):
    """One network of `settings`' recipe trained from scratch (`fit_options` go to `fit`,
    e.g. unlabelled images; `after_epoch(net, epoch)` is called after each epoch, e.g.
    to keep snapshots; `init`: a state dict of the network's stages loaded over the
    random initialisation, e.g. a pretrained trunk); (network, seconds)."""
    model = settings.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_seed)
        net, loss_predictor = build_network(model), build_loss_predictor(model)
    if init is not None:
        missing, unexpected = net.load_state_dict(init, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"init must hold the network's stages: missing {missing}, "
                             f"unexpected {unexpected}")
    if after_epoch is not None:
        fit_options["on_epoch_end"] = lambda epoch, _record: after_epoch(net, epoch)
    started = time.perf_counter()
    fit(net, loss_predictor, images, labels, model.training,
        augment=make_augment(settings.retrain, model.input_size), **fit_options)
    return net, time.perf_counter() - started


def probabilities(net, images: torch.Tensor) -> torch.Tensor:
    """Eval-mode class probabilities [N, C] of single-image studies `images`."""
    return study_probabilities(net, images, torch.arange(images.shape[0]), images.shape[0])


def score(net, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(AUROC, argmax accuracy) of `net` on single-image studies."""
    probs = probabilities(net, images)
    return classifier_auroc(probs, labels), float((probs.argmax(1) == labels).float().mean())


def bench_meta(script: str, argv: list[str] | None, **extra: Any) -> dict[str, Any]:
    """The `meta` object of a bench's JSON: date, machine, command line."""
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, "
                       f"torch {torch.__version__} (CPU, 1 thread per run)",
            "command": f"bench/{script} " + " ".join(argv if argv is not None
                                                    else sys.argv[1:]),
            **extra}


def write_result(out: Path, meta: dict[str, Any], summary: Any, runs: list[dict[str, Any]]
                 ) -> int:  # fmt: skip
    """Write a bench's JSON (meta, summary, runs) to `out`, print its summary; 0."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


def pool_runs(function, tasks: list, jobs: int, describe) -> list[dict[str, Any]]:
    """`function` over `tasks` in `jobs` forked processes; each result as it finishes,
    with `describe(result)` printed to stderr beside the elapsed time."""
    started = time.time()
    runs = []
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        for done, run in enumerate(pool.imap_unordered(function, tasks), 1):
            runs.append(run)
            print(f"[{done}/{len(tasks)}] {describe(run)} ({time.time() - started:.0f} s "
                  "elapsed)", file=sys.stderr, flush=True)
    return runs


def train_one(task: tuple[str, tuple[str, ...], int, int, int, bool]) -> dict[str, Any]:
    """Train arm `name` on the seed's labels; scores on dev val (and the holdout)."""
    name, overrides, seed, train_seed, n_labels, holdout = task
    torch.set_num_threads(1)
    data = load_data()
    settings = arm_settings(overrides, train_seed)
    picks = random_picks(len(data.stream_labels), seed, n_labels)
    net, seconds = train_model(settings, data.stream_images[picks], data.stream_labels[picks],
                               train_seed)

    val_auroc, val_accuracy = score(net, data.val_images, data.val_labels)
    out = {"arm": name, "overrides": list(overrides), "seed": seed, "train_seed": train_seed,
           "labels": n_labels, "val_auroc": val_auroc, "val_accuracy": val_accuracy,
           "train_seconds": round(seconds, 2),
           "parameters": sum(p.numel() for p in net.parameters())}
    if holdout:
        out["holdout_auroc"], out["holdout_accuracy"] = score(net, data.holdout_images,
                                                              data.holdout_labels)
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: mean and sd over seeds, and the paired difference against `base`."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    base = by_arm.get("base", {})
    rows = []
    for name, by_seed in by_arm.items():
        row: dict[str, Any] = {"arm": name, "overrides": next(iter(by_seed.values()))["overrides"],
                               "seeds": sorted(by_seed)}
        for metric in ("val_auroc", "val_accuracy", "holdout_auroc", "holdout_accuracy",
                       "train_seconds"):
            values = [r[metric] for r in by_seed.values() if metric in r]
            if values:
                row[metric] = round(statistics.fmean(values), 4)
                row[metric + "_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 \
                    else None
        if name != "base":
            for metric in ("val_auroc", "holdout_auroc"):
                diffs = [by_seed[s][metric] - base[s][metric] for s in by_seed
                         if s in base and metric in by_seed[s] and metric in base[s]]
                if len(diffs) > 1:
                    row[f"{metric}_vs_base"] = paired(diffs)
        row["parameters"] = next(iter(by_seed.values()))["parameters"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--labels", type=int, default=469, help="random labels per seed "
                        "(469: a 10%% budget of the 4,690-study stream)")
    parser.add_argument("--holdout", nargs="*", default=[], choices=list(ARMS),
                        help="arms also scored on the holdout (final figures only)")
    parser.add_argument("--no-null", action="store_true",
                        help="skip base@seed+1000 (base with other training seeds)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if "base" not in args.arms:
        args.arms.insert(0, "base")
    tasks = [(name, ARMS[name], seed, seed, args.labels, name in args.holdout)
             for seed in args.seeds for name in args.arms]
    if not args.no_null:
        tasks += [(f"base@seed+{NULL_OFFSET}", (), seed, seed + NULL_OFFSET, args.labels,
                   "base" in args.holdout) for seed in args.seeds]
    runs = pool_runs(train_one, tasks, args.jobs,
                     lambda r: f"{r['arm']} seed {r['seed']}: val AUROC {r['val_auroc']:.4f}, "
                               f"{r['train_seconds']} s")
    return write_result(args.out, bench_meta("recipe.py", argv, labels=args.labels,
                                              seeds=args.seeds),
                        summarize(runs), sorted(runs, key=lambda r: (r["arm"], r["seed"])))


if __name__ == "__main__":
    raise SystemExit(main())
