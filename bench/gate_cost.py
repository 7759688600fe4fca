"""Cost and quality of the needs-label gate; prints ONE JSON object to stdout.

Cost: median per-study wall time (single-image studies, one study at a time, with one
torch intra-op thread and a seed per study, as the daemon scores; `--threads` to change
the threads) of one deterministic forward pass, of the full gate (T predictive
samples, loss predictor, `ood` (density + input quality), measures, strategy, decide +
commit)
with MC dropout at each scope, and with the last-layer Laplace samples
(`model.epistemic: laplace`, triage/model/epistemic.py); and of the estimator alone
(trunk + samples, from the stage medians).

Quality: trains the default network with the default recipe on 90 % of the
PneumoniaMNIST dev train split (upsampled to the default input size); the Laplace prior
precision is chosen on the other 10 %, so dev val is only evaluated on. Reports, on dev
val, the classifier's AUROC/accuracy, the AUROC of each estimator's measures (and of the
predicted loss) at flagging the classifier's own (deterministic) errors, and the AUROC
at ranking out-of-distribution images above the dev val images: CT and MR frames from
pydicom's test files (read and preprocessed as ingest does), and inverted, noisy,
blurred, block-corrupted, washed-out and cropped (centre half magnified 2x) dev val
images. The flag's score is the model's `ood` (feature density and input quality,
triage/model/quality.py); the density alone and the quality alone are reported beside
it. `full_gate_ratio` (the default path's full gate over one deterministic pass) and
`ood_auroc` (the flag's score, per set and `all`) are the issue's two figures.
`strategy_gate_ratio`: the same full gate under each strategy of `gate.strategy`.
`batch`: under `gate.budget_manager: batch`, the cost of deciding a buffer of
`gate.batch_size` scored dev val studies together (k-means++ over their BADGE gradient
embeddings, `decide_batch` and the commits), per batch and per study, and of each
study's gradient embedding; the scoring itself is `badge`'s.

    .venv/bin/python bench/gate_cost.py [--epochs N] [--repeats N] [--threads N] [--quick]
        [--out PATH]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triage.config import IngestSettings  # noqa: E402
from triage.replay.datasets import (  # noqa: E402
    images_to_tensor,
    labels_to_tensor,
    load_pneumoniamnist_dev,
)
from triage.gate import BatchEntry, BudgetGate, GateSettings  # noqa: E402
from triage.gate.strategies import STRATEGIES, midranks  # noqa: E402
from triage.ingest.dicom import read_instance  # noqa: E402
from triage.ingest.preprocess import preprocess  # noqa: E402
from triage.model.discriminator import fit_discriminator  # noqa: E402
from triage.model.epistemic import fit_epistemic, pooled_features  # noqa: E402
from triage.model.inference import score_study  # noqa: E402
from triage.model.lossnet import build_loss_predictor  # noqa: E402
from triage.model.mc_dropout import mc_predict  # noqa: E402
from triage.model.measures import MEASURES, all_measures  # noqa: E402
from triage.model.network import MC_SCOPES, build_network  # noqa: E402
from triage.model.settings import ModelSettings  # noqa: E402
from triage.model.training import auroc, classifier_auroc, fit  # noqa: E402

PATHS = (*MC_SCOPES, "laplace")
"""Gate paths timed: MC dropout at each scope, and the last-layer Laplace samples."""


def path_settings(settings, path):
    """Model settings of one timed path."""
    if path == "laplace":
        return settings.model_copy(update={"epistemic": "laplace", "mc_scope": "head"})
    return settings.model_copy(update={"epistemic": "mc_dropout", "mc_scope": path})


def time_gates(net, lossnet, head, configs, images, repeats):
    """Median seconds per single-image study of one deterministic pass and of the full
    gate (score_study with a per-study seed, strategy, decide + commit) under each
    configuration, interleaved over repeats, and each configuration's stage medians.

    Args:
        configs: name -> (model settings, gate settings).
    """
    start = datetime(2024, 1, 1, tzinfo=UTC)
    gates = {}
    for name, (model, gate_settings) in configs.items():
        gate = BudgetGate(gate_settings)
        for i in range(gate_settings.window):  # steady state: a full window
            result = score_study(net, lossnet, images[i % len(images)][None], model,
                                 epistemic=head)  # fmt: skip
            gate.commit(gate.decide(gate.strategy.components(result), start))
        gates[name] = gate
    samples = {"deterministic": [], **{name: [] for name in configs}}
    stage = {name: {"trunk": [], "mc": [], "lossnet": []} for name in configs}
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
        for name, gate in gates.items():
            t0 = time.perf_counter()
            # seeded per study as the daemon's scorer seeds (study id * 1009 + round)
            result = score_study(net, lossnet, x, configs[name][0], epistemic=head,
                                 seed=r * 1009)  # fmt: skip
            gate.commit(gate.decide(gate.strategy.components(result), now))
            elapsed = time.perf_counter() - t0
            if r >= 10:
                samples[name].append(elapsed)
                for key, value in result.durations.items():
                    stage[name][key].append(value)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return med, {s: {k: statistics.median(v) for k, v in d.items()} for s, d in stage.items()}


def time_costs(net, lossnet, head, settings, images, repeats):
    """`time_gates` of each gate path (`PATHS`) under the default strategy."""
    configs = {path: (path_settings(settings, path), GateSettings()) for path in PATHS}
    return time_gates(net, lossnet, head, configs, images, repeats)


def time_strategies(net, lossnet, head, settings, images, repeats):
    """`time_gates` medians of the default path under each strategy of `STRATEGIES` (its
    own budget manager), with "deterministic"."""
    configs = {name: (settings, GateSettings(strategy=name)) for name in STRATEGIES}
    return time_gates(net, lossnet, head, configs, images, repeats)[0]


def time_batch(net, lossnet, head, settings, images, repeats):
    """Median milliseconds of deciding one `batch` buffer of dev val studies (decide_batch
    and the commits, on a fresh gate each time) and of one study's gradient embedding."""
    gate_settings = GateSettings(strategy="badge", budget_manager="batch")
    size = gate_settings.batch_size
    strategy = BudgetGate(gate_settings).strategy
    results = [score_study(net, lossnet, images[i % len(images)][None], settings,
                           epistemic=head, seed=i * 1009) for i in range(size)]
    embed_s = []
    for r in range(repeats):
        t0 = time.perf_counter()
        vector = strategy.batch_embedding(results[r % size])
        embed_s.append(time.perf_counter() - t0)
    entries = [BatchEntry(strategy.components(result), i, strategy.batch_embedding(result))
               for i, result in enumerate(results)]
    now = datetime(2024, 1, 1, tzinfo=UTC)
    BudgetGate(gate_settings).decide_batch(entries, now)  # imports scikit-learn once
    decide_s = []
    for _ in range(max(10, repeats // 10)):
        gate = BudgetGate(gate_settings)
        t0 = time.perf_counter()
        for decision in gate.decide_batch(entries, now):
            gate.commit(decision)
        decide_s.append(time.perf_counter() - t0)
    batch_ms = statistics.median(decide_s) * 1e3
    return {"batch_size": size, "embedding_dim": int(vector.shape[0]),
            "decide_ms_per_batch": round(batch_ms, 3),
            "decide_ms_per_study": round(batch_ms / size, 4),
            "embedding_ms_per_study": round(statistics.median(embed_s) * 1e3, 4)}


def dicom_frames(size):
    """CT and MR frames of pydicom's bundled test files, read and preprocessed as ingest
    does (files that do not decode are skipped), [N, 1, S, S]."""
    import pydicom

    root = Path(pydicom.__file__).parent / "data" / "test_files"
    settings = IngestSettings()
    frames = []
    for path in sorted(root.glob("*.dcm")):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            if str(header.get("Modality", "")).upper() not in ("CT", "MR"):
                continue
            instance = read_instance(path.read_bytes(), settings)
        except Exception:  # noqa: BLE001 - the corpus is deliberately odd; skip what fails
            continue
        if instance.image is not None:
            frames.extend(preprocess(instance.image, size).float()[:, None])
    return torch.stack(frames)


def unlike_sets(val_x, seed=123):
    """Images a CXR model has not seen: CT/MR frames and corrupted dev val images."""
    g = torch.Generator().manual_seed(seed)
    size = val_x.shape[-1]
    kernel = torch.arange(25, dtype=torch.float32) - 12
    kernel = torch.exp(-kernel**2 / (2 * (4.0 * size / 64) ** 2))
    kernel = kernel / kernel.sum()
    padded = F.pad(val_x, (12, 12, 12, 12), mode="reflect")
    blur = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    blocks = val_x.clone()
    side = size * 7 // 16
    for _ in range(3):
        ys = torch.randint(0, size - side, (len(val_x),), generator=g)
        xs = torch.randint(0, size - side, (len(val_x),), generator=g)
        for i in range(len(val_x)):
            blocks[i, 0, ys[i] : ys[i] + side, xs[i] : xs[i] + side] = torch.rand(
                side, side, generator=g)
    half = val_x[:, :, size // 4 : size - size // 4, size // 4 : size - size // 4]
    return {
        "ct_mr": dicom_frames(size),
        "inverted": 1.0 - val_x,
        "noise": (val_x + 0.5 * torch.randn(val_x.shape, generator=g)).clamp(0, 1),
        "blur": blur.clamp(0, 1),
        "blocks": blocks,
        "washed_out": 0.6 + 0.3 * val_x,
        "cropped": F.interpolate(half, size=(size, size), mode="bilinear", align_corners=False),
    }


def _mc_measures(net, images, settings, scope, seed, batch=128):
    chunks = [
        mc_predict(net, images[i : i + batch], samples=settings.mc_samples, scope=scope,
                   with_features=False, seed=seed + i).probs
        for i in range(0, len(images), batch)
    ]  # fmt: skip
    samples = torch.cat(chunks, dim=1)
    measures = {m: v.numpy() for m, v in all_measures(samples).items()}
    measures["margin"] = 1.0 - measures["margin"]  # larger = more uncertain
    return measures, samples


def _laplace_measures(net, head, images):
    samples = head.probs(pooled_features(net, images))
    measures = {m: v.numpy() for m, v in all_measures(samples).items()}
    measures["margin"] = 1.0 - measures["margin"]
    return measures, samples


def quality(net, lossnet, head, settings, val_x, val_y, batch=128, seed=0):
    """Val AUROC of each estimator's measures at flagging deterministic errors, and at
    ranking images unlike the training data above dev val."""
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
        "laplace_prior_precision": head.prior_precision,
        "estimators": {},
    }
    estimators = {}
    for k, scope in enumerate(MC_SCOPES):
        estimators[scope] = lambda x, s=scope, k=k: _mc_measures(net, x, settings, s, seed + k)
    estimators["laplace"] = lambda x: _laplace_measures(net, head, x)
    for name, measure_of in estimators.items():
        with torch.inference_mode():
            measures, samples = measure_of(val_x)
        mean_wrong = (samples.mean(0).argmax(1) != val_y).numpy()
        combined = 0.5 * midranks(measures["bald"]) + 0.5 * midranks(predicted_loss)
        report["estimators"][name] = {
            "error_auroc": {m: round(auroc(measures[m], wrong), 4) for m in MEASURES},
            "combined_bald_loss_error_auroc": round(auroc(combined, wrong), 4),
            "sample_mean_accuracy": round(float(1 - mean_wrong.mean()), 4),
        }
    report["ood"] = ood_quality(net, head, settings, val_x, seed)
    return report


def ood_quality(net, head, settings, val_x, seed):
    """AUROC of each score at ranking each unlike set above the dev val images."""
    sets = unlike_sets(val_x)
    scores = {"ood": {}, "density": {}, "quality": {}, "laplace_bald": {}, "head_entropy": {},
              "head_bald": {}}  # fmt: skip
    with torch.inference_mode():
        for name, images in {"val": val_x, **sets}.items():
            features = pooled_features(net, images)
            scores["ood"][name] = head.ood(features, images).numpy()
            scores["density"][name] = head.density(features).numpy()
            scores["quality"][name] = head.quality.distance(images).numpy()
            head_scope = _mc_measures(net, images, settings, "head", seed)[0]
            scores["head_entropy"][name] = head_scope["entropy"]
            scores["head_bald"][name] = head_scope["bald"]
            scores["laplace_bald"][name] = _laplace_measures(net, head, images)[0]["bald"]
    report = {"images": {name: len(images) for name, images in sets.items()}, "auroc": {}}
    for score, values in scores.items():
        inside = values["val"]
        row = {}
        for name in sets:
            flags = np.r_[np.zeros(len(inside)), np.ones(len(values[name]))]
            row[name] = round(auroc(np.r_[inside, values[name]], flags), 4)
        outside = np.concatenate([values[name] for name in sets])
        flags = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
        row["all"] = round(auroc(np.r_[inside, outside], flags), 4)
        report["auroc"][score] = row
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: the model's default recipe)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 300)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads while timing (default 1: the daemon "
                             "scores with one, triage/daemon.py); training uses the default")
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1000 images, 50 repeats")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the JSON here (bench/results/gate_cost.json)")
    args = parser.parse_args(argv)
    settings = ModelSettings()
    epochs = args.epochs or (1 if args.quick else settings.training.epochs)
    repeats = args.repeats or (50 if args.quick else 300)
    settings = settings.model_copy(
        update={"training": settings.training.model_copy(update={"epochs": epochs})}
    )
    data = load_pneumoniamnist_dev()
    order = np.random.default_rng(0).permutation(len(data["train_labels"]))  # sorted by class
    if args.quick:
        order = order[:1000]
    held = len(order) // 10  # chooses the Laplace prior precision; dev val stays unseen
    images = images_to_tensor(data["train_images"][order], settings.input_size)
    labels = labels_to_tensor(data["train_labels"][order])
    train_x, train_y, prior_x, prior_y = images[held:], labels[held:], images[:held], labels[:held]
    val_x = images_to_tensor(data["val_images"], settings.input_size)
    val_y = labels_to_tensor(data["val_labels"])
    torch.manual_seed(settings.training.seed)
    net, lossnet = build_network(settings), build_loss_predictor(settings)
    t0 = time.perf_counter()
    history = fit(net, lossnet, train_x, train_y, settings.training)
    train_seconds = time.perf_counter() - t0
    net.eval()
    lossnet.eval()
    t0 = time.perf_counter()
    head = fit_epistemic(net, train_x, train_y, prior_x, prior_y, samples=settings.mc_samples,
                         seed=settings.training.seed)  # fmt: skip
    epistemic_seconds = time.perf_counter() - t0
    # `dal` scores with the classifier a retrain under it fits: here the training
    # images against the held-out ones stand in for labelled and unlabelled
    head = replace(head, discriminator=fit_discriminator(pooled_features(net, train_x),
                                                         pooled_features(net, prior_x)))
    training_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    med, stages = time_costs(net, lossnet, head, settings, val_x, repeats)
    det = med["deterministic"]
    ratios = {path: round(med[path] / det, 3) for path in PATHS}
    # the estimator alone: deterministic trunk + its T samples (+ the density), without the
    # loss predictor, the measures and the gate's decision, which every path shares
    estimator = {path: round((stages[path]["trunk"] + stages[path]["mc"]) / det, 3)
                 for path in PATHS}
    per_strategy = time_strategies(net, lossnet, head, settings, val_x, repeats)
    batch = time_batch(net, lossnet, head, settings, val_x, repeats)
    torch.set_num_threads(training_threads)
    found = quality(net, lossnet, head, settings, val_x, val_y)
    full_gate_ratio = ratios[settings.mc_scope if settings.epistemic == "mc_dropout" else "laplace"]
    laplace_bald = found["estimators"]["laplace"]["error_auroc"]["bald"]
    report = {
        "date": datetime.now(UTC).date().isoformat(),
        "command": "bench/gate_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": args.threads,
            "torch_threads_training": training_threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.machine(),
        },
        "settings": {
            "input_size": settings.input_size,
            "channels": list(settings.channels),
            "mc_samples": settings.mc_samples,
            "default_scope": settings.mc_scope,
            "default_epistemic": settings.epistemic,
            "epochs": epochs,
            "train_images": len(train_y),
            "prior_precision_images": held,
            "repeats": repeats,
        },
        "cost_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "cost_ratio_vs_deterministic": ratios,
        "estimator_cost_ratio_vs_deterministic": estimator,
        "stage_ms": {s: {k: round(v * 1e3, 4) for k, v in d.items()} for s, d in stages.items()},
        "target_laplace_ratio_le_1_5_and_bald_error_auroc_ge_0_93": (
            ratios["laplace"] <= 1.5 and laplace_bald >= 0.93),
        "target_laplace_estimator_ratio_le_1_5_and_bald_error_auroc_ge_0_93": (
            estimator["laplace"] <= 1.5 and laplace_bald >= 0.93),
        "full_gate_ratio": full_gate_ratio,
        # the full gate at the default path under each strategy, over its own
        # deterministic pass (a second interleaved timing loop)
        "strategy_cost_ms": {k: round(v * 1e3, 4) for k, v in per_strategy.items()},
        "strategy_gate_ratio": {k: round(v / per_strategy["deterministic"], 3)
                                for k, v in per_strategy.items() if k != "deterministic"},
        "batch": batch,
        "ood_auroc": found["ood"]["auroc"]["ood"],
        "target_full_gate_ratio_le_1_5": full_gate_ratio <= 1.5,
        "target_ood_auroc_ge_0_95_every_set_and_all": min(
            found["ood"]["auroc"]["ood"].values()) >= 0.95,
        "train_seconds": round(train_seconds, 1),
        "epistemic_fit_seconds": round(epistemic_seconds, 2),
        "train_history_last": {k: round(v, 4) for k, v in history.last.items()},
        "quality": found,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
