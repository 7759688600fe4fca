"""Cold start: coverage-chosen against random studies for the first model; prints JSON.

For each seed, the first `--studies` of a shuffled dev `train` stream go through
`ColdStartSelector` at `--rate`, and, separately, through a coin at the same rate. A
model is trained from scratch on each set with the shipped recipe and scored on the dev
`val` split (never the holdout). Reports the class mix of each set, both AUROCs and the
paired difference.

    .venv/bin/python bench/coldstart_picks.py --seeds 0 1 2 3 4 5 \
        --out bench/results/coldstart_picks.json

Arms: `coverage` (the shipped farthest-first selector), `typical` (the same selector
with `gate.cold_start_neighbours` = `--neighbours`, 20 as in TypiClust, not tuned here)
and `random` (a coin). Paired differences carry a 95% t interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.replay.datasets import (  # noqa: E402
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)
from triage.gate.coldstart import ColdStartSelector, coldstart_embedding  # noqa: E402
from triage.model.lossnet import build_loss_predictor  # noqa: E402
from triage.model.network import build_network  # noqa: E402
from triage.model.settings import ModelSettings  # noqa: E402
from triage.model.training import classifier_auroc, fit  # noqa: E402
from triage.training.augment import make_augment  # noqa: E402
from triage.training.settings import RetrainSettings  # noqa: E402


T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}
"""Two-sided 95% t quantiles by degrees of freedom."""


def _train_and_score(x, y, vx, vy, seed: int) -> float:
    settings = ModelSettings(input_size=28)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, lossnet = build_network(settings), build_loss_predictor(settings)
    fit(net, lossnet, x, y, settings.training.model_copy(update={"seed": seed}),
        augment=make_augment(RetrainSettings(), 28))
    with torch.inference_mode():
        return classifier_auroc(torch.softmax(net(vx), 1), vy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--studies", type=int, default=1200)
    parser.add_argument("--rate", type=float, default=0.08)
    parser.add_argument("--neighbours", type=int, default=20,
                        help="k of the typicality-weighted selector (`typical` arm)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dev = load_pneumoniamnist_dev()
    x, y = images_to_tensor(dev["train_images"], 28), labels_to_tensor(dev["train_labels"])
    vx, vy = images_to_tensor(dev["val_images"], 28), labels_to_tensor(dev["val_labels"])
    rows = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(y))[: args.studies]
        picked = {}
        for name, k in (("coverage", 0), ("typical", args.neighbours)):
            selector, picked[name] = ColdStartSelector(args.rate, seed, typical_neighbours=k), []
            for sequence, i in enumerate(order):
                embedding = coldstart_embedding(x[i : i + 1])
                wanted = selector.wants(embedding, sequence)
                selector.commit(embedding, wanted)
                if wanted:
                    picked[name].append(int(i))
        coin = np.random.default_rng(seed + 99).random(len(order)) < args.rate
        random = [int(i) for i in order[coin]]
        row = {"seed": seed}
        for name, picks in (*picked.items(), ("random", random)):
            index = torch.tensor(picks)
            row[name] = {"studies": len(picks),
                         "normal_share": round(1 - float(y[index].float().mean()), 3),
                         "dev_val_auroc": round(_train_and_score(x[index], y[index], vx, vy,
                                                                 seed), 4)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {
        name: {"mean_auroc": round(statistics.fmean(r[name]["dev_val_auroc"] for r in rows), 4),
               "sd_auroc": round(statistics.stdev(r[name]["dev_val_auroc"] for r in rows), 4),
               "normal_share": round(statistics.fmean(r[name]["normal_share"] for r in rows), 3)}
        for name in ("coverage", "typical", "random")
    }
    for a, b in (("coverage", "random"), ("typical", "random"), ("typical", "coverage")):
        diffs = [r[a]["dev_val_auroc"] - r[b]["dev_val_auroc"] for r in rows]
        half = T95[len(diffs) - 1] if len(diffs) - 1 in T95 else 1.96
        summary[f"{a}_minus_{b}"] = {
            "mean": round(statistics.fmean(diffs), 4),
            "ci95_half": round(half * statistics.stdev(diffs) / len(diffs) ** 0.5, 4)}
    report = {"date": datetime.now(UTC).date().isoformat(),
              "command": "bench/coldstart_picks.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
              "studies": args.studies, "rate": args.rate, "neighbours": args.neighbours,
              "summary": summary, "runs": rows,
              "stream_normal_share": round(1 - float(y.float().mean()), 3)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
