"""Fault-injection bench: kill, corrupt and starve the real daemon, restart it, count
what broke.

    .venv/bin/python bench/faults.py                      # 20 trials per scenario
    .venv/bin/python bench/faults.py --trials 2 --out /tmp/faults.json
    .venv/bin/python bench/faults.py --scenarios sqlite_busy,clock_jump --trials 5
    .venv/bin/python bench/faults.py --store postgresql    # the same on PostgreSQL

Every scenario runs the real ``triage serve`` subprocess on its own state directory,
with real DICOM files dropped into its inbox, reviewers working through the HTTP API and
(retrain scenarios) real training subprocesses. Each trial injects its fault at a point
a seeded RNG picks (``--seed``), restarts the daemon, waits for it to settle and checks
the invariants of tests/faults_support.py (shared with tests/test_fault_harness.py):

* ``lost``: a dropped file with no row or no final state, a stored file gone or changed
  (other than the one the fault damaged on purpose), a routed study without its queue
  item, an acknowledged label (HTTP 201) not stored, promoted versions but none serving.
* ``duplicated``: two rows for one inbox file, a final file still in the inbox, two
  instances of one SOP Instance UID, both copies of a resend archived, a study round
  decided twice, two serving models, two current labels of a study, a second label
  accepted for a labelled study.
* ``stuck``: once settled (or at the settle deadline), a file in the inbox or in flight,
  a study ``open``/``complete``/``scoring``, ``waiting_model`` while a version loads, an
  ``error`` study without a reason or whose retry is overdue (one whose retries are spent
  is left for an operator: terminal), a ``running`` retrain whose process is gone, a
  ``candidate`` of a run that ended, a claim whose lease is longer than the daemon grants.
* ``flooded``: per trial, queue items routed beyond ``label_rate x decisions`` plus a
  binomial slack (3 sigma + 2), or routed as ``cold_start`` after a version was promoted
  (the cold-start flood of a serving model that cannot be loaded); coverage items of a
  promoted retrain are excluded (their share is allowed on top).
* ``other``: any other broken invariant (database integrity, labels against the audit
  trail, queue reasons, orphan or temporary files, a retrain run that crashed on an
  unexpected exception, tracebacks or patient identifiers in the logs, an image endpoint
  that fails without naming the cause). Listed in ``details``.

Writes ``bench/results/faults.json`` (``--out``) and prints the same JSON. Each scenario
says which mechanism ran (``mechanism``), e.g. whether disk full was a real ENOSPC on a
small tmpfs or the back-pressure setting, and how the clock was moved.

This file is the runner: which scenarios there are, one fresh rig for each, the report.
The rest is in bench/faultbench/: ``rig`` (a scenario's daemon, reviewers and books),
``invariants`` (the bench's own checks and the definitions above), ``kills`` and
``damage`` (the scenarios), ``common`` (the settings they share).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultbench import REPO  # noqa: E402 - also puts the repository and tests/ on sys.path
from faultbench.common import BASE_ENV, read_rows  # noqa: E402
from faultbench.damage import (  # noqa: E402
    clock_jump,
    corrupt_serving_model,
    disk_full,
    sqlite_busy,
    unreadable_archive_file,
)
from faultbench.invariants import DEFINITIONS  # noqa: E402
from faultbench.kills import (  # noqa: E402
    kill_during_ingest,
    kill_during_label,
    kill_during_promotion,
    kill_during_retrain,
    kill_during_scoring,
)
from faultbench.rig import Rig  # noqa: E402
from triage.store.db import DATABASE_ERRORS  # noqa: E402
from faults_support import KINDS, log_problems, store_exists, use_store  # noqa: E402

RESULTS = REPO / "bench" / "results" / "faults.json"

SCENARIOS: dict[str, Callable[[Rig, int], None]] = {
    "kill_during_ingest": kill_during_ingest,
    "kill_during_scoring": kill_during_scoring,
    "kill_during_label": kill_during_label,
    "kill_during_retrain": kill_during_retrain,
    "kill_during_promotion": kill_during_promotion,
    "corrupt_serving_model": corrupt_serving_model,
    "unreadable_archive_file": unreadable_archive_file,
    "disk_full": disk_full,
    "sqlite_busy": sqlite_busy,
    "clock_jump": clock_jump,
}


def run_scenario(name: str, trials: int, seed: int = 0, workdir: Path | None = None,
                 store_url: str | None = None) -> dict:
    """Run ``trials`` trials of one scenario in a fresh state directory (its store in
    the PostgreSQL database ``store_url`` when given); its summary."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"faults-{name}-")) if own else workdir
    rig = Rig(name, workdir, seed, dict(BASE_ENV))
    if store_url is not None:
        rig.env["TRIAGE__STORE__URL"] = store_url
        use_store(rig.home, store_url)
    started = time.monotonic()
    try:
        SCENARIOS[name](rig, trials)
        if name != "disk_full":  # disk_full reads its logs before unmounting
            rig.record(log_problems(rig.home, rig.stderr))
    except Exception:  # noqa: BLE001 - a harness failure is reported, not hidden
        rig.note("other", f"harness error: {traceback.format_exc()[-2000:]}")
    finally:
        if rig.proc is not None and rig.proc.alive:
            rig.proc.kill()
        _kill_workers(rig)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return rig.summary(trials, time.monotonic() - started)


def _kill_workers(rig: Rig) -> None:
    """Training subprocesses this scenario's daemons left running (own session)."""
    try:
        pids = read_rows(rig.home, "SELECT pid FROM retrain_runs WHERE state = 'running' "
                                   "AND pid IS NOT NULL") if store_exists(rig.home) else []
    except DATABASE_ERRORS:  # a PostgreSQL database no daemon migrated
        pids = []
    for (pid,) in pids:
        try:
            if str(rig.home).encode() in Path(f"/proc/{pid}/environ").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "root": os.geteuid() == 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per scenario")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0, help="master seed of the fault points")
    parser.add_argument("--store", choices=("sqlite", "postgresql"), default="sqlite",
                        help="postgresql: each scenario's store is a database on a private "
                        "server (tests/pg_server.py); the default output is then "
                        "bench/results/faults.postgres.json")
    args = parser.parse_args(argv)
    if args.store == "postgresql" and args.out == RESULTS:
        args.out = RESULTS.with_name("faults.postgres.json")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    started = time.time()
    results: list[dict] = []
    command = "bench/faults.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def report(complete: bool) -> dict:
        return {
            "scenarios": results,
            "complete": complete,  # False: written after each scenario of a run under way
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1),
            "seed": args.seed,
            "machine": _machine(),
            "definitions": DEFINITIONS,
        }

    def on_sigterm(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: daemons killed, tmpfs unmounted

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server = None
    if args.store == "postgresql":
        from pg_server import PostgresServer, missing_reason

        if missing_reason() is not None:
            parser.error(missing_reason())
        server = PostgresServer().start()
    try:
        for name in names:
            result = run_scenario(name, args.trials, args.seed,
                                  store_url=server.new_database() if server else None)
            result["store"] = args.store
            results.append(result)
            print(json.dumps({k: result[k] for k in ("name", "trials", "lost", "duplicated",
                                                      "stuck", "flooded", "other", "seconds")}),
                  file=sys.stderr, flush=True)
            if len(results) < len(names):  # a run killed midway keeps what it measured
                args.out.write_text(json.dumps(report(False), indent=2) + "\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()
    final = report(True)
    args.out.write_text(json.dumps(final, indent=2) + "\n")
    print(json.dumps(final, indent=2))
    return 0 if all(sum(r[k] for k in (*KINDS, "flooded")) == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
