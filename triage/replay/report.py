"""The replay's report: ``report.json`` and ``curves.png``, from the daemon's database.

Everything is read from the SQLite file read-only (the daemon keeps running):

- learning curve: one point per retrain run finished during the replay: labels used
  (train + validation studies), the state, the candidate's and the serving model's
  study-level validation AUROC/accuracy (from the run's metrics: the daemon's own
  validation split, which grows with the labels), and optionally an external AUROC of
  the model serving after the run on a fixed evaluation set (the dev ``val`` split when
  the replay streams ``train``; never the holdout), at the operating point stored with
  that model (its temperature and threshold, as the daemon predicts);
- routed fraction: gate decisions of the replayed studies (latest round each), reasons
  of the gate and of the queue (which adds ``coverage``), the cumulative routed fraction
  along the stream;
- the oracle's labels, the budget, seeds and versions;
- ``holdout``: only with ``--holdout-eval``: the final serving model on the holdout
  test split, read once, for the report only.
"""

from __future__ import annotations

import json
import math
import platform
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

HOLDOUT_FILE = "pneumoniamnist_holdout.npz"


def _connect(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _clean(value: Any) -> Any:
    """JSON-safe: NaN and inf become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def baseline(db_path: Path) -> dict[str, Any]:
    """What exists before the replay starts: last retrain run id, serving version."""
    if not db_path.exists():
        return {"last_run_id": 0, "serving_version": None}
    conn = _connect(db_path)
    try:
        run = conn.execute("SELECT MAX(id) FROM retrain_runs").fetchone()[0]
        serving = conn.execute("SELECT version FROM models WHERE status = 'serving'").fetchone()
    except sqlite3.OperationalError:  # schema not there yet
        return {"last_run_id": 0, "serving_version": None}
    finally:
        conn.close()
    return {"last_run_id": run or 0, "serving_version": serving[0] if serving else None}


def study_progress(db_path: Path, uids: set[str]) -> dict[str, int]:
    """How many of ``uids`` are ingested, scored, routed, pending/claimed/labelled."""
    conn = _connect(db_path)
    try:
        rows = conn.execute(
            "SELECT s.study_uid, s.state, q.state AS queue_state FROM studies s "
            "LEFT JOIN queue_items q ON q.study_id = s.id").fetchall()
    except sqlite3.OperationalError:
        return {"ingested": 0, "scored": 0, "routed": 0, "pending": 0, "claimed": 0,
                "labeled": 0}
    finally:
        conn.close()
    mine = [r for r in rows if r["study_uid"] in uids]
    return {
        "ingested": len(mine),
        "scored": sum(r["state"] == "scored" for r in mine),
        "routed": sum(r["queue_state"] is not None for r in mine),
        "pending": sum(r["queue_state"] == "pending" for r in mine),
        "claimed": sum(r["queue_state"] == "claimed" for r in mine),
        "labeled": sum(r["queue_state"] == "labeled" for r in mine),
    }


def retrain_state(db_path: Path, since_run_id: int) -> dict[str, Any]:
    conn = _connect(db_path)
    try:
        rows = conn.execute("SELECT id, state FROM retrain_runs WHERE id > ? ORDER BY id",
                            [since_run_id]).fetchall()
    finally:
        conn.close()
    return {"runs": len(rows), "running": any(r["state"] == "running" for r in rows),
            "promoted": sum(r["state"] == "promoted" for r in rows)}


def learning_curve(db_path: Path, since_run_id: int, serving_before: str | None
                   ) -> list[dict[str, Any]]:
    """One point per retrain run finished after ``since_run_id``."""
    conn = _connect(db_path)
    try:
        runs = conn.execute(
            "SELECT * FROM retrain_runs WHERE id > ? AND state != 'running' ORDER BY id",
            [since_run_id]).fetchall()
        models = {r["version"]: dict(r) for r in conn.execute("SELECT * FROM models")}
    finally:
        conn.close()
    points, serving = [], serving_before
    for run in runs:
        metrics = json.loads(run["metrics"]) if run["metrics"] else {}
        candidate = metrics.get("candidate") or {}
        champion = metrics.get("champion") or None
        if run["state"] == "promoted":
            serving = run["candidate_version"]
            serving_metrics = candidate
        else:
            serving_metrics = champion or {}
        model = models.get(serving) if serving else None
        cand_model = models.get(run["candidate_version"]) if run["candidate_version"] else None
        cand_metrics = json.loads(cand_model["metrics"]) if cand_model and cand_model[
            "metrics"] else {}
        points.append({
            "run_id": run["id"], "trigger": run["trigger"], "state": run["state"],
            "message": run["message"], "started_at": run["started_at"],
            "finished_at": run["finished_at"], "labels_used": run["labels_used"],
            "candidate_version": run["candidate_version"],
            "candidate_auroc": candidate.get("auroc"),
            "candidate_accuracy": candidate.get("accuracy"),
            "champion_auroc": (champion or {}).get("auroc"),
            "validation_n": candidate.get("n"),
            "serving_version": serving,
            "serving_auroc": serving_metrics.get("auroc"),
            "serving_accuracy": serving_metrics.get("accuracy"),
            "serving_path": model["path"] if model else None,
            "epochs_run": cand_metrics.get("epochs_run"),
            "best_epoch": cand_metrics.get("best_epoch"), "seconds": metrics.get("seconds"),
            "rebalanced": (metrics.get("coverage") or {}).get("rebalanced"),
        })
    return points


def routing(db_path: Path, uids: set[str], positions: dict[str, int],
            truth: dict[str, str]) -> dict[str, Any]:
    """Gate decisions and queue reasons of the replayed studies."""
    conn = _connect(db_path)
    try:
        decisions = conn.execute(
            "SELECT d.id, d.study_id, d.round, d.needs_label, d.reason, d.model_version, "
            "d.strategy, d.created_at, s.study_uid FROM decisions d "
            "JOIN studies s ON s.id = d.study_id ORDER BY d.id").fetchall()
        queue = conn.execute(
            "SELECT q.reason, q.state, s.study_uid FROM queue_items q "
            "JOIN studies s ON s.id = q.study_id").fetchall()
        labels = conn.execute(
            "SELECT l.label, l.split, s.study_uid FROM labels l JOIN studies s "
            "ON s.id = l.study_id WHERE l.superseded_by IS NULL").fetchall()
    finally:
        conn.close()
    latest: dict[str, sqlite3.Row] = {}
    all_reasons: dict[str, int] = {}
    for row in decisions:
        if row["study_uid"] in uids:
            latest[row["study_uid"]] = row
            all_reasons[row["reason"]] = all_reasons.get(row["reason"], 0) + 1
    gate_reasons: dict[str, int] = {}
    for row in latest.values():
        gate_reasons[row["reason"]] = gate_reasons.get(row["reason"], 0) + 1
    mine_q = [r for r in queue if r["study_uid"] in uids]
    queue_reasons: dict[str, int] = {}
    for row in mine_q:
        queue_reasons[row["reason"]] = queue_reasons.get(row["reason"], 0) + 1
    scored = len(latest)
    routed_gate = sum(r["needs_label"] for r in latest.values())
    # the stream in scoring order: cumulative routed fraction (first decision per study)
    first: dict[str, sqlite3.Row] = {}
    for row in decisions:
        if row["study_uid"] in uids and row["study_uid"] not in first:
            first[row["study_uid"]] = row
    stream = sorted(first.values(), key=lambda r: r["id"])
    routed_flags = [int(r["needs_label"]) for r in stream]
    cumulative = (np.cumsum(routed_flags) / np.arange(1, len(stream) + 1)).tolist() \
        if stream else []
    mine_labels = [r for r in labels if r["study_uid"] in uids]
    stored_right = sum(r["label"] == truth.get(r["study_uid"]) for r in mine_labels)
    by_version: dict[str, int] = {}
    for row in latest.values():
        key = row["model_version"] or "none (cold start)"
        by_version[key] = by_version.get(key, 0) + 1
    return {
        "scored_studies": scored,
        "routed_by_gate": routed_gate,
        "routed_fraction": routed_gate / scored if scored else None,
        "queued_studies": len(mine_q),
        "queued_fraction": len(mine_q) / scored if scored else None,
        "gate_reasons": dict(sorted(gate_reasons.items())),
        "gate_reasons_all_rounds": dict(sorted(all_reasons.items())),
        "queue_reasons": dict(sorted(queue_reasons.items())),
        "decisions_by_model_version": by_version,
        "strategies": sorted({r["strategy"] for r in latest.values()}),
        "stored_labels": len(mine_labels),
        "stored_labels_matching_truth": stored_right,
        "stored_label_splits": {s: sum(r["split"] == s for r in mine_labels)
                                for s in sorted({str(r["split"]) for r in mine_labels})},
        "cumulative_routed_fraction": [round(v, 4) for v in cumulative],
        "stream_positions_scored": [positions.get(r["study_uid"]) for r in stream],
        "routed_reason_in_stream": [r["reason"] for r in stream],
        "stream_scored_at": [round(r["created_at"], 3) for r in stream],
    }


def eval_tensor(images: np.ndarray, input_size: int):
    """uint8 [N, H, W] through the daemon's own ingest preprocessing (full-range window,
    area resize, pad) to float [N, 1, S, S]: the model is scored on what it was fed."""
    import torch

    from triage.ingest.dicom import DecodedImage
    from triage.ingest.preprocess import preprocess

    window = (127.5, 255.0)
    tensors = [preprocess(DecodedImage(frames=img[None].astype(np.float32), window=window,
                                       invert=False), input_size)
               for img in images]
    return torch.stack([torch.as_tensor(t)[:1] for t in tensors])


def evaluate_checkpoint(path: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Study-level metrics (one image per study) of a registry checkpoint at the operating
    point stored with it, as the daemon predicts: probabilities calibrated with its
    temperature (AUROC is unchanged, ECE is of the calibrated ones), accuracy,
    sensitivity and specificity of the class its threshold picks (argmax for a
    checkpoint without one). The result names the ``operating_point`` used."""
    import torch

    from triage.model.checkpoint import load_checkpoint
    from triage.training.evaluate import classification_metrics, study_probabilities

    checkpoint = load_checkpoint(path)
    point = checkpoint.operating_point
    x = eval_tensor(images, checkpoint.settings.input_size)
    y = torch.as_tensor(np.asarray(labels).reshape(-1).astype(np.int64))
    with torch.no_grad():
        probs = study_probabilities(checkpoint.network, x, torch.arange(len(y)), len(y),
                                    temperature=point.temperature)
    metrics = classification_metrics(probs, y, point)
    return _clean({**metrics, "operating_point": point.to_json()})


def external_curve(points: list[dict[str, Any]], images: np.ndarray, labels: np.ndarray
                   ) -> None:
    """Add ``external_auroc``/``external_accuracy`` of each point's serving model."""
    cache: dict[str, dict[str, Any]] = {}
    for point in points:
        path = point.get("serving_path")
        if not path:
            continue
        if path not in cache:
            cache[path] = evaluate_checkpoint(Path(path), images, labels)
        point["external_auroc"] = cache[path]["auroc"]
        point["external_accuracy"] = cache[path]["accuracy"]


def holdout_eval(model_path: Path, data_dir: Path) -> dict[str, Any]:
    """The final serving model on the holdout test split: the only read of that file."""
    with np.load(data_dir / HOLDOUT_FILE) as archive:
        images, labels = archive["test_images"], archive["test_labels"]
    result = evaluate_checkpoint(model_path, images, labels)
    return {"file": HOLDOUT_FILE, "split": "test", "model_path": str(model_path), **result}


def versions() -> dict[str, str]:
    import pydicom
    import torch

    from triage import __version__

    out = {"triage": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": np.__version__, "pydicom": pydicom.__version__}
    try:
        import matplotlib

        out["matplotlib"] = matplotlib.__version__
    except ImportError:
        pass
    return out


def write_report(out_dir: Path, report: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(_clean(report), indent=2))
    return path


def plot(out_dir: Path, report: dict[str, Any]) -> Path | None:
    """``curves.png``: learning curve, routed fraction along the stream, reasons, labels."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    curve = report["learning_curve"]
    ax = axes[0][0]
    if curve:
        x = [p["labels_used"] or 0 for p in curve]
        for key, style, name in (("serving_auroc", "o-", "serving AUROC (daemon val)"),
                                 ("serving_accuracy", "s--", "serving accuracy (daemon val)"),
                                 ("external_auroc", "^-", "serving AUROC (external eval)"),
                                 ("candidate_auroc", "x:", "candidate AUROC")):
            y = [p.get(key) for p in curve]
            if any(v is not None for v in y):
                ax.plot(x, [np.nan if v is None else v for v in y], style, label=name)
        for p in curve:
            if p["state"] != "promoted":
                ax.annotate(p["state"], (p["labels_used"] or 0, p.get("candidate_auroc") or 0.5),
                            fontsize=7)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no retrain finished", ha="center", transform=ax.transAxes)
    ax.set(title="learning curve", xlabel="labels used (train + validation studies)",
           ylabel="metric", ylim=(0.0, 1.02))
    ax.grid(alpha=0.3)

    ax = axes[0][1]
    routing_ = report["routing"]
    cumulative = routing_["cumulative_routed_fraction"]
    if cumulative:
        ax.plot(np.arange(1, len(cumulative) + 1), cumulative, label="cumulative routed fraction")
        flags = np.array([r not in ("below_threshold", "not_sampled", "cap_reached")
                          for r in routing_["routed_reason_in_stream"]], dtype=float)
        k = max(5, min(50, len(flags) // 10))
        if len(flags) >= k:
            ax.plot(np.arange(k, len(flags) + 1), np.convolve(flags, np.ones(k) / k, "valid"),
                    alpha=0.6, label=f"rolling ({k} studies)")
    target = report["budget"].get("label_rate")
    if target is not None:
        ax.axhline(target, color="k", linestyle=":", label=f"label_rate {target}")
    for p in curve:
        if p["state"] == "promoted" and p.get("scored_before") is not None:
            ax.axvline(p["scored_before"], color="g", alpha=0.3)
    ax.set(title="routed fraction along the stream (green: promotions)",
           xlabel="studies scored", ylabel="fraction routed", ylim=(0, 1.02))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    reasons = {**{f"gate:{k}": v for k, v in routing_["gate_reasons"].items()},
               **{f"queue:{k}": v for k, v in routing_["queue_reasons"].items()}}
    if reasons:
        ax.barh(list(reasons), list(reasons.values()))
    ax.set(title="decision reasons (latest per study) and queue reasons", xlabel="studies")

    ax = axes[1][1]
    labels_ = report["oracle"].get("records", [])
    if labels_:
        names = sorted({r["truth"] for r in labels_})
        for name in names:
            ax.plot(np.cumsum([r["truth"] == name for r in labels_]), label=f"truth {name}")
        ax.legend(fontsize=8)
    ax.set(title="oracle labels by true class", xlabel="labels given", ylabel="count")
    ax.grid(alpha=0.3)
    meta = report["replay"]
    fig.suptitle(f"triage replay: {meta['source']} {meta.get('split') or ''} n={meta['studies']} "
                 f"order={meta['order']} strategy={report['budget'].get('strategy')} "
                 f"seed={meta['seed']}", fontsize=11)
    fig.tight_layout()
    path = out_dir / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
