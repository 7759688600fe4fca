"""The unlabelled stream: does the shipped recipe gain from the studies nobody labelled?

Issue 22 item 5, measured outside the chain before anything is built into the daemon.
For each seed this bench draws the same `--labels` random dev `train` studies as
`bench/recipe.py` and `bench/ensemble.py` (the bought labels; the rest of dev `train`,
about 4,200 images, is the unlabelled pool the daemon would hold) and trains the shipped
recipe on them: the `teacher`. Every other arm is paired against it on the same labels
and training seed:

- `pseudo@T` (CEAL, Wang et al. 2017): the teacher's eval-mode predictions on the pool
  that reach confidence T join training as pseudo-labels, their class shares capped at
  those of the bought labels (the class-balance guard: a confident majority class
  cannot flood the set); a student is trained from scratch on both. One round only:
  CEAL's tightening threshold needs rounds, which the thresholds stand in for. The
  pseudo-labels' accuracy is reported from the pool's true labels (a diagnostic the
  daemon would not have).
- `consistency*` (FixMatch, Sohn et al. 2020; `triage.model.training.Consistency`):
  trained on the bought labels plus the consistency loss on the pool, where the
  prediction on a weak view (the recipe's shifts) reaching the threshold supervises a
  strong view (`make_strong_augment`: rotation, zoom, stronger contrast, cut-out).
  Variants: the loss's weight, the threshold 0.8, a doubled schedule (against
  `teacher_40epochs`, the same schedule without it), and `consistency_own`, the control:
  the bought labels' own images as the "unlabelled" ones, i.e. the strong views without
  the pool.

- `simclr` (self-supervised pretraining, Chen et al. 2020): before any seed, the
  network's stages and a projection head are pretrained without labels on every dev
  `train` image (the archive the daemon holds; no label is read) with the NT-Xent loss
  (MONAI's `ContrastiveLoss`) between two strong views of each image, for
  `--simclr-epochs` epochs; each seed then trains the shipped recipe from that trunk
  (the classifier's last layer freshly initialised). `lightly` would supply the loss
  and heads, but it requires torchvision, which this environment does not have; the
  loop here is about 30 lines over MONAI's loss.

Arms are scored on dev `val` (where a choice is made) and, as final figures, on the
holdout, which is never used to choose.

    .venv/bin/python bench/unlabelled.py --seeds 0 1 2 3 4 --jobs 2
    .venv/bin/python bench/unlabelled.py --arms simclr --simclr-epochs 40 \
        --out bench/results/unlabelled.simclr.json
"""

from __future__ import annotations

import argparse
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
from recipe import (  # noqa: E402
    arm_settings, bench_meta, probabilities, random_picks, score, train_model, write_result,
)

from triage.model.network import build_network  # noqa: E402
from triage.model.training import Consistency  # noqa: E402
from triage.training.augment import make_strong_augment  # noqa: E402

OUT = REPO / "bench" / "results" / "unlabelled.json"
LONGER = ("model.training.epochs=40", "model.training.min_steps=200")
# name: (kind, options). "pseudo" takes a threshold; "consistency" a weight, threshold,
# own_images and training overrides; "teacher" only overrides. Every arm is paired
# against `teacher` and, with "against", also against that arm.
ARMS: dict[str, tuple[str, dict[str, Any]]] = {
    "pseudo@0.95": ("pseudo", {"threshold": 0.95}),
    "pseudo@0.99": ("pseudo", {"threshold": 0.99}),
    "consistency": ("consistency", {}),
    "consistency@w0.5": ("consistency", {"weight": 0.5}),
    "consistency@w2": ("consistency", {"weight": 2.0}),
    "consistency@t0.8": ("consistency", {"threshold": 0.8}),
    "consistency_own": ("consistency", {"own_images": True}),
    "teacher_40epochs": ("teacher", {"overrides": LONGER}),
    "consistency_40epochs": ("consistency", {"overrides": LONGER,
                                             "against": "teacher_40epochs"}),
    "simclr": ("simclr", {}),
}
SIMCLR_BATCH = 256
SIMCLR_PROJECTION = 64
SIMCLR_TEMPERATURE = 0.5
SIMCLR_LEARNING_RATE = 1e-3
_PRETRAINED: dict[str, torch.Tensor] | None = None


def pretrain_simclr(images: torch.Tensor, epochs: int, seed: int = 0
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """SimCLR on `images` (no labels): the shipped network's stages and pooled features,
    a 2-layer projection head, NT-Xent between two strong views of each image, AdamW
    under a one-cycle schedule. Returns the stages' state dict (without `fc`) and a
    record of the losses and seconds."""
    from monai.losses import ContrastiveLoss
    from torch import nn

    settings = arm_settings((), seed)
    model = settings.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(model)
        width = net.fc.in_features
        head = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, SIMCLR_PROJECTION))
    loss_fn = ContrastiveLoss(temperature=SIMCLR_TEMPERATURE)
    view = make_strong_augment(model.input_size)
    params = [*net.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=SIMCLR_LEARNING_RATE, weight_decay=1e-4)
    steps = epochs * (images.shape[0] // SIMCLR_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, SIMCLR_LEARNING_RATE,
                                                   total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    losses, started = [], time.perf_counter()
    net.train()
    head.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=generator)
            total = 0.0
            for first in range(0, order.shape[0] - SIMCLR_BATCH + 1, SIMCLR_BATCH):
                x = images[order[first:first + SIMCLR_BATCH]]
                a, b = view(x, generator), view(x, generator)
                za = head(net.trunk(a, "head")[0])
                zb = head(net.trunk(b, "head")[0])
                loss = loss_fn(za, zb)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                total += float(loss.detach())
            losses.append(round(total / (images.shape[0] // SIMCLR_BATCH), 4))
    net.eval()
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    return state, {"epochs": epochs, "images": int(images.shape[0]), "losses": losses,
                   "seconds": round(time.perf_counter() - started, 1)}


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


def run_seed(task: tuple[int, tuple[str, ...], int]) -> list[dict[str, Any]]:
    seed, arms, n_labels = task
    torch.set_num_threads(1)
    data = load_data()
    settings = arm_settings((), seed)
    model = settings.model
    picks = random_picks(len(data.stream_labels), seed, n_labels)
    pool = torch.from_numpy(np.setdiff1d(np.arange(len(data.stream_labels)), picks.numpy()))
    x, y = data.stream_images[picks], data.stream_labels[picks]
    pool_images = data.stream_images[pool]
    prior = np.bincount(y.numpy(), minlength=len(model.labels)) / len(y)

    def scored(arm: str, net, seconds: float, **extra: Any) -> dict[str, Any]:
        out = {"arm": arm, "seed": seed, "labels": n_labels, **extra,
               "train_seconds": round(seconds, 1)}
        for split, images, labels in (("val", data.val_images, data.val_labels),
                                      ("holdout", data.holdout_images, data.holdout_labels)):
            out[f"{split}_auroc"], out[f"{split}_accuracy"] = score(net, images, labels)
        return out

    teacher, seconds = train_model(settings, x, y, seed)
    out = [scored("teacher", teacher, seconds)]
    pool_probs = probabilities(teacher, pool_images)
    for arm in arms:
        kind, options = ARMS[arm]
        overrides = options.get("overrides", ())
        settings_of_arm = arm_settings(overrides, seed)

        def train(images: torch.Tensor, labels: torch.Tensor, **fit_options: Any):
            return train_model(settings_of_arm, images, labels, seed, **fit_options)

        if kind == "teacher":
            out.append(scored(arm, *train(x, y), overrides=list(overrides)))
        elif kind == "simclr":
            out.append(scored(arm, *train(x, y, init=_PRETRAINED)))
        elif kind == "pseudo":
            positions, classes = balanced_confident(pool_probs, options["threshold"], prior)
            truth = data.stream_labels[pool][positions].numpy()
            student, seconds = train(torch.cat([x, pool_images[positions]]),
                                     torch.cat([y, torch.from_numpy(classes)]))
            out.append(scored(
                arm, student, seconds, pseudo_labels=len(positions),
                pseudo_label_accuracy=round(float((truth == classes).mean()), 4)
                if len(positions) else None,
                pseudo_class_counts=np.bincount(classes, minlength=len(prior)).tolist()))
        else:
            images = x if options.get("own_images") else pool_images
            consistency = Consistency(images, make_strong_augment(model.input_size),
                                      weight=options.get("weight", 1.0),
                                      threshold=options.get("threshold", 0.95))
            net, seconds = train(x, y, consistency=consistency)
            out.append(scored(arm, net, seconds, overrides=list(overrides),
                              unlabelled_images=int(images.shape[0]),
                              weight=consistency.weight, threshold=consistency.threshold))
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], {})[run["seed"]] = run
    rows = []
    for name, by_seed in by_arm.items():
        row: dict[str, Any] = {"arm": name, "seeds": sorted(by_seed)}
        for metric in ("val_auroc", "val_accuracy", "holdout_auroc", "holdout_accuracy",
                       "pseudo_labels", "pseudo_label_accuracy", "train_seconds"):
            values = [r[metric] for r in by_seed.values() if r.get(metric) is not None]
            if values:
                row[metric] = round(statistics.fmean(values), 4)
        bases = ["teacher"] if name != "teacher" else []
        if name in ARMS and "against" in ARMS[name][1]:
            bases.append(ARMS[name][1]["against"])
        for base in bases:
            for metric in ("val_auroc", "holdout_auroc", "holdout_accuracy"):
                diffs = [by_seed[s][metric] - by_arm[base][s][metric] for s in by_seed
                         if s in by_arm.get(base, {})]
                if len(diffs) > 1:
                    row[f"{metric}_vs_{base}"] = paired(diffs)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                        help="arms beside the teacher (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--labels", type=int, default=469)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--simclr-epochs", type=int, default=40,
                        help="epochs of the label-free pretraining of the `simclr` arm")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tasks = [(seed, tuple(args.arms), args.labels) for seed in args.seeds]
    started = time.time()
    pretraining = None
    if "simclr" in args.arms:  # once, before the workers fork: label-free, seed-independent
        global _PRETRAINED
        torch.set_num_threads(args.jobs)
        _PRETRAINED, pretraining = pretrain_simclr(load_data().stream_images,
                                                   args.simclr_epochs)
        print(f"SimCLR pretraining: {pretraining}", file=sys.stderr, flush=True)
    runs: list[dict[str, Any]] = []
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        for done, out in enumerate(pool.imap_unordered(run_seed, tasks), 1):
            runs.extend(out)
            print(f"[{done}/{len(tasks)}] seed {out[0]['seed']}: "
                  + ", ".join(f"{r['arm']} val {r['val_auroc']:.4f}" for r in out)
                  + f" ({time.time() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
    return write_result(args.out, bench_meta("unlabelled.py", argv, labels=args.labels,
                                              seeds=args.seeds, simclr=pretraining),
                        summarize(runs), sorted(runs, key=lambda r: (r["arm"], r["seed"])))


if __name__ == "__main__":
    raise SystemExit(main())
