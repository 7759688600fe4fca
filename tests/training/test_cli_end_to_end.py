"""`triage retrain` end to end on real PneumoniaMNIST images, through the real CLI and worker.

Reduced scale by default (240 training and 100 validation studies); TRIAGE_FULL_SCALE=1
labels the whole development split (4690 + 516).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import store_environ

from triage.config import load_settings
from triage.training.runs import last_run

from .conftest import FULL_SCALE, Store, subset

CONFIG = """
model:
  input_size: 28
  channels: [8, 16]
  subunits: 1
  lossnet_width: 16
  mc_samples: 5
  training: {{epochs: {epochs}, min_steps: 0, batch_size: 32, learning_rate: 0.003}}
retrain:
  min_train_studies: 4
  min_validation_studies: 2
  validation_source: mixed
  rebalance: true
  poll_seconds: 0.1
"""


def _triage(*args: str, config: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage", *args, "--config", str(config), "--home", str(home)],
        capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("TRIAGE__")},
             **store_environ(home)},
    )


def _setup(tmp_path: Path, epochs: int) -> tuple[Path, Path, Store]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(epochs=epochs))
    home = tmp_path / "home"
    return config, home, Store(load_settings(config, home=home))


@pytest.mark.slow
def test_retrain_command_trains_promotes_and_admins_can_inspect(tmp_path, pneumonia):
    n_train, n_val, epochs = (4690, 516, 10) if FULL_SCALE else (240, 100, 6)
    config, home, st = _setup(tmp_path, epochs)
    x, y = subset(pneumonia, "train", n_train)
    st.labelled(x[:-60], y[:-60], "train")
    xv, yv = subset(pneumonia, "val", n_val)
    st.labelled(xv, yv, "validation")

    start = time.monotonic()
    first = _triage("retrain", config=config, home=home)
    seconds = time.monotonic() - start
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    # progress lines name the epoch (the poller may skip some: epochs take ~0.1 s here)
    assert any(f"/{epochs}: loss" in line for line in lines) and "promoted" in lines[-1]
    run = last_run(st.db)
    auroc = run["metrics"]["candidate"]["auroc"]
    print(f"\nfirst model: val AUROC {auroc:.4f} on {n_val} studies, {run['labels_used']} "
          f"labels, {seconds:.1f} s wall (worker {run['metrics']['seconds']:.1f} s)")
    # a figure, not a verdict (the quality of a training recipe is bench/label_efficiency.py's)
    assert 0.0 <= auroc <= 1.0

    st.labelled(x[-60:], y[-60:], "train")  # new labels; the second run warm-starts
    second = _triage("retrain", config=config, home=home)
    assert second.returncode == 0, second.stderr
    run = last_run(st.db)
    assert run["state"] in ("promoted", "rejected") and run["metrics"]["champion"] is not None
    coverage = run["metrics"]["coverage"]
    assert coverage["rebalanced"]
    print(f"second run: {run['state']}, val AUROC {run['metrics']['candidate']['auroc']:.4f} "
          f"vs serving {run['metrics']['champion']['auroc']:.4f}; coverage radius "
          f"{coverage['radius']:.3f}, class mix {coverage['class_mix_before']} -> "
          f"{coverage['class_mix_after']}")

    shown = _triage("models", "show", "v0001", config=config, home=home)
    assert shown.returncode == 0 and "validation: auroc" in shown.stdout
    full = json.loads(_triage("models", "show", "v0002", "--json", config=config,
                              home=home).stdout)
    assert full["parent"] == "v0001" and full["data_summary"]["train"]["studies"] == n_train
    first_shown = json.loads(_triage("models", "show", "v0001", "--json", config=config,
                                     home=home).stdout)
    assert first_shown["metrics"]["validation"]["auroc"] == pytest.approx(auroc)
    rollback = _triage("models", "rollback", config=config, home=home)
    if run["state"] == "promoted":
        assert rollback.returncode == 0 and rollback.stdout.startswith("v0001 serving")
    else:
        assert rollback.returncode == 1
        assert rollback.stderr.strip().count("\n") == 0
        assert "nothing to roll back" in rollback.stderr
    missing = _triage("models", "show", "v0099", config=config, home=home)
    assert missing.returncode == 1 and missing.stderr.startswith("triage: no model version")


def test_second_retrain_is_refused_and_sigterm_cancels(tmp_path, pneumonia):
    config, home, st = _setup(tmp_path, epochs=5000)
    x, y = subset(pneumonia, "train", 60)
    st.labelled(x, y, "train")
    xv, yv = subset(pneumonia, "val", 20)
    st.labelled(xv, yv, "validation")
    started = _triage("retrain", "--background", config=config, home=home)
    assert started.returncode == 0 and "background" in started.stdout
    refused = _triage("retrain", config=config, home=home)
    assert refused.returncode == 1
    assert refused.stderr.startswith("triage: a retrain is already running (run 1")
    assert "Traceback" not in refused.stderr
    deadline = time.monotonic() + 240  # the worker is niced: slow on a busy machine
    while "epoch" not in (last_run(st.db)["message"] or ""):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    os.kill(last_run(st.db)["pid"], signal.SIGTERM)
    while last_run(st.db)["state"] == "running":
        assert time.monotonic() < deadline + 30
        time.sleep(0.2)
    assert last_run(st.db)["state"] == "failed" and last_run(st.db)["message"] == "cancelled"
    assert st.db.execute("SELECT COUNT(*) FROM models").fetchone()[0] == 0
