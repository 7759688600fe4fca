"""Cost and quality of the needs-label gate; prints ONE JSON object to stdout.

Cost: median per-study wall time (single-image studies, one study at a time, default
torch threads) of one deterministic forward pass, of the full gate (MC dropout with T
samples at the default scope, loss predictor, measures, acquisition, decide + commit)
and of the same gate at the other scopes.

Quality: trains the default network with `fit` on the PneumoniaMNIST dev train split
(upsampled to the default input size), then reports, on the dev val split, the
classifier's AUROC/accuracy and the AUROC of each scope's uncertainty measures (and of
the predicted loss) at flagging the classifier's own (deterministic) errors.

    .venv/bin/python bench/gate_cost.py [--epochs N] [--repeats N] [--quick]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.datasets import (  # noqa: E402
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)
from triage.gate import BudgetGate, GateSettings  # noqa: E402
from triage.gate.measures import MEASURES, all_measures  # noqa: E402
from triage.gate.strategies import midranks  # noqa: E402
from triage.model.inference import score_study  # noqa: E402
from triage.model.lossnet import build_loss_predictor  # noqa: E402
from triage.model.mc_dropout import mc_predict  # noqa: E402
from triage.model.network import MC_SCOPES, build_network  # noqa: E402
from triage.model.settings import ModelSettings  # noqa: E402
from triage.model.training import auroc, classifier_auroc, fit  # noqa: E402


def time_costs(net, lossnet, settings, images, repeats):
    """Median seconds per single-image study of each path, interleaved over repeats."""
    gate_settings = GateSettings()
    start = datetime(2024, 1, 1, tzinfo=UTC)
    gates, scope_settings = {}, {}
    for scope in MC_SCOPES:
        scope_settings[scope] = settings.model_copy(update={"mc_scope": scope})
        gate = BudgetGate(gate_settings)
        for i in range(gate_settings.window):  # steady state: a full window
            result = score_study(net, lossnet, images[i % len(images)][None], settings)
            gate.commit(gate.decide(gate.strategy.components(result), start))
        gates[scope] = gate
    samples = {"deterministic": [], **{scope: [] for scope in MC_SCOPES}}
    stage = {scope: {"trunk": [], "mc": [], "lossnet": []} for scope in MC_SCOPES}
    net.eval()
    for r in range(repeats + 10):
        x = images[r % len(images)][None]
        now = start + timedelta(seconds=r)
        t0 = time.perf_counter()
        with torch.inference_mode():
            net(x)
        elapsed = time.perf_counter() - t0
        if r >= 10:
            samples["deterministic"].append(elapsed)
        for scope in MC_SCOPES:
            gate = gates[scope]
            t0 = time.perf_counter()
            result = score_study(net, lossnet, x, scope_settings[scope])
            decision = gate.decide(gate.strategy.components(result), now)
            gate.commit(decision)
            elapsed = time.perf_counter() - t0
            if r >= 10:
                samples[scope].append(elapsed)
                for key, value in result.durations.items():
                    stage[scope][key].append(value)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return med, {s: {k: statistics.median(v) for k, v in d.items()} for s, d in stage.items()}


def quality(net, lossnet, settings, val_x, val_y, batch=128, seed=0):
    """Val AUROC of each scope's measures at flagging deterministic errors."""
    net.eval()
    with torch.inference_mode():
        logits, maps = [], []
        for i in range(0, len(val_x), batch):
            out, m = net.forward_with_features(val_x[i : i + batch])
            logits.append(out)
            maps.append(lossnet(m))
    probs = torch.softmax(torch.cat(logits), 1)
    predicted_loss = torch.cat(maps).numpy()
    wrong = (probs.argmax(1) != val_y).numpy()
    report = {
        "val_auroc": classifier_auroc(probs, val_y),
        "val_accuracy": float(1 - wrong.mean()),
        "val_errors": int(wrong.sum()),
        "val_images": len(val_y),
        "predicted_loss_error_auroc": auroc(predicted_loss, wrong),
        "scopes": {},
    }
    for k, scope in enumerate(MC_SCOPES):
        chunks = [
            mc_predict(net, val_x[i : i + batch], samples=settings.mc_samples, scope=scope,
                       with_features=False, seed=seed + k * 1000 + i).probs
            for i in range(0, len(val_x), batch)
        ]  # fmt: skip
        samples = torch.cat(chunks, dim=1)
        measures = {m: v.numpy() for m, v in all_measures(samples).items()}
        measures["margin"] = 1.0 - measures["margin"]  # larger = more uncertain
        mc_wrong = (samples.mean(0).argmax(1) != val_y).numpy()
        combined = 0.5 * midranks(measures["bald"]) + 0.5 * midranks(predicted_loss)
        report["scopes"][scope] = {
            "error_auroc": {m: round(auroc(measures[m], wrong), 4) for m in MEASURES},
            "combined_bald_loss_error_auroc": round(auroc(combined, wrong), 4),
            "mc_mean_accuracy": round(float(1 - mc_wrong.mean()), 4),
        }
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 6)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 300)")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1000 images, 50 repeats")
    args = parser.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 6)
    repeats = args.repeats or (50 if args.quick else 300)
    settings = ModelSettings()
    settings = settings.model_copy(
        update={"training": settings.training.model_copy(update={"epochs": epochs})}
    )
    data = load_pneumoniamnist_dev()
    train_x = images_to_tensor(data["train_images"], settings.input_size)
    train_y = labels_to_tensor(data["train_labels"])
    val_x = images_to_tensor(data["val_images"], settings.input_size)
    val_y = labels_to_tensor(data["val_labels"])
    if args.quick:
        train_x, train_y = train_x[:1000], train_y[:1000]
    torch.manual_seed(settings.training.seed)
    net, lossnet = build_network(settings), build_loss_predictor(settings)
    t0 = time.perf_counter()
    history = fit(net, lossnet, train_x, train_y, settings.training, val_images=val_x,
                  val_labels=val_y)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    med, stages = time_costs(net, lossnet, settings, val_x, repeats)
    det = med["deterministic"]
    report = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.machine(),
        },
        "settings": {
            "input_size": settings.input_size,
            "channels": list(settings.channels),
            "mc_samples": settings.mc_samples,
            "default_scope": settings.mc_scope,
            "epochs": epochs,
            "train_images": len(train_y),
            "repeats": repeats,
        },
        "cost_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "cost_ratio_vs_deterministic": {s: round(med[s] / det, 3) for s in MC_SCOPES},
        "stage_ms": {s: {k: round(v * 1e3, 4) for k, v in d.items()} for s, d in stages.items()},
        "target_default_scope_ratio_le_1_5": med[settings.mc_scope] / det <= 1.5,
        "train_seconds": round(train_seconds, 1),
        "train_history_last": {k: round(v, 4) for k, v in history.last.items()},
        "quality": quality(net, lossnet, settings, val_x, val_y),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
