"""Label efficiency: the same replayed stream and budget under each gate strategy.

Runs ``triage replay --spawn`` once per (strategy, seed) on the PneumoniaMNIST dev
train stream, each on a fresh state directory with the shipped config.yaml and the
same budget (gate.label_rate, a daily cap that does not bind), then reads each
report.json. The comparison figure is the AUROC of the final serving model on the dev
``val`` split (a fixed set the models never train on); the holdout AUROC of each final
model is measured once at the end, for the reported figure only. Prints one JSON
object and writes a Markdown table.

    .venv/bin/python bench/replay_compare.py --n 2000 --seeds 0 1 --out bench/results/compare
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "random": ["--strategy", "random", "--coverage", "off"],
    "entropy": ["--strategy", "entropy", "--coverage", "off"],
    "bald": ["--strategy", "bald", "--coverage", "off"],
    "predicted_loss": ["--strategy", "predicted_loss", "--coverage", "off"],
    "combined": ["--strategy", "combined", "--coverage", "off"],
    "combined+coverage": ["--strategy", "combined", "--coverage", "on"],
}


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    report = args.out / f"{name}-s{seed}"
    command = [
        sys.executable, "-m", "triage", "replay", "--spawn", "--config",
        str(REPO / "config.yaml"), *CONFIGS[name], "--set", "gate.daily_cap=100000",
        "--set", f"gate.label_rate={args.label_rate}", "--set", f"gate.seed={seed}",
        "--n", str(args.n), "--rate", str(args.rate), "--order", args.order,
        "--seed", str(seed), "--report", str(report), "--no-progress", "--holdout-eval",
        "--timeout", str(args.timeout),
    ]
    started = time.monotonic()
    existing = report / "report.json"
    if args.reuse and existing.exists() and json.loads(existing.read_text()).get("completed"):
        done = subprocess.CompletedProcess(command, 0)  # measured before: read it again
    else:
        done = subprocess.run(command, capture_output=True, text=True)
    data = json.loads(existing.read_text()) if existing.exists() else {}
    curve = data.get("learning_curve") or [{}]
    final = curve[-1]
    routing = data.get("routing", {})
    return {
        "config": name, "seed": seed, "exit": done.returncode,
        "seconds": data.get("seconds", round(time.monotonic() - started, 1)),
        "completed": data.get("completed"),
        "labels": routing.get("stored_labels"),
        "routed_fraction": routing.get("queued_fraction"),
        "retrains": len([p for p in curve if p]),
        "final_val_auroc": final.get("external_auroc"),
        "final_val_accuracy": final.get("external_accuracy"),
        "holdout": data.get("holdout"),
    }


def _stats(values: list[float]) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None}
    return {"mean": round(statistics.fmean(values), 4),
            "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="studies per replay (0: all 4690)")
    parser.add_argument("--rate", type=float, default=20.0, help="studies per second")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--label-rate", type=float, default=0.2)
    parser.add_argument("--order", default="shuffled", choices=["shuffled", "drift"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--timeout", type=int, default=2400)
    parser.add_argument("--reuse", action="store_true",
                        help="read completed report.json files in --out instead of re-running")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "compare")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for name in args.configs:
            runs.append(run_one(name, seed, args))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    table = {}
    for name in args.configs:
        mine = [r for r in runs if r["config"] == name]
        table[name] = {
            "val_auroc": _stats([r["final_val_auroc"] for r in mine]),
            "holdout_auroc": _stats([(r["holdout"] or {}).get("auroc") for r in mine]),
            "holdout_accuracy": _stats([(r["holdout"] or {}).get("accuracy") for r in mine]),
            "labels": _stats([r["labels"] for r in mine]),
            "routed_fraction": _stats([r["routed_fraction"] for r in mine]),
        }
    lines = ["| strategy | labels | routed | dev-val AUROC | holdout AUROC | holdout acc. |",
             "|---|---|---|---|---|---|"]
    for name, row in table.items():
        def fmt(stat: dict, digits: int = 3) -> str:
            if stat["mean"] is None:
                return "n/a"
            return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"
        lines.append(f"| {name} | {fmt(row['labels'], 0)} | {fmt(row['routed_fraction'], 2)} | "
                     f"{fmt(row['val_auroc'])} | {fmt(row['holdout_auroc'])} | "
                     f"{fmt(row['holdout_accuracy'])} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"benchmark": "replay_compare", "n": args.n, "rate": args.rate,
                      "seeds": args.seeds, "label_rate": args.label_rate,
                      "order": args.order, "date": time.strftime("%Y-%m-%d"),
                      "table": table, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
