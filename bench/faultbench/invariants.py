"""The bench's own invariants, beside those of tests/faults_support.py: leases no
longer than the daemon grants, retrain runs and candidates that end, acknowledged labels
stored; and the definitions of the kinds of breakage the report counts."""

from __future__ import annotations

import re
from pathlib import Path

from faults_support import Problem

from faultbench.common import LEASE_SECONDS, read_rows


def lease_problems(home: Path, now: float) -> list[Problem]:
    """A claim whose lease runs longer than any lease the daemon grants from ``now``: it
    was granted before the clock went back, and holds a dead reader's study for that
    much longer."""
    rows = read_rows(home, "SELECT study_id, lease_expires_at FROM queue_items WHERE "
                           "state = 'claimed' AND lease_expires_at > ?",
                     [now + LEASE_SECONDS + 1.0])
    return [Problem("stuck", f"study {sid}: claim held longer than the {LEASE_SECONDS:g} s "
                             "lease from now") for sid, _ in rows]


def retrain_problems(home: Path) -> list[Problem]:
    """Runs and their candidates: no run `running` without its process, no candidate of
    an ended run, a `promoted` run's candidate promoted, no run failed by an unexpected
    exception (a crash, not a refusal), no temporary files left. (An admin may promote
    a rejected candidate later: a serving model's run need not say `promoted`.)"""
    from triage.training.runs import pid_alive

    out = []
    runs = {rid: (state, pid, message, version) for rid, state, pid, message, version in
            read_rows(home, "SELECT id, state, pid, message, candidate_version FROM "
                            "retrain_runs")}
    promoted = {v for (v,) in read_rows(home, "SELECT version FROM models WHERE "
                                              "promoted_at IS NOT NULL")}
    for rid, (state, pid, message, version) in runs.items():
        if state == "running" and pid is not None and not pid_alive(pid):
            out.append(Problem("stuck", f"retrain run {rid} running, its process is gone"))
        if state == "promoted" and version not in promoted:
            out.append(Problem("other", f"retrain run {rid} promoted, {version} never was"))
        if state == "failed" and re.match(r"[A-Z]\w*(Error|Exception): ", message or ""):
            out.append(Problem("other", f"retrain run {rid} crashed: {message}"))
    for version, status, source in read_rows(home, "SELECT version, status, source FROM models "
                                                   "WHERE source LIKE 'retrain:%'"):
        run = runs.get(int(source.split(":")[1]))
        run_state = run[0] if run else None
        if status == "candidate" and run_state not in ("running", "succeeded"):
            out.append(Problem("stuck", f"{version} left candidate by run state {run_state}"))
    for path in (home / "models").glob(".retrain-*.pt"):
        rid = int(path.name.split("-")[1].split(".")[0])
        if runs.get(rid, ("?",))[0] != "running":
            out.append(Problem("other", f"left-over temporary file models/{path.name}"))
    for path in (home / "models").glob("*/*.partial"):
        out.append(Problem("other", f"left-over temporary file {path.relative_to(home)}"))
    for path in (home / "retrain").glob("run-*.json"):
        rid = int(path.stem.split("-")[1])
        if runs.get(rid, ("?",))[0] != "running":
            out.append(Problem("other", f"left-over settings file retrain/{path.name}"))
    if not any(run[0] == "running" for run in runs.values()):
        versions = {v for (v,) in read_rows(home, "SELECT version FROM models")}
        for folder in (home / "models").glob("v[0-9]*"):
            if folder.is_dir() and folder.name not in versions:
                out.append(Problem("other", f"model folder {folder.name} without a row"))
    return out


def label_answers(home: Path, acked: dict[int, str]) -> list[Problem]:
    """Every label the API acknowledged (201) is the study's stored, current label."""
    out = []
    for study_id, value in acked.items():
        rows = read_rows(home, "SELECT label FROM labels WHERE study_id = ? AND "
                               "superseded_by IS NULL", [study_id])
        if not rows:
            out.append(Problem("lost", f"acknowledged label of study {study_id} not stored"))
        elif rows[0][0] != value:
            out.append(Problem("other", f"study {study_id}: stored {rows[0][0]}, "
                                        f"acknowledged {value}"))
    return out


DEFINITIONS = {
    "lost": "a dropped file with no row or no final state; a stored file gone or changed "
            "(not the one damaged on purpose); a routed study without its queue item; an "
            "acknowledged label not stored; no serving version after a promotion",
    "duplicated": "two rows for one inbox file; a final file still in the inbox; two "
                  "instances of one SOP UID; both copies of a resend archived; a study round "
                  "decided twice; two serving models; two current labels of a study; a "
                  "second label accepted",
    "stuck": "after settling: a file in the inbox or in flight; a study open, complete or "
             "scoring; waiting_model while a version loads; an error study without reason "
             "or with an overdue retry; a running retrain without its process; a candidate "
             "of an ended run; a lease longer than the daemon grants",
    "flooded": "per trial, queue items routed beyond label_rate x decisions + 3 sigma + 2, "
               "or routed cold_start after a promotion",
    "other": "any other broken invariant (a retrain run crashed, temporary files left, "
             "tracebacks...), listed in details",
}
