"""Scenarios that kill the daemon (or its training worker) at a seeded point: during
ingest, scoring, labelling, a retrain run, a promotion."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from faults_support import (
    all_expected,
    decisions,
    final_files,
    kill_at,
    plan_kills,
    scalar,
    single_studies,
    wait_until,
    wave_one,
    wave_two,
)

from faultbench import REPO
from faultbench.common import CLASSES, LEASE_SECONDS, RETRAIN_ENV, read_rows
from faultbench.rig import Reviewer, Rig, drop_and_decide, import_model, is_labeled, routed_pending


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
    import_model(rig, 1)
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
            drop_and_decide(rig, 10_000 + 100 * t + 10 * attempt, 6, f"t{t}/{attempt}/")
            if routed_pending(rig):
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
            elif study not in rig.acked and not is_labeled(rig, study):
                rig.note("stuck", f"study {study}: lease did not expire ({got})")
        else:
            code = first.label(rig.url, study, value)
            if code == 201:  # a label stored twice is caught by the checks
                rig.acked[study] = value
            elif code == 409 and not is_labeled(rig, study):
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
    rows = read_rows(rig.home, "SELECT id, state, pid, progress, message, candidate_version "
                               "FROM retrain_runs ORDER BY id DESC LIMIT 1")
    return rows[0] if rows else None


def _run_state(rig: Rig, run_id: int) -> str:
    rows = read_rows(rig.home, "SELECT state, message FROM retrain_runs WHERE id = ?", [run_id])
    if not rows:
        return "?"
    state, message = rows[0]
    return f"{state} ({message})" if state == "failed" else state


def _no_run_running(rig: Rig) -> bool:
    return scalar(rig.home, "SELECT COUNT(*) FROM retrain_runs WHERE state = 'running'") == 0


def _worker_pid(rig: Rig, run_id: int) -> int | None:
    rows = read_rows(rig.home, "SELECT pid FROM retrain_runs WHERE id = ?", [run_id])
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
        drop_and_decide(rig, 20_000 + 100 * t + 20 * attempt, 8 if t or attempt else 14,
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
        row = read_rows(rig.home, "SELECT state, progress, message, candidate_version FROM "
                                  "retrain_runs WHERE id = ?", [run_id])[0]
        return row[0] != "running" or bool(stage(row[1], row[2] or "", row[3]))

    wait_until(reached, 120, 0.001)
    time.sleep(delay)
    pid = _worker_pid(rig, run_id)
    state = read_rows(rig.home, "SELECT state FROM retrain_runs WHERE id = ?", [run_id])[0][0]
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
        others = read_rows(rig.home, "SELECT version FROM models WHERE status != 'serving' "
                                     "AND status != 'candidate'")
        if t % 2 == 1 and others:
            before = read_rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
            command = rng.choice(("promote", "rollback"))
            args = ["models", command] + ([rng.choice(others)[0]] if command == "promote"
                                          else [])
            assert rig.proc is not None
            cli = subprocess.Popen(
                [sys.executable, "-m", "triage", *args, "--config", str(REPO / "config.yaml")],
                env=rig.proc.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            drop_and_decide(rig, 40_000 + 100 * t, 3, f"t{t}/cli/", timeout=0)
            time.sleep(rng.uniform(1.6, 2.6))
            ended = cli.poll()
            if ended is None:
                cli.send_signal(signal.SIGKILL)
            cli.wait()
            also = rng.random() < 0.5
            if also:
                rig.kill()
            after = read_rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
            landed = "finished" if ended is not None else (
                "killed after its change" if after != before else "killed before its change")
            rig.points[f"cli {command}: {landed}{' + daemon' if also else ''}"] += 1
            if not rig.proc.alive:
                rig.start()
            drop_and_decide(rig, 40_000 + 100 * t + 50, 3, f"t{t}/after/")
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
        drop_and_decide(rig, 40_000 + 100 * t + 50, 3, f"t{t}/after/")
        rig.settle()
        _serving_used(rig)
    rig.stop()


def _serving_used(rig: Rig) -> None:
    """The newest decisions were made by the serving version (once one serves)."""
    serving = read_rows(rig.home, "SELECT version FROM models WHERE status = 'serving'")
    if not serving:
        return
    last = read_rows(rig.home, "SELECT model_version FROM decisions ORDER BY id DESC LIMIT 1")
    if last and last[0][0] != serving[0][0]:
        rig.note("other", f"scored by {last[0][0]} while {serving[0][0]} serves")
