"""`triage retrain` and `triage models show | rollback` (called from `triage.cli`).

Errors are raised as `TriageError` (the CLI prints one line and exits 1).
"""

from __future__ import annotations

import json
import signal
import time
from typing import TYPE_CHECKING

from triage.model.registry import ModelRegistry
from triage.store import db as store
from triage.training.scheduler import RetrainScheduler

if TYPE_CHECKING:
    from triage.config import Settings


def run_retrain_command(settings: Settings, *, background: bool) -> int:
    """Start a manual run; in the foreground print its progress until it ends.

    Returns:
        0 when the run ended promoted, rejected or succeeded (or was started in the
        background), 1 when it failed or was interrupted.

    Raises:
        RetrainBusy: A run is already running.
    """
    scheduler = RetrainScheduler(settings, settings.database())
    run_id = scheduler.start("manual")
    proc = scheduler.processes[run_id]
    if background:
        print(f"retrain run {run_id} started in the background (pid {proc.pid}); "
              "`triage status` shows its progress")
        return 0
    print(f"retrain run {run_id} started (pid {proc.pid})", flush=True)
    shown = None
    try:
        while True:
            row = _row(settings, run_id)
            line = f"[{100 * row['progress']:3.0f}%] {row['message']}"
            if line != shown:
                print(line, flush=True)
                shown = line
            if row["state"] != "running":
                break
            if proc.poll() is not None:
                scheduler.check()  # the worker is gone: a still-running row is marked failed
                continue
            time.sleep(settings.retrain.poll_seconds)
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        print(f"retrain run {run_id} cancelled")
        return 1
    proc.wait(timeout=60)
    print(f"retrain run {run_id} {row['state']}: {row['message']}")
    return 1 if row["state"] == "failed" else 0


def _row(settings: Settings, run_id: int) -> dict:
    db = store.connect(settings.database(), readonly=True)
    try:
        return next(db.query("SELECT * FROM retrain_runs WHERE id = ?", [run_id]))
    finally:
        db.close()


def models_show(registry: ModelRegistry, version: str, as_json: bool) -> int:
    """Print one version: status, parent, metrics, data summary (label ids in JSON only)."""
    entry = registry.show(version)
    if as_json:
        print(json.dumps(entry, indent=2))
        return 0
    print(f"{entry['version']}  {entry['status']}  (source {entry['source']}, "
          f"parent {entry['parent'] or '-'})")
    print(f"created {entry['created_at']}  promoted {entry['promoted_at'] or '-'}")
    if entry["note"]:
        print(f"note: {entry['note']}")
    metrics = (entry["metrics"] or {}).get("validation")
    if metrics:
        print("validation: " + ", ".join(
            f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in metrics.items()))
    summary = entry["data_summary"] or {}
    for split in ("train", "validation"):
        if split in summary:
            part = summary[split]
            print(f"{split}: {part['studies']} studies, {part['images']} images, "
                  f"classes {part['classes']}")
    if summary.get("coverage", {}).get("rebalanced"):
        cover = summary["coverage"]
        print(f"coverage: radius {cover['radius']:.4f} over {cover['cells']} cells, class mix "
              f"{_mix(cover['class_mix_before'])} -> {_mix(cover['class_mix_after'])}")
    return 0


def _mix(mix: dict[str, float]) -> str:
    return "/".join(f"{name} {share:.2f}" for name, share in mix.items())


def models_rollback(registry: ModelRegistry) -> int:
    """Serve the previously promoted version; print what changed."""
    before = registry.serving()
    entry = registry.rollback(note="rolled back by an admin")
    print(f"{entry.version} serving (was {before.version if before else '-'})")
    return 0
