"""One scenario's rig: its state directory, daemon, reviewers and books (what was
dropped, acknowledged and broken), and the steps every scenario is built from."""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from faults_support import (
    Batch,
    HarnessDaemon,
    Problem,
    always_problems,
    final_problems,
    scalar,
    settled,
    single_studies,
    store_exists,
    store_of,
    wait_until,
)

from triage.store import db as store

from faultbench import REPO
from faultbench.common import LABEL_RATE, RETRY_WAITS, SETTLE_SECONDS, read_rows
from faultbench.invariants import label_answers, lease_problems, retrain_problems


# -- one scenario's state directory, daemon and books --------------------------------------


class Reviewer:
    """A radiologist working through the HTTP API with their own token."""

    def __init__(self, home: Path, name: str) -> None:
        from triage.review.auth import create_token

        db = store.connect(store_of(home))
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
        if store_exists(self.home):
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
        self.record(lease_problems(self.home, now))
        self.record(retrain_problems(self.home))
        self.record(label_answers(self.home, self.acked))

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


def import_model(rig: Rig, seed: int) -> str:
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
    db = store.connect(store_of(rig.home))
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        entry = registry.add(path, source=f"import:{path.name}")
        return registry.promote(entry.version, note="fault bench").version
    finally:
        db.close()


def routed_pending(rig: Rig) -> list[int]:
    return [r[0] for r in read_rows(rig.home, "SELECT study_id FROM queue_items WHERE "
                                              "state = 'pending' ORDER BY id")]


def drop_and_decide(rig: Rig, first_uid: int, count: int, prefix: str,
                     timeout: float = 30.0) -> None:
    """Drop ``count`` one-image studies and wait until each is decided or waiting."""
    uids = single_studies(rig.inbox, rig.scratch, first_uid, count, rig.batch, prefix)
    marks = ", ".join("?" * len(uids))
    wait_until(lambda: scalar(rig.home, "SELECT COUNT(*) FROM studies WHERE state IN "
                                        "('scored','waiting_model','error','unscoreable',"
                                        f"'out_of_scope') AND study_uid IN ({marks})",
                              uids) >= count, timeout, 0.1)


def is_labeled(rig: Rig, study: int) -> bool:
    return bool(scalar(rig.home, "SELECT COUNT(*) FROM labels WHERE study_id = ?", [study]))
