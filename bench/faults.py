"""Fault-injection bench: kill, corrupt and starve the real daemon, restart it, count
what broke.

    .venv/bin/python bench/faults.py                      # 20 trials per scenario
    .venv/bin/python bench/faults.py --trials 2 --out /tmp/faults.json
    .venv/bin/python bench/faults.py --scenarios sqlite_busy,clock_jump --trials 5

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from faults_support import (  # noqa: E402
    FAST_ENV,
    KINDS,
    Batch,
    HarnessDaemon,
    Problem,
    all_expected,
    always_problems,
    connect_ro,
    decisions,
    final_files,
    final_problems,
    kill_at,
    log_problems,
    plan_kills,
    scalar,
    settled,
    single_studies,
    wait_until,
    wave_one,
    wave_two,
)

from triage.store import db as store  # noqa: E402

RESULTS = REPO / "bench" / "results" / "faults.json"
LABEL_RATE = 0.3
LEASE_SECONDS = 6.0
RETRY_WAITS = (1.0, 2.0)
SETTLE_SECONDS = 60.0
LOCK_SECONDS = 10.0

# Every scenario: short settle and stable ages, a tiny network (fast scoring and
# training), a short lease and error backoff so recovery is seen within a trial.
BASE_ENV = {
    **FAST_ENV,
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "1",
    "TRIAGE__GATE__LABEL_RATE": str(LABEL_RATE),
    "TRIAGE__GATE__WARMUP": "5",
    "TRIAGE__GATE__WINDOW": "50",
    "TRIAGE__RETRAIN__ENABLED": "false",
    "TRIAGE__STUDIES__ERROR_RETRY_SECONDS": json.dumps(list(RETRY_WAITS)),
    "TRIAGE__REVIEW__LEASE_MINUTES": str(LEASE_SECONDS / 60),
    "TRIAGE__MODEL__INPUT_SIZE": "32",
    "TRIAGE__MODEL__CHANNELS": "[8, 16]",
    "TRIAGE__MODEL__SUBUNITS": "1",
    "TRIAGE__MODEL__LOSSNET_WIDTH": "16",
    "TRIAGE__MODEL__MC_SAMPLES": "5",
    "TRIAGE__MODEL__TRAINING__EPOCHS": "1",
    "TRIAGE__MODEL__TRAINING__MIN_STEPS": "0",
    "TRIAGE__MODEL__TRAINING__BATCH_SIZE": "16",
    "TRIAGE__RETRAIN__MIN_NEW_LABELS": "6",
    "TRIAGE__RETRAIN__MIN_TRAIN_STUDIES": "4",
    "TRIAGE__RETRAIN__MIN_VALIDATION_STUDIES": "2",
    "TRIAGE__RETRAIN__VALIDATION_SOURCE": "mixed",
    "TRIAGE__RETRAIN__VALIDATION_FRACTION": "0.4",
    "TRIAGE__RETRAIN__AUGMENT": "false",
    "TRIAGE__RETRAIN__COVERAGE_QUERIES": "2",
}
RETRAIN_ENV = {
    "TRIAGE__RETRAIN__ENABLED": "true",
    "TRIAGE__GATE__LABEL_RATE": "1.0",  # every study is routed, so every one can be labelled
    "TRIAGE__GATE__EXPLORATION_RATE": "0",
}
CLASSES = ("normal", "pneumonia")


# -- one scenario's state directory, daemon and books --------------------------------------


class Reviewer:
    """A radiologist working through the HTTP API with their own token."""

    def __init__(self, home: Path, name: str) -> None:
        from triage.review.auth import create_token

        db = store.connect(home / "triage.db")
        try:
            _, self.token = create_token(db, name=name, role="radiologist")
        finally:
            db.close()
        self.name = name

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def post(self, url: str, path: str, body: dict | None = None,
             timeout: float = 40.0) -> httpx.Response | None:
        """The response, or None when the daemon did not answer (killed, down)."""
        try:
            return httpx.post(url + path, json=body, headers=self.headers, timeout=timeout)
        except httpx.HTTPError:
            return None

    def claim_next(self, url: str) -> int | None:
        response = self.post(url, "/api/queue/next")
        if response is None or response.status_code != 200:
            return None
        return int(response.json()["study_id"])

    def claim(self, url: str, study_id: int) -> int | None:
        response = self.post(url, f"/api/studies/{study_id}/claim")
        return None if response is None else response.status_code

    def label(self, url: str, study_id: int, value: str) -> int | None:
        response = self.post(url, f"/api/studies/{study_id}/label", {"label": value})
        return None if response is None else response.status_code


@dataclass
class Rig:
    """One scenario: its state directory, daemon, what was dropped, and what broke."""

    name: str
    workdir: Path
    seed: int
    env: dict[str, str]
    prefix: list[str] = field(default_factory=list)
    label_rate: float = LABEL_RATE
    batch: Batch = field(default_factory=Batch)
    proc: HarnessDaemon | None = None
    problems: dict[tuple[str, str], None] = field(default_factory=dict)
    flooded: int = 0
    damaged: set[str] = field(default_factory=set)
    acked: dict[int, str] = field(default_factory=dict)  # study id -> label answered 201
    points: Counter = field(default_factory=Counter)  # fault points exercised, by kind
    mechanism: set[str] = field(default_factory=set)
    stderr: Path | None = None
    clock_offset: Callable[[], float] = lambda: 0.0
    flood_details: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.workdir / "home"

    @property
    def inbox(self) -> Path:
        return self.home / "inbox"

    @property
    def scratch(self) -> Path:
        return self.workdir / "scratch"

    @property
    def url(self) -> str:
        assert self.proc is not None
        return self.proc.url

    def rng(self, trial: int, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}/{self.name}/{trial}/{salt}")

    def settings(self):  # type: ignore[no-untyped-def]
        from triage.config import load_settings

        return load_settings(REPO / "config.yaml", home=self.home,
                             environ={**os.environ, **self.env})

    # -- the daemon ----------------------------------------------------------------------

    def new_proc(self, env: dict[str, str] | None = None) -> HarnessDaemon:
        self.home.mkdir(parents=True, exist_ok=True)
        proc = HarnessDaemon(self.home, {**self.env, **(env or {})}, self.prefix)
        if self.stderr is not None:
            proc.log = self.stderr
        self.proc = proc
        return proc

    def start(self, env: dict[str, str] | None = None) -> HarnessDaemon:
        return self.new_proc(env).start()

    def kill(self) -> None:
        if self.proc is not None and self.proc.alive:
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is not None and self.proc.alive:
            self.proc.stop(signal.SIGTERM)

    def restart(self, env: dict[str, str] | None = None) -> HarnessDaemon:
        self.kill()
        return self.start(env)

    # -- books ---------------------------------------------------------------------------

    def record(self, problems: list[Problem]) -> None:
        for problem in problems:
            self.problems.setdefault((problem.kind, problem.detail), None)

    def note(self, kind: str, detail: str) -> None:
        self.record([Problem(kind, detail)])

    def settle(self, timeout: float = SETTLE_SECONDS,
               extra: Callable[[], bool] | None = None, waiting_ok: bool = False) -> bool:
        done = ("scored", "unscoreable", "out_of_scope", "error") + (
            ("waiting_model",) if waiting_ok else ())

        def quiet() -> bool:
            return settled(self.home, self.batch, done) and scalar(
                self.home, "SELECT COUNT(*) FROM studies WHERE state = 'error' AND "
                           "error_count <= ?", [len(RETRY_WAITS)]) == 0 and (
                extra is None or extra())
        return wait_until(quiet, timeout, poll=0.1)

    def check_always(self) -> None:
        if (self.home / "triage.db").exists():
            self.record(always_problems(self.home, self.damaged))

    def check_final(self, *, waiting_ok: bool = False) -> None:
        now = time.time() + self.clock_offset()

        def rule(state: str, row: dict) -> str | None:
            if state in ("scored", "unscoreable", "out_of_scope"):
                return None
            if state == "waiting_model" and waiting_ok:
                return None
            if state == "error":
                if not row["error_reason"]:
                    return "ended error without a reason"
                count = row["error_count"]
                if 1 <= count <= len(RETRY_WAITS):
                    failed_at = row["last_result_at"] or 0.0
                    if now > failed_at + RETRY_WAITS[count - 1] + 10.0:
                        return f"error retry {count} overdue"
                return None  # retried later, or left for an operator: terminal
            return f"left {state}"

        problems, _ = final_problems(self.home, self.batch, damaged=self.damaged,
                                     study_rule=rule, strict_results=False)
        self.record(problems)
        self.record(_lease_problems(self.home, now))
        self.record(_retrain_problems(self.home))
        self.record(_label_answers(self.home, self.acked))

    def snapshot(self) -> tuple[int, int]:
        """Where the decision and queue tables stand before a fault."""
        return (scalar(self.home, "SELECT COALESCE(MAX(id), 0) FROM decisions"),
                scalar(self.home, "SELECT COALESCE(MAX(id), 0) FROM queue_items"))

    def measure_flood(self, since: tuple[int, int]) -> None:
        """Queue growth since ``since`` against the label rate (see the module doc)."""
        decision_id, item_id = since
        n = scalar(self.home, "SELECT COUNT(*) FROM decisions WHERE id > ?", [decision_id])
        routed = scalar(self.home, "SELECT COUNT(*) FROM queue_items WHERE id > ? AND "
                                   "reason != 'coverage'", [item_id])
        p = self.label_rate
        allowed = p * n + 3 * math.sqrt(n * p * (1 - p)) + 2
        excess = max(0, math.ceil(routed - allowed))
        cold = scalar(self.home, (
            "SELECT COUNT(*) FROM decisions WHERE id > ? AND needs_label = 1 AND "
            "reason = 'cold_start' AND created_at > (SELECT MIN(promoted_at) FROM models)"
        ), [decision_id])
        if max(excess, cold):
            self.flood_details.append(f"{routed} routed of {n} decided (allowed {allowed:.1f})"
                                      f", {cold} cold-start routes after a promotion")
        self.flooded += max(excess, cold)

    def summary(self, trials: int, seconds: float) -> dict:
        counts = Counter(kind for kind, _ in self.problems)
        details = [f"{kind}: {detail}" for kind, detail in self.problems][:40] + [
            f"flooded: {detail}" for detail in self.flood_details]
        return {
            "name": self.name, "trials": trials,
            "lost": counts["lost"], "duplicated": counts["duplicated"],
            "stuck": counts["stuck"], "flooded": self.flooded, "other": counts["other"],
            "seconds": round(seconds, 1),
            "mechanism": sorted(self.mechanism),
            "fault_points": dict(sorted(self.points.items())),
            "details": details,
        }


def _lease_problems(home: Path, now: float) -> list[Problem]:
    """A claim whose lease runs longer than any lease the daemon grants from ``now``: it
    was granted before the clock went back, and holds a dead reader's study for that
    much longer."""
    rows = _rows(home, "SELECT study_id, lease_expires_at FROM queue_items WHERE "
                       "state = 'claimed' AND lease_expires_at > ?",
                 [now + LEASE_SECONDS + 1.0])
    return [Problem("stuck", f"study {sid}: claim held longer than the {LEASE_SECONDS:g} s "
                             "lease from now") for sid, _ in rows]


def _retrain_problems(home: Path) -> list[Problem]:
    """Runs and their candidates: no run `running` without its process, no candidate of
    an ended run, a `promoted` run's candidate promoted, no run failed by an unexpected
    exception (a crash, not a refusal), no temporary files left. (An admin may promote
    a rejected candidate later: a serving model's run need not say `promoted`.)"""
    from triage.training.runs import pid_alive

    out = []
    runs = {rid: (state, pid, message, version) for rid, state, pid, message, version in
            _rows(home, "SELECT id, state, pid, message, candidate_version FROM "
                        "retrain_runs")}
    promoted = {v for (v,) in _rows(home, "SELECT version FROM models WHERE "
                                          "promoted_at IS NOT NULL")}
    for rid, (state, pid, message, version) in runs.items():
        if state == "running" and pid is not None and not pid_alive(pid):
            out.append(Problem("stuck", f"retrain run {rid} running, its process is gone"))
        if state == "promoted" and version not in promoted:
            out.append(Problem("other", f"retrain run {rid} promoted, {version} never was"))
        if state == "failed" and re.match(r"[A-Z]\w*(Error|Exception): ", message or ""):
            out.append(Problem("other", f"retrain run {rid} crashed: {message}"))
    for version, status, source in _rows(home, "SELECT version, status, source FROM models "
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
        versions = {v for (v,) in _rows(home, "SELECT version FROM models")}
        for folder in (home / "models").glob("v[0-9]*"):
            if folder.is_dir() and folder.name not in versions:
                out.append(Problem("other", f"model folder {folder.name} without a row"))
    return out


def _label_answers(home: Path, acked: dict[int, str]) -> list[Problem]:
    """Every label the API acknowledged (201) is the study's stored, current label."""
    out = []
    for study_id, value in acked.items():
        rows = _rows(home, "SELECT label FROM labels WHERE study_id = ? AND "
                           "superseded_by IS NULL", [study_id])
        if not rows:
            out.append(Problem("lost", f"acknowledged label of study {study_id} not stored"))
        elif rows[0][0] != value:
            out.append(Problem("other", f"study {study_id}: stored {rows[0][0]}, "
                                        f"acknowledged {value}"))
    return out


def _rows(home: Path, sql: str, params: list | None = None) -> list[tuple]:
    if not (home / "triage.db").exists():
        return []
    conn = connect_ro(home)
    try:
        return conn.execute(sql, params or []).fetchall()
    finally:
        conn.close()


def _write(home: Path, sql: str, params: list | None = None) -> None:
    conn = sqlite3.connect(home / "triage.db", timeout=30)
    try:
        with conn:
            conn.execute(sql, params or [])
    finally:
        conn.close()


def _import_model(rig: Rig, seed: int) -> str:
    """A random-weight tiny network registered and promoted (what `triage models import
    --promote` does); its version."""
    import torch

    from triage.model.checkpoint import save_checkpoint
    from triage.model.lossnet import build_loss_predictor
    from triage.model.network import build_network
    from triage.model.registry import ModelRegistry

    settings = rig.settings()
    torch.manual_seed(seed)
    path = save_checkpoint(rig.workdir / f"import-{seed}.pt", build_network(settings.model),
                           build_loss_predictor(settings.model), settings.model)
    db = store.connect(rig.home / "triage.db")
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        entry = registry.add(path, source=f"import:{path.name}")
        return registry.promote(entry.version, note="fault bench").version
    finally:
        db.close()


def _routed_pending(rig: Rig) -> list[int]:
    return [r[0] for r in _rows(rig.home, "SELECT study_id FROM queue_items WHERE "
                                          "state = 'pending' ORDER BY id")]


def _drop_and_decide(rig: Rig, first_uid: int, count: int, prefix: str,
                     timeout: float = 30.0) -> None:
    """Drop ``count`` one-image studies and wait until each is decided or waiting."""
    uids = single_studies(rig.inbox, rig.scratch, first_uid, count, rig.batch, prefix)
    marks = ", ".join("?" * len(uids))
    wait_until(lambda: scalar(rig.home, "SELECT COUNT(*) FROM studies WHERE state IN "
                                        "('scored','waiting_model','error','unscoreable',"
                                        f"'out_of_scope') AND study_uid IN ({marks})",
                              uids) >= count, timeout, 0.1)


# -- scenarios -----------------------------------------------------------------------------


def kill_trials(rig: Rig, trials: int, kinds: tuple[str, ...]) -> None:
    """Waves of files; each trial kills the daemon at a seeded point of ``kinds`` (a
    second wave arrives after the kill), then restarts it and lets it settle."""
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        seed = 1000 * rig.seed + t
        wave_one(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        plan = plan_kills(rng, 1, len(all_expected(rig.batch)) + 4, kinds,
                          files_done=final_files(rig.home))
        for n, (kind, target) in enumerate(plan):
            proc = rig.new_proc()
            base = decisions(rig.home)
            point = kill_at(proc, kind, target, base, rig.batch, max_decisions=base + 5)
            # the kind, and whether it landed or fell back: "(drained)", "(timeout)"
            rig.points[point.split("@")[0].split("+")[0] + "".join(
                f" {part}" for part in ("(drained)", "(timeout)") if part in point)] += 1
            rig.check_always()
            if n == 0:
                wave_two(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        rig.start()
        rig.settle()
        rig.check_final()
        rig.measure_flood(since)
        rig.kill()  # checked: the next trial starts from a SIGKILL too


def kill_during_ingest(rig: Rig, trials: int) -> None:
    rig.mechanism.add("SIGKILL of `triage serve` at seeded points: during start-up, after "
                      "k files are final, the moment a file is reading/moving, or during "
                      "an orderly stop")
    kill_trials(rig, trials, ("startup", "files", "files", "in_flight", "in_flight",
                              "shutdown"))


def kill_during_scoring(rig: Rig, trials: int) -> None:
    rig.mechanism.add("SIGKILL while a study is `scoring` (a promoted tiny network, MC "
                      "dropout), after k new decisions, or during an orderly stop")
    rig.start()
    _import_model(rig, 1)
    rig.stop()
    kill_trials(rig, trials, ("scoring", "scoring", "scoring", "decisions", "shutdown"))


def kill_during_label(rig: Rig, trials: int) -> None:
    """A reviewer claims through the API; the daemon is SIGKILLed after the claim, while
    the label request is in flight, or just after its answer. After the restart either
    the same reviewer resumes (label again: stored once, or refused as already labelled)
    or the lease runs out (start-up recovery) and another reviewer takes the study."""
    rig.mechanism.add("SIGKILL between POST /api/queue/next and POST .../label (after the "
                      "claim, during the label request, after its 201)")
    rig.label_rate = 0.5
    rig.env["TRIAGE__GATE__LABEL_RATE"] = "0.5"
    rig.start()
    readers = [Reviewer(rig.home, "reader-a"), Reviewer(rig.home, "reader-b")]
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        for attempt in range(3):
            _drop_and_decide(rig, 10_000 + 100 * t + 10 * attempt, 6, f"t{t}/{attempt}/")
            if _routed_pending(rig):
                break
        first = readers[0]
        study = first.claim_next(rig.url)
        if study is None:
            rig.note("other", f"trial {t}: nothing to claim")
            continue
        value = rng.choice(CLASSES)
        point = rng.choice(("after_claim", "during_label", "after_label"))
        answer: list[int | None] = []
        if point == "after_claim":
            time.sleep(rng.uniform(0, 0.3))
        elif point == "during_label":
            def send(out=answer, who=first, url=rig.url, sid=study, value=value) -> None:
                out.append(who.label(url, sid, value))

            sender = threading.Thread(target=send)
            sender.start()
            time.sleep(rng.uniform(0, 0.03))
        else:
            answer.append(first.label(rig.url, study, value))
        rig.kill()
        if point == "during_label":
            sender.join(60)
        if answer and answer[0] == 201:
            rig.acked[study] = value
        rig.check_always()
        expire = rng.random() < 0.5
        answered = f"answered {answer[0]}" if answer and answer[0] else "no answer"
        then = "lease expired, other reader" if expire else "same reader"
        rig.points[f"{point} ({answered}; then {then})"] += 1
        if expire:  # the reviewer walked away: the lease runs out while the daemon is down
            time.sleep(LEASE_SECONDS + 0.5)
        rig.start()
        if expire:
            taker = readers[1]
            got = taker.claim(rig.url, study)
            if got == 200:
                code = taker.label(rig.url, study, value)
                if code == 201:
                    rig.acked[study] = value
                elif code is not None:
                    rig.note("other", f"trial {t}: label after lease expiry answered {code}")
            elif study not in rig.acked and not _labeled(rig, study):
                rig.note("stuck", f"study {study}: lease did not expire ({got})")
        else:
            code = first.label(rig.url, study, value)
            if code == 201:  # a label stored twice is caught by the checks
                rig.acked[study] = value
            elif code == 409 and not _labeled(rig, study):
                if first.claim(rig.url, study) == 200 and first.label(rig.url, study,
                                                                      value) == 201:
                    rig.acked[study] = value
        # a second label of a labelled study is refused, whoever sends it
        for reader in readers:
            again = reader.label(rig.url, study, value)
            if again == 201:
                rig.note("duplicated", f"study {study}: a second label was accepted")
        rig.settle()
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


def _labeled(rig: Rig, study: int) -> bool:
    return bool(scalar(rig.home, "SELECT COUNT(*) FROM labels WHERE study_id = ?", [study]))


def _label_all(rig: Rig, reader: Reviewer, rng: random.Random) -> int:
    """Label every pending study (alternating classes); how many were stored."""
    stored = 0
    for _ in range(200):
        study = reader.claim_next(rig.url)
        if study is None:
            break
        value = CLASSES[stored % 2] if rng.random() < 0.8 else rng.choice(CLASSES)
        if reader.label(rig.url, study, value) == 201:
            rig.acked[study] = value
            stored += 1
    return stored


def _last_run(rig: Rig) -> tuple | None:
    rows = _rows(rig.home, "SELECT id, state, pid, progress, message, candidate_version "
                           "FROM retrain_runs ORDER BY id DESC LIMIT 1")
    return rows[0] if rows else None


def _run_state(rig: Rig, run_id: int) -> str:
    rows = _rows(rig.home, "SELECT state, message FROM retrain_runs WHERE id = ?", [run_id])
    if not rows:
        return "?"
    state, message = rows[0]
    return f"{state} ({message})" if state == "failed" else state


def _no_run_running(rig: Rig) -> bool:
    return scalar(rig.home, "SELECT COUNT(*) FROM retrain_runs WHERE state = 'running'") == 0


def _worker_pid(rig: Rig, run_id: int) -> int | None:
    rows = _rows(rig.home, "SELECT pid FROM retrain_runs WHERE id = ?", [run_id])
    pid = rows[0][0] if rows else None
    if pid is None:
        return None
    try:
        if b"triage.training.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    except OSError:
        return None
    return None


def _retrain_round(rig: Rig, reader: Reviewer, t: int, rng: random.Random) -> int | None:
    """New studies, all labelled through the API, until the daemon starts a run; its id."""
    last = _last_run(rig)
    last_id = last[0] if last else 0
    for attempt in range(4):
        _drop_and_decide(rig, 20_000 + 100 * t + 20 * attempt, 8 if t or attempt else 14,
                         f"t{t}/{attempt}/")
        _label_all(rig, reader, rng)
        if wait_until(lambda: (_last_run(rig) or (0,))[0] > last_id, 12, 0.05):
            return int(_last_run(rig)[0])
    rig.note("other", f"trial {t}: no retrain run started")
    return None


# Where in a run a kill lands: a predicate on (progress, message, candidate version) and
# the longest seeded delay after it, about the stage's length on a 2-core machine (a tiny
# run: ~1.5 s start-up, ~0.8 s training, ~15 ms from evaluation to the promotion).
STAGES: dict[str, tuple[Callable[[float, str, str | None], bool], float]] = {
    "spawned": (lambda p, m, c: True, 1.2),
    "loading": (lambda p, m, c: p >= 0.01, 0.01),
    "training": (lambda p, m, c: p >= 0.045, 0.6),
    "evaluating": (lambda p, m, c: p >= 0.87, 0.012),
    "registered": (lambda p, m, c: c is not None, 0.006),
}


def _kill_in_run(rig: Rig, run_id: int, stage: Callable, delay: float, target: str) -> str:
    """Wait for the run to reach ``stage`` (polled every millisecond), then SIGKILL the
    worker, the daemon or both after ``delay`` seconds. Returns what was killed and the
    run's state at that moment (`running`: the kill landed inside the run)."""
    def reached() -> bool:
        row = _rows(rig.home, "SELECT state, progress, message, candidate_version FROM "
                              "retrain_runs WHERE id = ?", [run_id])[0]
        return row[0] != "running" or bool(stage(row[1], row[2] or "", row[3]))

    wait_until(reached, 120, 0.001)
    time.sleep(delay)
    pid = _worker_pid(rig, run_id)
    state = _rows(rig.home, "SELECT state FROM retrain_runs WHERE id = ?", [run_id])[0][0]
    killed = []
    if target in ("worker", "both") and pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append("worker")
        except ProcessLookupError:
            pass
    if target in ("daemon", "both"):
        rig.kill()
        killed.append("daemon")
    return f"{'+'.join(killed) or 'nothing'} (run {state})"


def _retrain_setup(rig: Rig) -> Reviewer:
    rig.env.update(RETRAIN_ENV)
    rig.label_rate = 1.0
    rig.start()
    return Reviewer(rig.home, "reader")


def _after_run(rig: Rig, since: tuple[int, int]) -> None:
    if not (rig.proc and rig.proc.alive):
        rig.start()
    if not wait_until(lambda: _no_run_running(rig), 180, 0.2):
        rig.note("stuck", "a retrain run still running after 180 s")
    rig.settle(extra=lambda: _no_run_running(rig))
    rig.check_final()
    rig.measure_flood(since)


def kill_during_retrain(rig: Rig, trials: int) -> None:
    """The daemon starts a run itself (enough new labels); the worker, the daemon or both
    are SIGKILLed at a seeded stage of the run. After the restart the run ends (the
    worker finishes, or the run is marked failed and its candidate rejected) and the
    next trial's run starts from the same labels."""
    rig.mechanism.add("SIGKILL of the training subprocess, the daemon or both at a seeded "
                      "stage (spawned, loading labels, training, evaluating, candidate "
                      "registered) of a run the daemon started itself")
    reader = _retrain_setup(rig)
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        run_id = _retrain_round(rig, reader, t, rng)
        if run_id is None:
            continue
        stage = rng.choice(list(STAGES))
        target = rng.choice(("worker", "worker", "daemon", "both"))
        predicate, longest = STAGES[stage]
        what = _kill_in_run(rig, run_id, predicate, rng.uniform(0, longest), target)
        rig.check_always()
        _after_run(rig, since)
        rig.points[f"{stage}/{target}: killed {what}, run ended {_run_state(rig, run_id)}"] += 1
    rig.stop()


def kill_during_promotion(rig: Rig, trials: int) -> None:
    """Kills aimed at the promotion. Even trials: a run the daemon started registers its
    candidate; 0-30 ms later (polled every millisecond: deciding, the promotion
    transaction, re-scoring the queue) the worker, the daemon or both are SIGKILLed,
    while new studies are being scored (the scorer swaps models). Odd trials: an admin's
    `triage models promote V` or `triage models rollback` is SIGKILLed a seeded 1.6-2.6 s
    after it started (it takes ~2 s, most of it imports), sometimes the daemon too."""
    rig.mechanism.add("SIGKILL of the worker/daemon/both 0-30 ms after a run registered its "
                      "candidate, with studies being scored; SIGKILL of `triage models "
                      "promote|rollback` 1.6-2.6 s after it started")
    reader = _retrain_setup(rig)
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        others = _rows(rig.home, "SELECT version FROM models WHERE status != 'serving' "
                                 "AND status != 'candidate'")
        if t % 2 == 1 and others:
            before = _rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
            command = rng.choice(("promote", "rollback"))
            args = ["models", command] + ([rng.choice(others)[0]] if command == "promote"
                                          else [])
            assert rig.proc is not None
            cli = subprocess.Popen(
                [sys.executable, "-m", "triage", *args, "--config", str(REPO / "config.yaml")],
                env=rig.proc.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _drop_and_decide(rig, 40_000 + 100 * t, 3, f"t{t}/cli/", timeout=0)
            time.sleep(rng.uniform(1.6, 2.6))
            ended = cli.poll()
            if ended is None:
                cli.send_signal(signal.SIGKILL)
            cli.wait()
            also = rng.random() < 0.5
            if also:
                rig.kill()
            after = _rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
            landed = "finished" if ended is not None else (
                "killed after its change" if after != before else "killed before its change")
            rig.points[f"cli {command}: {landed}{' + daemon' if also else ''}"] += 1
            if not rig.proc.alive:
                rig.start()
            _drop_and_decide(rig, 40_000 + 100 * t + 50, 3, f"t{t}/after/")
            _after_run(rig, since)
            _serving_used(rig)
            continue
        run_id = _retrain_round(rig, reader, t, rng)
        if run_id is None:
            continue
        # studies that complete around the promotion: the scorer swaps models mid-stream
        single_studies(rig.inbox, rig.scratch, 40_000 + 100 * t, 4, rig.batch, f"t{t}/swap/")
        target = rng.choice(("worker", "daemon", "both"))
        what = _kill_in_run(rig, run_id, STAGES["registered"][0], rng.uniform(0, 0.03), target)
        rig.check_always()
        _after_run(rig, since)
        rig.points[f"registered/{target}: killed {what}, run ended "
                   f"{_run_state(rig, run_id)}"] += 1
        _drop_and_decide(rig, 40_000 + 100 * t + 50, 3, f"t{t}/after/")
        rig.settle()
        _serving_used(rig)
    rig.stop()


def _serving_used(rig: Rig) -> None:
    """The newest decisions were made by the serving version (once one serves)."""
    serving = _rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
    if not serving:
        return
    last = _rows(rig.home, "SELECT model_version FROM decisions ORDER BY id DESC LIMIT 1")
    if last and last[0][0] != serving[0][0]:
        rig.note("other", f"scored by {last[0][0]} while {serving[0][0]} serves")


def _damage_checkpoint(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    how = rng.choice(("flip", "truncate", "delete", "empty"))
    if how == "flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 64)):
            buf[rng.randrange(len(buf))] ^= 0xFF
        path.write_bytes(bytes(buf))
    elif how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    return how


def corrupt_serving_model(rig: Rig, trials: int) -> None:
    """The serving checkpoint (and sometimes every promoted one) is damaged: flipped
    bytes, truncated, deleted or emptied, while the daemon runs or between runs. Studies
    must be scored by the last version that loads (degraded serving), or wait when none
    does, never fall back to cold start; once the file is restored and the daemon
    restarted, waiting studies are scored."""
    rig.mechanism.add("checkpoint file damaged on disk (flip bytes / truncate / delete / "
                      "empty), then SIGKILL and restart")
    rig.start()
    _import_model(rig, 1)
    _import_model(rig, 2)
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        promoted = _rows(rig.home, "SELECT version, path, status FROM models WHERE "
                                   "promoted_at IS NOT NULL ORDER BY status = 'serving' DESC")
        victims = promoted if rng.random() < 0.3 else promoted[:1]
        saved = {Path(p): Path(p).read_bytes() for _, p, _ in victims}
        hows = [_damage_checkpoint(Path(p), rng) for _, p, _ in victims]
        if rng.random() < 0.5:  # while running: seen at the next load (a restart)
            time.sleep(rng.uniform(0, 1.0))
        rig.restart()
        _drop_and_decide(rig, 30_000 + 100 * t, 10, f"t{t}/")
        rig.settle(waiting_ok=True)
        _serving_visible(rig, expect_ok=False)
        state = _rows(rig.home, "SELECT served_version FROM serving_state WHERE id = 1")
        served = state[0][0] if state else None
        waited = scalar(rig.home, "SELECT COUNT(*) FROM studies WHERE state = 'waiting_model'")
        rig.points[f"{'every promoted' if len(victims) > 1 else 'serving'} checkpoint "
                   f"{hows[0]}: " + (f"served {served}" if served else
                                     f"none loads, {waited} studies waited")] += 1
        rig.check_final(waiting_ok=True)
        rig.measure_flood(since)
        for path, data in saved.items():  # the operator restores the files
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        rig.kill()
        time.sleep(rng.uniform(0, 0.5))
        rig.start()
        rig.settle()
        _serving_visible(rig, expect_ok=True)
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


def _serving_visible(rig: Rig, *, expect_ok: bool) -> None:
    """Degraded serving is loud: the status row and the gauge say so."""
    rows = _rows(rig.home, "SELECT ok, reason FROM serving_state WHERE id = 1")
    ok = bool(rows[0][0]) if rows else None
    try:
        text = httpx.get(rig.url + "/metrics", timeout=10).text
        gauge = next((line.split()[-1] for line in text.splitlines()
                      if line.startswith("triage_serving_model_ok ")), None)
    except httpx.HTTPError:
        gauge = None
    if expect_ok and ok is False:
        rig.note("stuck", f"serving not restored after the file came back: {rows}")
    if not expect_ok and (ok is not False or gauge != "0.0" or not rows[0][1]):
        rig.note("other", f"damaged serving model not reported: row {rows}, gauge {gauge}")


def unreadable_archive_file(rig: Rig, trials: int) -> None:
    """An archived file is made unreadable (chmod 000, the daemon without root's read
    override), deleted or truncated, or a study's stored pixels are damaged in the
    database, after ingest and before the study is scored. The scorer reads the stored
    pixels, not the archive: a damaged archive file must not stop scoring and the image
    endpoint names the cause; damaged pixels end the study `error` with a reason, retried
    after the backoff (scored once restored, else left for an operator)."""
    from conftest import drop_without_root_read

    rig.prefix = drop_without_root_read()
    rig.mechanism.add("archive file chmod 000 (daemon run with setpriv -dac_override,"
                      "-dac_read_search)" if rig.prefix else
                      "archive file chmod 000 (not root: plain permissions)")
    rig.mechanism.add("archive file deleted or truncated; stored pixel blob truncated in "
                      "the database")
    rig.env["TRIAGE__STUDIES__STABLE_AGE_SECONDS"] = "3"
    rig.start()
    reader = Reviewer(rig.home, "viewer")
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        seed = 1000 * rig.seed + t
        wave_one(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        uids = [f"2.25.{1000 * (seed + 1) + s}" for s in range(3)]
        marks = ", ".join("?" * len(uids))

        def archived(uids: list[str] = uids, marks: str = marks) -> list[tuple]:
            return _rows(rig.home, "SELECT instances.id, instances.study_id, instances.path "
                                   "FROM instances JOIN studies ON studies.id = study_id "
                                   f"WHERE study_uid IN ({marks}) AND studies.state = 'open'",
                         uids)

        wait_until(lambda: len(archived()) >= 3, 20, 0.01)
        time.sleep(rng.uniform(0, 0.8))
        candidates = archived()
        if not candidates:
            rig.note("other", f"trial {t}: studies completed before the fault")
            continue
        instance_id, study_id, path = rng.choice(candidates)
        how = rng.choice(("chmod000", "delete", "truncate", "blob"))
        saved_blob, restored = None, False
        target = rig.home / path
        if how == "chmod000":
            target.chmod(0)
        elif how == "delete":
            target.unlink()
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[:200])
        else:
            saved_blob = _rows(rig.home, "SELECT data FROM images WHERE instance_id = ?",
                               [instance_id])[0][0]
            _write(rig.home, "UPDATE images SET data = substr(data, 1, 10) WHERE "
                             "instance_id = ?", [instance_id])
        if how != "blob":
            rig.damaged.add(path)
        crashed = rng.random() < 0.6
        if crashed:  # a crash on top, while the study waits or is retried
            time.sleep(rng.uniform(0, 3.0))
            rig.restart()
        wave_two(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        if how == "blob":
            wait_until(lambda sid=study_id: scalar(
                rig.home, "SELECT COUNT(*) FROM studies WHERE id = ? AND state = 'error'",
                [sid]) > 0, 20, 0.05)
            restored = rng.random() < 0.6
            if restored:  # restored from a backup: the next retry scores it
                _write(rig.home, "UPDATE images SET data = ? WHERE instance_id = ?",
                       [saved_blob, instance_id])
        rig.settle()
        rig.check_final()
        answer = _image_answer(rig, reader, study_id, instance_id) if how != "blob" else None
        state, errors = _rows(rig.home, "SELECT state, error_count FROM studies WHERE id = ?",
                              [study_id])[0]
        rig.points[f"{how}{' + SIGKILL' if crashed else ''}"
                   f"{(', restored' if restored else ', not restored') if how == 'blob' else ''}"
                   f": study {state} after {errors} errors"
                   f"{f', image answered {answer}' if answer else ''}"] += 1
        rig.measure_flood(since)
    rig.stop()
    for path in rig.damaged:
        if (rig.home / path).exists():
            (rig.home / path).chmod(0o644)


def _image_answer(rig: Rig, reader: Reviewer, study_id: int, instance_id: int) -> int | None:
    """The image endpoint names a damaged archive file instead of failing bare; the
    status it answered."""
    try:
        response = httpx.get(f"{rig.url}/api/studies/{study_id}/images/{instance_id}/0.png",
                             headers=reader.headers, timeout=30)
    except httpx.HTTPError as exc:
        rig.note("other", f"image of study {study_id}: no answer ({type(exc).__name__})")
        return None
    if response.status_code != 200 and (
            response.status_code != 500 or "cannot be read" not in response.text):
        rig.note("other", f"image of study {study_id}: {response.status_code} "
                          f"{response.text[:120]}")
    return response.status_code


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _fill(home: Path, keep: int) -> Path:
    """Leave ``keep`` bytes free on the file system of ``home``."""
    filler = home / ".filler"
    stat = os.statvfs(home)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "ab") as out:
        size = max(0, free - keep)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= out.write(chunk[: min(size, len(chunk))])
            except OSError:
                break
    return filler


WAVE_FILES = {"wave_one": 13, "wave_two": 4}


def _try_drop(rig: Rig, wave: Callable, seed: int, prefix: str) -> int:
    """Drop a wave; a file the sender cannot write (ENOSPC) was never delivered, nor the
    ones after it. Returns how many files were not delivered."""
    trial = Batch()
    try:
        wave(rig.inbox, rig.scratch, seed, trial, prefix=prefix)
    except OSError:
        for part in rig.inbox.rglob("*.part"):
            part.unlink()
    # a wave records each file after its delivery (the rename) succeeded
    rig.batch.expect.update(trial.expect)
    rig.batch.bad_codes.update(trial.bad_codes)
    rig.batch.copies += trial.copies
    rig.batch.studies |= trial.studies
    for uid, rels in trial.study_files.items():
        rig.batch.study_files.setdefault(uid, []).extend(rels)
    return WAVE_FILES[wave.__name__] - len(all_expected(trial))


def disk_full(rig: Rig, trials: int) -> None:
    """The state directory fills up while files arrive: a real ENOSPC on a small tmpfs
    mounted as the home (root), or, seeded per trial, the ingest back-pressure floor
    (``ingest.min_free_bytes``) reached on it. Space comes back after a few seconds,
    sometimes after a SIGKILL while full."""
    mounted = _mount_tmpfs(rig.home, "48m")
    rig.stderr = rig.workdir / "stderr.log"
    try:
        if mounted:
            rig.mechanism.add("real ENOSPC: home on a 48 MiB tmpfs filled to 0-64 KiB free "
                              "(ingest.min_free_bytes 0)")
            rig.mechanism.add("back-pressure: the same tmpfs filled below "
                              "ingest.min_free_bytes = 4 MiB")
        else:
            rig.mechanism.add("no tmpfs (not root or mount refused): back-pressure only, "
                              "ingest.min_free_bytes set above the free space")
        rig.env["TRIAGE__INGEST__MIN_FREE_BYTES"] = "0"
        rig.start()
        for t in range(trials):
            rng = rig.rng(t)
            since = rig.snapshot()
            seed = 1000 * rig.seed + t
            mode = rng.choice(("enospc", "enospc", "backpressure")) if mounted \
                else "backpressure"
            log_mark = rig.stderr.stat().st_size if rig.stderr.exists() else 0
            env = {}
            if mode == "backpressure":
                env["TRIAGE__INGEST__MIN_FREE_BYTES"] = str(
                    4 << 20 if mounted else 1 << 62)
                rig.restart(env)
            undelivered = _try_drop(rig, wave_one, seed, f"t{t}/")
            time.sleep(rng.uniform(0, 1.5))
            filler = _fill(rig.home, rng.randint(0, 64 << 10) if mode == "enospc"
                           else 2 << 20) if mounted else None
            undelivered += _try_drop(rig, wave_two, seed, f"t{t}/")
            time.sleep(rng.uniform(0.5, 2.5))
            if rng.random() < 0.4:  # a crash while full; the restart happens when space is back
                rig.kill()
            if filler is not None:
                filler.unlink()
            crashed = not (rig.proc and rig.proc.alive)
            if crashed or mode == "backpressure":
                rig.restart({})
            rig.settle()
            with open(rig.stderr, "rb") as log:
                log.seek(log_mark)
                text = log.read().decode(errors="replace")
            errors = text.count('"level": "error"')
            rig.points[f"{mode}: {errors} daemon errors, sender could not write {undelivered} "
                       f"files{', paused' if 'ingest_paused_disk_low' in text else ''}"
                       f"{', SIGKILL while full' if crashed else ''}"] += 1
            rig.check_final()
            rig.measure_flood(since)
        rig.stop()
        # the log file handler cannot write on a full disk: Python's logging prints that
        # to stderr ("--- Logging error ---" and its traceback); anything else counts
        rig.record([p for p in log_problems(rig.home, rig.stderr)
                    if not ("Logging error" in p.detail and "Errno 28" in p.detail)])
    finally:
        if rig.proc is not None and rig.proc.alive:
            rig.proc.kill()
        if mounted:
            snapshot = rig.workdir / "home-copy"
            shutil.copytree(rig.home, snapshot, symlinks=True)
            subprocess.run(["umount", str(rig.home)], capture_output=True)


_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


def sqlite_busy(rig: Rig, trials: int) -> None:
    """Another process holds the write lock (BEGIN IMMEDIATE) on triage.db for 10 s
    while files arrive and reviewers label; sometimes the daemon is SIGKILLed while it
    waits and restarted under the lock."""
    rig.mechanism.add(f"a separate process holds BEGIN IMMEDIATE on triage.db for "
                      f"{LOCK_SECONDS:g} s, starting at a seeded moment")
    rig.label_rate = 0.5
    rig.env["TRIAGE__GATE__LABEL_RATE"] = "0.5"
    rig.start()
    readers = [Reviewer(rig.home, "reader-a"), Reviewer(rig.home, "reader-b")]
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        _drop_and_decide(rig, 50_000 + 100 * t, 6, f"t{t}/pre/")
        claims = [(r, r.claim_next(rig.url)) for r in readers]
        locker = subprocess.Popen([sys.executable, "-c", _LOCKER, str(rig.home / "triage.db"),
                                   str(LOCK_SECONDS)], stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None
        locker.stdout.readline()
        time.sleep(rng.uniform(0, 2.0))
        seed = 1000 * rig.seed + t
        wave_one(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        answers: dict[int, list] = {}
        url = rig.url
        senders = []
        for reader, study in claims:
            if study is None:
                continue
            value = rng.choice(CLASSES)
            answers[study] = [value]
            senders.append(threading.Thread(
                target=lambda r=reader, s=study, v=value, a=answers, u=url: a[s].append(
                    r.label(u, s, v))))
        for sender in senders:
            sender.start()
        point = rng.choice(("no kill", "SIGKILL and restart under the lock"))
        if point != "no kill":
            time.sleep(rng.uniform(0, LOCK_SECONDS - 3))
            rig.kill()
            rig.new_proc().spawn()  # starts while the lock is still held
        for sender in senders:
            sender.join(60)
        locker.wait(60)
        for study, (value, *code) in answers.items():
            if code and code[0] == 201:
                rig.acked[study] = value
        codes = sorted(str(code[0]) if code else "-" for _, *code in answers.values())
        rig.points[f"{point}: labels sent under the lock answered {', '.join(codes)}"] += 1
        if point != "no kill":
            if not wait_until(lambda: _healthy(rig), 60, 0.2):
                rig.note("stuck", f"trial {t}: daemon not healthy after the lock")
        wave_two(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        for reader, study in claims:  # whatever was not stored is labelled now
            if study is not None and study not in rig.acked:
                value = answers[study][0]
                code = reader.label(rig.url, study, value)
                if code == 409 and reader.claim(rig.url, study) == 200:
                    code = reader.label(rig.url, study, value)
                if code == 201:
                    rig.acked[study] = value
                elif not _labeled(rig, study):
                    rig.note("stuck", f"study {study}: cannot be labelled after the lock "
                                      f"({code})")
        rig.settle()
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


def _healthy(rig: Rig) -> bool:
    try:
        return httpx.get(rig.url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


_SHIM = '''"""Fault bench clock shim: time.time() of this process is shifted by the number of
seconds in $FAULTS_CLOCK_OFFSET_FILE (re-read every 50 ms). Monotonic time is not."""
import os
import time

_path = os.environ.get("FAULTS_CLOCK_OFFSET_FILE")
if _path:
    _real = time.time
    _state = [0.0, -1.0]

    def _offset():
        now = time.monotonic()
        if now - _state[1] > 0.05:
            _state[1] = now
            try:
                with open(_path) as handle:
                    _state[0] = float(handle.read().strip() or 0.0)
            except (OSError, ValueError):
                pass
        return _state[0]

    def _shifted_time():
        return _real() + _offset()

    time.time = _shifted_time
'''


def clock_jump(rig: Rig, trials: int) -> None:
    """The daemon's wall clock jumps (even trials back, odd trials forward, by a seeded
    30 s - 2 h) while studies are open, one reviewer holds a claim and another has
    walked away from theirs; then a SIGKILL and a restart on the jumped clock. Leases
    and the stable-age rule must neither lose nor duplicate a label, nor hold a study
    or claim much longer than configured."""
    shim = rig.workdir / "clockshim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    offset_file = rig.workdir / "clock-offset"
    offset_file.write_text("0")
    rig.mechanism.add("time.time() of the daemon and its subprocesses shifted at a seeded "
                      "moment by a sitecustomize shim (PYTHONPATH), as an NTP step would; "
                      "monotonic time and file mtimes unchanged. No system clock change "
                      "(not permitted here), libfaketime (hangs/EINVAL with Python 3.11's "
                      "sleeps) not used")
    rig.env["PYTHONPATH"] = os.pathsep.join(
        [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    rig.env["FAULTS_CLOCK_OFFSET_FILE"] = str(offset_file)
    rig.label_rate = 0.5
    rig.env["TRIAGE__GATE__LABEL_RATE"] = "0.5"

    def offset() -> float:
        return float(offset_file.read_text())

    rig.clock_offset = offset
    rig.env["TRIAGE__STUDIES__STABLE_AGE_SECONDS"] = "3"  # still open when the clock jumps
    rig.start()
    readers = [Reviewer(rig.home, "reader-a"), Reviewer(rig.home, "reader-b")]
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        for attempt in range(3):
            _drop_and_decide(rig, 60_000 + 100 * t + 10 * attempt, 6, f"t{t}/{attempt}/")
            if len(_routed_pending(rig)) >= 2:
                break
        working = readers[0].claim_next(rig.url)
        abandoned = readers[1].claim_next(rig.url)  # this reviewer walks away
        opened = single_studies(rig.inbox, rig.scratch, 60_000 + 100 * t + 50, 2, rig.batch,
                                f"t{t}/open/")
        wait_until(lambda uids=opened: scalar(
            rig.home, "SELECT COUNT(*) FROM studies WHERE state = 'open' AND study_uid IN "
                      "(?, ?)", uids) == 2, 10, 0.02)
        time.sleep(rng.uniform(0, 1.0))
        direction = "back" if t % 2 == 0 else "forward"
        jump = rng.uniform(30, 7200) * (-1 if direction == "back" else 1)
        offset_file.write_text(str(offset() + jump))
        time.sleep(0.2)
        code = None
        if working is not None:
            value = rng.choice(CLASSES)
            code = readers[0].label(rig.url, working, value)
            if code == 409 and readers[0].claim(rig.url, working) == 200:
                code = readers[0].label(rig.url, working, value)
            if code == 201:
                rig.acked[working] = value
            else:
                rig.note("other", f"study {working}: label under the jump answered {code}")
        time.sleep(rng.uniform(0, 2.0))
        rig.restart()
        # a reviewer's page lists the queue, then the abandoned lease runs out (real time)
        httpx.get(rig.url + "/api/queue", headers=readers[1].headers, timeout=10)
        time.sleep(LEASE_SECONDS + 0.5)
        taken = "none abandoned"
        if abandoned is not None:
            taken = "abandoned claim still held"
            if readers[0].claim(rig.url, abandoned) == 200:
                value = rng.choice(CLASSES)
                if readers[0].label(rig.url, abandoned, value) == 201:
                    rig.acked[abandoned] = value
                    taken = "abandoned study taken over and labelled"
        rig.points[f"{direction}: label under the jump answered {code}; {taken}"] += 1
        rig.settle(timeout=8)  # stable age 2 s: all complete within a few seconds
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


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


def run_scenario(name: str, trials: int, seed: int = 0, workdir: Path | None = None) -> dict:
    """Run ``trials`` trials of one scenario in a fresh state directory; its summary."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix=f"faults-{name}-")) if own else workdir
    rig = Rig(name, workdir, seed, dict(BASE_ENV))
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
    for (pid,) in _rows(rig.home, "SELECT pid FROM retrain_runs WHERE state = 'running' "
                                  "AND pid IS NOT NULL") if (rig.home / "triage.db").exists() \
            else []:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per scenario")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to write")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset of: " + ", ".join(SCENARIOS))
    parser.add_argument("--seed", type=int, default=0, help="master seed of the fault points")
    args = parser.parse_args(argv)
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
    try:
        for name in names:
            result = run_scenario(name, args.trials, args.seed)
            results.append(result)
            print(json.dumps({k: result[k] for k in ("name", "trials", "lost", "duplicated",
                                                      "stuck", "flooded", "other", "seconds")}),
                  file=sys.stderr, flush=True)
            if len(results) < len(names):  # a run killed midway keeps what it measured
                args.out.write_text(json.dumps(report(False), indent=2) + "\n")
    finally:
        signal.signal(signal.SIGTERM, previous)
    final = report(True)
    args.out.write_text(json.dumps(final, indent=2) + "\n")
    print(json.dumps(final, indent=2))
    return 0 if all(sum(r[k] for k in (*KINDS, "flooded")) == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
