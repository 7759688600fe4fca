"""Label efficiency of the gate: paired, deterministic runs of the loop in lockstep.

Every run replays the PneumoniaMNIST dev `train` stream (4,690 studies) through the
daemon's own scorer, gate, label splits, retraining, promotion and coverage queries
(`triage.replay.lockstep`), at a label budget, and scores:

* `holdout_auroc` / `holdout_accuracy`: the final serving model on the holdout, at its
  stored operating point (what the hospital gets);
* `fresh_holdout_auroc`: a model trained by one fixed recipe on exactly the labels the
  run bought (the quality of the labelled set, apart from the chain);
* `curve`: dev-val AUROC of each promoted model against the labels bought so far.

Within a seed every strategy sees the same stream and starts from the same state;
`random_b` is the random strategy with other draws, so `random_b - random` is the
null: the spread a difference must beat.

    # the whole grid (README table, JSON and plot); about 2 h on 2 cores
    .venv/bin/python bench/label_efficiency.py grid --jobs 2 --readme
    # one run, printed as the same JSON object the grid stores
    .venv/bin/python bench/label_efficiency.py run --stream uniform --budget 0.1 \\
        --strategy default --seed 3
    # summary, plot and README table again from the stored runs
    .venv/bin/python bench/label_efficiency.py summarize --readme

Runs already in `bench/results/label_efficiency.runs.jsonl` are reused by `grid`, so an
interrupted grid resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.config import load_settings, override_environ  # noqa: E402
from triage.replay.datasets import (  # noqa: E402
    find_data_dir,
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
    load_pneumoniamnist_holdout,
)
from triage.replay.lockstep import Data, RunSpec, run_one, run_settings  # noqa: E402

RESULTS = REPO / "bench" / "results"
OUT = RESULTS / "label_efficiency.json"
CACHE = RESULTS / "label_efficiency.runs.jsonl"
README = REPO / "README.md"
MARK_START, MARK_END = "<!-- label-efficiency:start -->", "<!-- label-efficiency:end -->"
BUDGETS = (0.05, 0.10, 0.20)
# which strategies run at which budget: the shipped default, random and, at 10%, the
# null (random_b) and Laplace BALD, the best other arm of the 2026-12-02 grid
PLAN = {
    0.05: ("random", "default"),
    0.10: ("random", "random_b", "default", "bald+laplace"),
    0.20: ("random", "default"),
}
# ablations of the shipped configuration at a 10% budget, and the streams they run on
# (the chain's rebalancing and promotion rule were measured under --tag chain and lean)
ABLATIONS: dict[str, tuple[str, ...]] = {}
# metrics compared per seed against a baseline arm
PAIRED_METRICS = ("holdout_auroc", "fresh_holdout_auroc", "holdout_accuracy",
                  "served_minus_fresh")
# differences within each run (another model of the same run minus the served one),
# summarised with their 95% CI over seeds
WITHIN_RUN = ("served_minus_fresh", "served_last2_minus_served", "served_last3_minus_served",
              "fresh_ensemble_minus_served")
# two-sided 95% t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

_DATA: Data | None = None


def load_data() -> Data:
    """Dev stream, dev val and holdout at 28 px (the holdout only scores final models)."""
    global _DATA
    if _DATA is None:
        if find_data_dir() is None:
            raise SystemExit("PneumoniaMNIST not found: set TRIAGE_DATA_DIR or place the "
                             "files in ../shared/data (see README, 'Data')")
        dev, holdout = load_pneumoniamnist_dev(), load_pneumoniamnist_holdout()
        _DATA = Data(
            images_to_tensor(dev["train_images"], 28), labels_to_tensor(dev["train_labels"]),
            images_to_tensor(dev["val_images"], 28), labels_to_tensor(dev["val_labels"]),
            images_to_tensor(holdout["test_images"], 28),
            labels_to_tensor(holdout["test_labels"]),
        )
    return _DATA


def base_settings(spec: RunSpec):
    """config.yaml with the run's `--set` overrides (validated like the daemon's)."""
    return load_settings(REPO / "config.yaml", environ=override_environ(spec.overrides))


# Settings added after runs were stored, with the value that reproduces the behaviour
# from before they existed: at that value a setting is left out of the digest, so runs
# stored before it was added are still reused. Another value is part of the digest.
ADDED_SETTINGS: dict[tuple[str, ...], Any] = {
    ("model", "training", "cycles"): 1,  # 2026-12-04; read only by schedule: restarts
    ("gate", "cold_start_neighbours"): 0,  # 2026-12-04 (third session): coverage cold start
    # 2026-12-04 (fourth session): read by `auto` only
    ("gate", "auto_strategies"): ["combined", "entropy", "alfa_mix", "badge", "emoc"],
    ("retrain", "unforgettable_weight"): 1.0,  # 2026-12-04 (fourth session)
    # 2026-12-05 (sixth session): read by `gate.budget_manager: batch` only
    ("gate", "batch_size"): 100,
    ("gate", "batch_seconds"): 3600.0,
    ("retrain", "nproc"): 1,  # 2026-12-05 (sixth session): one training process
}


def fingerprint(spec: RunSpec, base=None) -> str:
    """A digest of every setting the run's loop reads (model, gate and retrain sections
    after the strategy, variant and `--set` overrides are applied to config.yaml).

    Part of a stored run's key: when config.yaml's defaults change, runs stored under
    the old ones are not reused for an arm of the same name; a setting added later is
    left out at the value of `ADDED_SETTINGS` that reproduces the older behaviour. (A
    change of code rather than settings is not seen: measure it under a new `--tag`.)
    `base`: the run's
    `base_settings`, when the caller already loaded them."""
    settings = run_settings(base if base is not None else base_settings(spec), spec)
    parts = {name: getattr(settings, name).model_dump(mode="json")
             for name in ("model", "gate", "retrain")}
    for path, neutral in ADDED_SETTINGS.items():
        *parents, leaf = path
        holder = parts
        for key in parents:
            holder = holder.get(key, {})
        if leaf in holder and holder[leaf] == neutral:
            del holder[leaf]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _run(spec: RunSpec) -> dict[str, Any]:
    base = base_settings(spec)
    return {**run_one(base, load_data(), spec), "settings": fingerprint(spec, base)}


def arm(run: dict[str, Any]) -> str:
    """The arm a run belongs to: its strategy, and its `--set` overrides if any."""
    overrides = run.get("overrides") or []
    return run["strategy"] + (f" [{', '.join(overrides)}]" if overrides else "")


def _key(run: dict[str, Any], settings: str | None = None) -> tuple:
    """A stored run's identity: its spec and the fingerprint of the settings it ran."""
    return (run["stream"], float(run["budget"]), run["strategy"], int(run["seed"]),
            float(run.get("noise", 0.0)), run.get("length"), tuple(run.get("overrides") or ()),
            int(run.get("fresh_seeds") or 1),
            settings if settings is not None else run.get("settings"))


def _t95(df: int) -> float:
    if df in T95:
        return T95[df]
    below = [k for k in T95 if k <= df]
    return T95[max(below)] if below else T95[1]


def paired(diffs: list[float]) -> dict[str, float | int]:
    """Mean paired difference with its 95% t confidence half-width."""
    n = len(diffs)
    mean = statistics.fmean(diffs)
    half = _t95(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {"n": n, "mean": round(mean, 4), "ci95": round(half, 4),
            "low": round(mean - half, 4), "high": round(mean + half, 4)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (stream, budget, strategy): means and the paired difference against random."""
    groups: dict[tuple, dict[int, dict[str, Any]]] = {}
    for run in runs:
        key = (run["stream"], float(run["budget"]), arm(run), float(run.get("noise", 0)))
        groups.setdefault(key, {})[int(run["seed"])] = run
    rows = []
    for (stream, budget, strategy, noise), by_seed in sorted(groups.items()):
        suffix = strategy[len(strategy.split(" [")[0]):]  # the arm's overrides, if any
        random_runs = groups.get((stream, budget, "random" + suffix, noise), {})
        row: dict[str, Any] = {"stream": stream, "budget": budget, "strategy": strategy,
                               "noise": noise, "seeds": sorted(by_seed)}
        for metric in ("holdout_auroc", "holdout_accuracy", "fresh_holdout_auroc", "labels",
                       "seconds", "holdout_ece", "holdout_ece_uncalibrated",
                       "served_minus_fresh", "fresh_ensemble_holdout_auroc",
                       "served_last2_holdout_auroc", "served_last3_holdout_auroc"):
            values = [r[metric] for r in by_seed.values() if r.get(metric) is not None]
            if values:
                row[metric] = round(statistics.fmean(values), 4)
                row[metric + "_sd"] = round(statistics.stdev(values), 4) if len(values) > 1 \
                    else None
        for metric in WITHIN_RUN:
            values = [r[metric] for r in by_seed.values() if r.get(metric) is not None]
            if len(values) > 1:
                row[metric + "_ci"] = paired(values)
        mixes = [r["auto_mix"] for r in by_seed.values() if r.get("auto_mix")]
        if mixes:  # `auto`: its final mix and the routes by candidate, mean over seeds
            row["auto_mix"] = {k: round(statistics.fmean(m[k] for m in mixes), 3)
                               for k in mixes[0]}
            row["routed_by_expert"] = {
                k: round(statistics.fmean(r.get("routed_by_expert", {}).get(k, 0)
                                          for r in by_seed.values()), 1) for k in mixes[0]}
            row["auto_audits"] = round(statistics.fmean(r.get("auto_audits", 0)
                                                        for r in by_seed.values()), 1)
        bases = {"random": random_runs} if not strategy.startswith("random ") and \
            strategy != "random" else {}
        other_coin = groups.get((stream, budget, "random_b" + suffix, noise), {})
        if bases and other_coin and not strategy.startswith("random_b"):
            # both coins: the per-seed mean of random and random_b, a baseline with half
            # the variance of one draw of labels
            bases["coins"] = {
                s: {m: (random_runs[s][m] + other_coin[s][m]) / 2
                    for m in PAIRED_METRICS
                    if random_runs[s].get(m) is not None and other_coin[s].get(m) is not None}
                for s in random_runs if s in other_coin}
        name = strategy.split(" [")[0]
        if not _variant(strategy) and strategy not in ("random", "random_b", "default"):
            # another strategy: also against the shipped default (does it replace it?)
            bases["default"] = groups.get((stream, budget, "default", noise), {})
        if strategy == "auto":  # the online choice: against every single strategy
            for (g_stream, g_budget, other, g_noise), other_runs in groups.items():
                if (g_stream, g_budget, g_noise) == (stream, budget, noise) and \
                        not _variant(other) and other not in ("auto", "random", "random_b"):
                    bases[f"single_{other}"] = other_runs
        if "+" in name or suffix:  # an ablation: also against the configuration it changes
            bases["base"] = groups.get((stream, budget, name.split("+")[0], noise), {})
        if "+" in name and not name.startswith("random"):  # and random with the same change
            variant = name.split("+", 1)[1]
            same = groups.get((stream, budget, f"random+{variant}{suffix}", noise))
            if same:
                bases["random_same"] = same
        for name, others in bases.items():
            for metric in PAIRED_METRICS:
                diffs = [by_seed[s][metric] - others[s][metric] for s in by_seed
                         if s in others and by_seed[s].get(metric) is not None
                         and others[s].get(metric) is not None]
                if diffs:
                    row[f"{metric}_vs_{name}"] = paired(diffs)
        rows.append(row)
    return rows


def _variant(strategy: str) -> bool:
    """Whether an arm is a variant (`default+refit`) or has `--set` overrides."""
    return "+" in strategy or " [" in strategy


def _planned(row: dict[str, Any]) -> bool:
    """Whether a summary row belongs in the main table (an arm of the plan, or a plain
    strategy of `STRATEGIES`) rather than among the ablations."""
    return row["strategy"] in PLAN.get(row["budget"], ()) or not _variant(row["strategy"])


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}`: "
        f"{meta['runs']} runs, seeds {meta['seeds']}, {meta['studies']} studies per run, "
        f"label delay {meta['label_delay']} studies, median {meta['median_seconds']} s per run.",
        "Holdout AUROC and accuracy (at its stored operating point) of the final serving "
        "model (mean ± sd over seeds); Δ = paired difference on the same seeds, with its "
        "95% CI, against `random`, against both coins (the per-seed mean of `random` "
        "and `random_b`, where the null ran; `random_b` − `random` is the null), and, for "
        "a strategy other than the shipped one, against `default`. "
        "served − fresh: the served model against one trained from scratch on every label "
        "the run bought. Gate cost: the full gate under the strategy (scoring, strategy, "
        "decision) against one deterministic pass, and its time per single-image study, "
        "which is that study's decision latency (bench/gate_cost.py's stored run).",
        "",
        "| stream | budget | strategy | seeds | labels | holdout AUROC | fresh AUROC "
        "| Δ vs random (95% CI) | Δ vs both coins | Δ vs default | accuracy "
        "| Δ accuracy vs random | served − fresh | s per run | gate cost (× one pass) "
        "| gate ms per study |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    costs = _gate_costs()

    def cell(row: dict[str, Any], key: str) -> str:
        d = row.get(key)
        return f"{d['mean']:+.4f} ± {d['ci95']:.4f}" if d else "—"

    order = {"random": 0, "random_b": 1, "default": 2}
    for row in sorted((r for r in summary if _planned(r)),
                      key=lambda r: (r["stream"], r["budget"], order.get(r["strategy"], 3),
                                     r["strategy"])):
        lines.append(
            f"| {row['stream']} | {row['budget']:.0%} | {row['strategy']} | "
            f"{len(row['seeds'])} | {row.get('labels', 0):.0f} | "
            f"{row.get('holdout_auroc', math.nan):.4f} ± "
            f"{row.get('holdout_auroc_sd') or 0:.4f} | "
            f"{row.get('fresh_holdout_auroc', math.nan):.4f} | "
            f"{cell(row, 'holdout_auroc_vs_random')} | "
            f"{cell(row, 'holdout_auroc_vs_coins')} | {cell(row, 'holdout_auroc_vs_default')} | "
            f"{row.get('holdout_accuracy', math.nan):.3f} | "
            f"{cell(row, 'holdout_accuracy_vs_random')} | "
            f"{row.get('served_minus_fresh', math.nan):+.4f} | "
            f"{row.get('seconds', math.nan):.0f} | {costs(row['strategy'])} |"
        )
    lines += _auto_lines(summary)
    ablations = [r for r in summary if not _planned(r)]
    if ablations:
        lines += [
            "",
            "Ablations: each against the configuration it changes (`default` or "
            "`random`) at the same budget, paired on the same seeds.",
            "",
            "| stream | budget | ablation | seeds | holdout AUROC | Δ vs base (95% CI) "
            "| accuracy | fresh AUROC | Δ fresh vs base |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(ablations, key=lambda r: (r["stream"], r["budget"], r["strategy"])):
            lines.append(
                f"| {row['stream']} | {row['budget']:.0%} | {row['strategy']} | "
                f"{len(row['seeds'])} | "
                f"{row.get('holdout_auroc', math.nan):.4f} | {cell(row, 'holdout_auroc_vs_base')} "
                f"| {row.get('holdout_accuracy', math.nan):.3f} | "
                f"{row.get('fresh_holdout_auroc', math.nan):.4f} | "
                f"{cell(row, 'fresh_holdout_auroc_vs_base')} |"
            )
    return "\n".join(lines)


def _gate_costs():
    """The cells `gate cost | gate ms` of a strategy, from bench/gate_cost.py's stored
    run (`strategy_gate_ratio`, `strategy_cost_ms`: the full gate under that strategy,
    decision included, on one study, against one deterministic pass)."""
    path = RESULTS / "gate_cost.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    ratios, ms = stored.get("strategy_gate_ratio", {}), stored.get("strategy_cost_ms", {})
    shipped = load_settings(REPO / "config.yaml", environ={}).gate.strategy

    def cells(strategy: str) -> str:
        name = {"default": shipped, "random_b": "random"}.get(strategy, strategy)
        if name not in ratios:
            return "— | —"
        return f"{ratios[name]:.2f} | {ms.get(name, math.nan):.2f}"

    return cells


def _auto_lines(summary: list[dict[str, Any]]) -> list[str]:
    """`auto` against the best single strategy of its stream and budget (by mean holdout
    AUROC among the plain strategies that ran there), and its final mix."""
    lines: list[str] = []
    for row in sorted((r for r in summary if r["strategy"] == "auto"),
                      key=lambda r: (r["stream"], r["budget"])):
        if not lines:
            lines += ["", "`auto` (the gate's online choice) beside the best single strategy "
                      "of its stream and budget, and its final mix (mean over seeds; routes: "
                      "studies routed by each candidate's ranking, mean per run).", "",
                      "| stream | budget | auto AUROC | best single | its AUROC | auto − best "
                      "(95% CI) | audits counted | final mix | routes by candidate |",
                      "|---|---|---|---|---|---|---|---|---|"]
        singles = [r for r in summary if r["stream"] == row["stream"]
                   and r["budget"] == row["budget"] and not _variant(r["strategy"])
                   and r["strategy"] not in ("auto", "random", "random_b")
                   and len(r["seeds"]) >= len(row["seeds"])]
        best = max(singles, key=lambda r: r.get("holdout_auroc", -1.0), default=None)
        mix = ", ".join(f"{k} {v:.2f}" for k, v in row["auto_mix"].items())
        routes = ", ".join(f"{k} {v:.0f}" for k, v in row["routed_by_expert"].items())
        paired_gap = row.get(f"holdout_auroc_vs_single_{best['strategy']}") if best else None
        gap = (f"{paired_gap['mean']:+.4f} ± {paired_gap['ci95']:.4f}" if paired_gap
               else "—")
        lines.append(
            f"| {row['stream']} | {row['budget']:.0%} | {row['holdout_auroc']:.4f} | "
            f"{best['strategy'] if best else '—'} | "
            f"{best['holdout_auroc'] if best else math.nan:.4f} | {gap} | "
            f"{row['auto_audits']:.0f} | {mix} | {routes} |")
    return lines


def plot(runs: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = sorted({r["stream"] for r in runs})
    fig, axes = plt.subplots(2, len(streams), figsize=(6 * len(streams), 8), squeeze=False)
    for col, stream in enumerate(streams):
        ax = axes[0][col]
        for strategy, colour in (("random", "tab:grey"), ("random_b", "tab:olive"),
                                 ("default", "tab:red"), ("entropy", "tab:blue")):
            for run in runs:
                if (run["stream"], run["budget"], run["strategy"]) != (stream, 0.1, strategy):
                    continue
                xs = [p["labels"] for p in run["curve"]]
                ys = [p["val_auroc"] for p in run["curve"]]
                ax.plot(xs, ys, color=colour, alpha=0.6, marker=".",
                        label=strategy if run["seed"] == min(r["seed"] for r in runs) else None)
        ax.set(title=f"{stream} stream, 10% budget: serving model on dev val",
               xlabel="labels bought", ylabel="dev-val AUROC", ylim=(0.85, 1.0))
        ax.legend(loc="lower right")
        ax = axes[1][col]
        rows = [r for r in summary if r["stream"] == stream and r["strategy"] != "random"
                and _planned(r) and "holdout_auroc_vs_random" in r]
        rows.sort(key=lambda r: (r["budget"], r["strategy"]))
        labels = [f"{r['strategy']} @{r['budget']:.0%}" for r in rows]
        for offset, key, colour, name in ((-0.2, "holdout_auroc_vs_random", "tab:red",
                                           "serving model"),
                                          (0.2, "fresh_holdout_auroc_vs_random", "tab:blue",
                                           "fresh model on the bought labels")):
            ys = [i + offset for i, r in enumerate(rows) if key in r]
            means = [r[key]["mean"] for r in rows if key in r]
            errs = [r[key]["ci95"] for r in rows if key in r]
            ax.barh(ys, means, height=0.38, xerr=errs, color=colour, alpha=0.7, label=name)
        ax.set_yticks(range(len(rows)), labels)
        ax.axvline(0, color="black", lw=0.8)
        ax.legend(loc="best", fontsize=8)
        ax.set(title=f"{stream}: holdout AUROC − random (paired, 95% CI)",
               xlabel="Δ AUROC")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _cache_path(tag: str | None) -> Path:
    """Where a grid stores its runs: its own file per `--tag`, so a tagged grid measures
    its arms on this machine instead of reusing runs stored elsewhere."""
    return CACHE if not tag else RESULTS / f"label_efficiency.{tag}.runs.jsonl"


def _load_cache(tag: str | None = None) -> dict[tuple, dict[str, Any]]:
    out = {}
    path = _cache_path(tag)
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                run = json.loads(line)
                out[_key(run)] = run
    return out


def _meta(runs: list[dict[str, Any]], command: str) -> dict[str, Any]:
    import torch

    seconds = sorted(r["seconds"] for r in runs) or [0]
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, "
                   f"torch {torch.__version__} (CPU, 1 thread per run)",
        "command": command, "runs": len(runs),
        "seeds": sorted({r["seed"] for r in runs}),
        "studies": sorted({r["studies"] for r in runs}),
        "label_delay": sorted({r["label_delay"] for r in runs}),
        "median_seconds": round(statistics.median(seconds), 1),
    }


def write_outputs(runs: list[dict[str, Any]], command: str, readme: bool,
                  tag: str | None = None) -> dict[str, Any]:
    """JSON, plot and table of `runs`: `label_efficiency.*`, or `label_efficiency.<tag>.*`
    for a grid of other arms; with `readme`, the table also replaces the README's between
    the markers `<!-- label-efficiency:start/end -->` (a tag's:
    `<!-- label-efficiency:<tag>:start/end -->`)."""
    summary = summarize(runs)
    meta = _meta(runs, command)
    result = {"meta": meta, "summary": summary, "runs": runs}
    stem = "label_efficiency" + (f".{tag}" if tag else "")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(runs, summary, RESULTS / f"{stem}.png")
    table = markdown(summary, meta)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    if readme:  # a tag's table goes between its own markers
        start, end = ((MARK_START, MARK_END) if not tag else
                      (f"<!-- label-efficiency:{tag}:start -->",
                       f"<!-- label-efficiency:{tag}:end -->"))
        text = README.read_text()
        if start in text and end in text:
            head, rest = text.split(start, 1)
            _, tail = rest.split(end, 1)
            README.write_text(f"{head}{start}\n{table}\n{end}{tail}")
    return result


def _tier(budget: float, strategy: str) -> int:
    """Run order: the comparison that matters first (default against random and the
    null at 10%), so a grid stopped early still answers it."""
    if budget == 0.10 and strategy in ("random", "random_b", "default", "entropy"):
        return 0
    if strategy in ("random", "default"):
        return 1
    if "+" in strategy:
        return 3 if "delong" in strategy else 2
    return 5 if strategy == "random_b" else 4


def grid_specs(args: argparse.Namespace) -> list[RunSpec]:
    specs = []
    for seed in args.seeds:
        for stream in args.streams:
            for budget in args.budgets:
                extra = [a for a, streams in ABLATIONS.items()
                         if budget == 0.10 and stream in streams]
                arms = args.arms if args.arms else (*PLAN[budget], *extra)
                for strategy in arms:
                    specs.append(RunSpec(stream, budget, strategy, seed, noise=args.noise,
                                         label_delay=args.delay, length=args.length,
                                         overrides=tuple(args.overrides),
                                         fresh_seeds=args.fresh_seeds))
    return sorted(specs, key=lambda s: (_tier(s.budget, s.strategy), s.seed, s.stream))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    grid = sub.add_parser("grid", help="run the grid (reusing stored runs), write outputs")
    grid.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    grid.add_argument("--streams", nargs="+", default=["uniform", "drift"])
    grid.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    grid.add_argument("--jobs", type=int, default=2)
    grid.add_argument("--noise", type=float, default=0.0)
    grid.add_argument("--delay", type=int, default=50)
    grid.add_argument("--length", type=int, default=None)
    grid.add_argument("--readme", action="store_true", help="rewrite the README table")
    grid.add_argument("--arms", nargs="+", default=None, metavar="STRATEGY",
                      help="run these strategies (or default+<variant>) at every budget "
                           "instead of the plan (needs --tag)")
    grid.add_argument("--tag", default=None,
                      help="write label_efficiency.<tag>.{json,md,png} instead of the main "
                           "outputs (needed with --arms or --set)")
    grid.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="SECTION.KEY=VALUE",
                      help="config override for every run of the grid, repeatable; runs "
                           "are stored and summarised as their own arms")
    grid.add_argument("--fresh-seeds", type=int, default=1, metavar="N",
                      help="training seeds of each run's fresh model (its score is their "
                           "mean; N > 1 also scores their ensemble and costs N - 1 "
                           "trainings per run)")
    one = sub.add_parser("run", help="one run, printed as JSON")
    one.add_argument("--stream", default="uniform")
    one.add_argument("--budget", type=float, default=0.1)
    one.add_argument("--strategy", default="default")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--noise", type=float, default=0.0)
    one.add_argument("--delay", type=int, default=50)
    one.add_argument("--length", type=int, default=None)
    one.add_argument("--set", dest="overrides", action="append", default=[],
                     metavar="SECTION.KEY=VALUE", help="config override, repeatable")
    one.add_argument("--fresh-seeds", type=int, default=1, metavar="N")
    summ = sub.add_parser("summarize", help="outputs again from the stored runs")
    summ.add_argument("--readme", action="store_true")
    summ.add_argument("--tag", default=None, help="a tagged grid's stored runs")
    args = parser.parse_args(argv)

    if args.command == "run":
        spec = RunSpec(args.stream, args.budget, args.strategy, args.seed, noise=args.noise,
                       label_delay=args.delay, length=args.length,
                       overrides=tuple(args.overrides), fresh_seeds=args.fresh_seeds)
        print(json.dumps(_run(spec), indent=1))
        return 0
    if args.command == "summarize":
        # the last stored run of each spec: a spec rerun under changed defaults replaces
        # the earlier run in the outputs (both stay in the runs file)
        latest = {key[:-1]: run for key, run in _load_cache(args.tag).items()}
        runs = list(latest.values())
        result = write_outputs(runs, "bench/label_efficiency.py "
                               + " ".join(argv if argv is not None else sys.argv[1:]),
                               args.readme, args.tag)
        print(json.dumps(result["summary"], indent=1))
        return 0
    if (args.arms or args.overrides) and not args.tag:
        parser.error("--arms and --set need --tag (the main outputs hold the plan)")
    if not args.arms:
        args.budgets = [b for b in args.budgets if b in PLAN]
    cache = _load_cache(args.tag)
    specs = grid_specs(args)
    keys = {s: _key(s.__dict__, fingerprint(s)) for s in specs}
    todo = [s for s in specs if keys[s] not in cache]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} stored, {len(todo)} to run",
          file=sys.stderr, flush=True)
    started = time.time()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool, \
            _cache_path(args.tag).open("a") as out:
        for done, run in enumerate(pool.imap_unordered(_run, todo), 1):
            out.write(json.dumps(run) + "\n")
            out.flush()
            cache[_key(run)] = run
            print(f"[{done}/{len(todo)}] {run['stream']} {run['budget']:.0%} "
                  f"{run['strategy']} seed {run['seed']}: holdout AUROC "
                  f"{run['holdout_auroc']}, fresh {run['fresh_holdout_auroc']}, "
                  f"{run['labels']} labels, {run['seconds']} s "
                  f"({time.time() - started:.0f} s elapsed)", file=sys.stderr, flush=True)
    wanted = set(keys.values())
    runs = [r for k, r in cache.items() if k in wanted]
    command = "bench/label_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = write_outputs(runs, command, args.readme, args.tag)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
