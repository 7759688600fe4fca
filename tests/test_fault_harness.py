"""Fault-injection harness: SIGKILL the real daemon at seeded points, corrupt its state,
restart, and check the invariants of docs/architecture.md after every fault.

Like SQLite's crash tests, each trial is a real run: a batch of real DICOM files
(several multi-instance studies, a byte-identical resend, a late instance that reopens
a study, and bad input: empty, not DICOM, truncated) goes through a real
``triage serve`` subprocess and is scored (cold start, no model needed). A seed picks
when each kill happens: during start-up (a delay), after k files reached a final state,
after k decisions, the moment a file or study is seen in flight, or during an orderly
shutdown (SIGTERM, then SIGKILL). After each kill the
invariants that hold at any instant are checked on the dead daemon's state; after the
last restart drains everything, all of them are.

CI runs a few seeds; ``TRIAGE_FULL_SCALE=1`` runs many more (``HARNESS_SEEDS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import FAST_ENV, PHI_STRINGS, REPO, DaemonProcess, make_image

FULL_SCALE = os.environ.get("TRIAGE_FULL_SCALE") == "1"
# Seed 0 runs in every suite; the others are marked slow (reduced in CI, many at full scale).
SLOW_SEEDS = range(1, int(os.environ.get("HARNESS_SEEDS", "40")) if FULL_SCALE else 4)
KILLS_PER_TRIAL = 4 if FULL_SCALE else 3

FINAL = ("archived", "unsupported", "quarantined", "duplicate", "vanished")
ENV = {
    **FAST_ENV,
    "TRIAGE__GATE__LABEL_RATE": "0.5",  # cold start routes about half: both outcomes occur
    "TRIAGE__RETRAIN__ENABLED": "false",  # no labels here; keep worker processes out of it
}
# Every kill point exercised in this session, by kind (printed at the end of each trial).
EXERCISED: dict[str, int] = {}


class HarnessDaemon(DaemonProcess):
    """:class:`DaemonProcess` that can also be started without waiting for health, so a
    kill can land during start-up (migration, recovery, start-up scan)."""

    def spawn(self) -> HarnessDaemon:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [*self.prefix, sys.executable, "-m", "triage", "serve",
                   "--config", str(REPO / "config.yaml"), "--port", str(self.port)]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(command, env=self.env, stdout=err, stderr=err)
        return self

    def kill(self, *, sigterm_sent: bool = False) -> None:
        """SIGKILL; the daemon must not have exited on its own before (after a SIGTERM
        it may have finished an orderly stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        rc = self.proc.wait(timeout=30)
        allowed = (-signal.SIGKILL, 0, -signal.SIGTERM) if sigterm_sent else (-signal.SIGKILL,)
        assert rc in allowed, f"daemon exited {rc} by itself: {self.log.read_text()[-2000:]}"


# -- the batch ---------------------------------------------------------------------------


@dataclass
class Batch:
    """What was put in the inbox and what each file must end as."""

    expect: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rel -> allowed states
    bad_codes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rel -> reason codes
    studies: set[str] = field(default_factory=set)
    # byte-identical copies: whichever is read first is archived, the other a duplicate
    copies: list[tuple[str, str]] = field(default_factory=list)


def _drop(inbox: Path, rel: str, data: bytes) -> None:
    """Deliver as a careful sender does: a temporary name, then a rename."""
    dest = inbox / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _image_bytes(scratch: Path, study: str, seed: int, number: int) -> bytes:
    path = make_image(scratch / f"{seed}.dcm", study_uid=study, seed=seed, size=48,
                      instance_number=number, window=(40.0, 400.0))
    data = path.read_bytes()
    path.unlink()
    return data


def wave_one(inbox: Path, scratch: Path, seed: int, batch: Batch) -> None:
    scratch.mkdir(parents=True, exist_ok=True)
    base = 1000 * (seed + 1)
    for s in range(3):
        study = f"2.25.{base + s}"
        batch.studies.add(study)
        for i in range(3):
            rel = f"w1/s{s}/i{i}.dcm"
            data = _image_bytes(scratch, study, base + 10 * s + i, i + 1)
            _drop(inbox, rel, data)
            batch.expect[rel] = ("archived",)
            if s == 0 and i == 0:
                _drop(inbox, "w1/resend.dcm", data)  # byte-identical resend
                batch.expect[rel] = batch.expect["w1/resend.dcm"] = ("archived", "duplicate")
                batch.copies.append((rel, "w1/resend.dcm"))
    _drop(inbox, "w1/empty.dcm", b"")
    batch.bad_codes["w1/empty.dcm"] = ("empty_file",)
    _drop(inbox, "w1/report.dcm", b"typed report, not an image\n" * 30)
    batch.bad_codes["w1/report.dcm"] = ("not_dicom",)
    full = _image_bytes(scratch, f"2.25.{base + 9}", base + 99, 1)
    _drop(inbox, "w1/truncated.dcm", full[: len(full) - 700])
    batch.bad_codes["w1/truncated.dcm"] = ("truncated", "invalid_header")


def wave_two(inbox: Path, scratch: Path, seed: int, batch: Batch) -> None:
    """Arrives later: a new two-instance study, a late instance of study 0 (a second
    round), and one more bad file."""
    base = 1000 * (seed + 1)
    study = f"2.25.{base + 5}"
    batch.studies.add(study)
    for i in range(2):
        rel = f"w2/s5/i{i}.dcm"
        _drop(inbox, rel, _image_bytes(scratch, study, base + 50 + i, i + 1))
        batch.expect[rel] = ("archived",)
    _drop(inbox, "w2/late.dcm", _image_bytes(scratch, f"2.25.{base}", base + 7, 9))
    batch.expect["w2/late.dcm"] = ("archived",)
    _drop(inbox, "w2/junk.dcm", os.urandom(2048))
    batch.bad_codes["w2/junk.dcm"] = ("not_dicom", "invalid_header")


def _all_expected(batch: Batch) -> dict[str, tuple[str, ...]]:
    return {**batch.expect, **{rel: ("quarantined",) for rel in batch.bad_codes}}


# -- reading the store -------------------------------------------------------------------


def _connect(home: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{home / 'triage.db'}?mode=ro", uri=True, timeout=30)


def _scalar(home: Path, sql: str) -> int:
    if not (home / "triage.db").exists():
        return 0
    conn = _connect(home)
    try:
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # schema not created yet
        return 0
    finally:
        conn.close()


def _final_files(home: Path) -> int:
    return _scalar(home, "SELECT COUNT(*) FROM files WHERE state IN "
                         "('archived','unsupported','quarantined','duplicate','vanished')")


def _decisions(home: Path) -> int:
    return _scalar(home, "SELECT COUNT(*) FROM decisions")


def _in_flight(home: Path) -> int:
    return _scalar(home, "SELECT (SELECT COUNT(*) FROM files WHERE state IN "
                         "('reading','moving')) + (SELECT COUNT(*) FROM studies WHERE "
                         "state = 'scoring')")


def check_always(home: Path) -> None:
    """Invariants that hold at every instant, a SIGKILL included."""
    conn = _connect(home)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        # one row per inbox file
        dup_rows = conn.execute("SELECT inbox_path, COUNT(*) FROM files GROUP BY inbox_path "
                                "HAVING COUNT(*) > 1").fetchall()
        assert dup_rows == [], f"files counted twice: {dup_rows}"
        # a final row's file is where its state says
        for rel, state, stored, sha, code in conn.execute(
            "SELECT inbox_path, state, stored_path, sha256, reason_code FROM files"
        ):
            if state not in FINAL:
                continue
            assert not (home / "inbox" / rel).exists(), f"{rel} is {state} but still in inbox"
            if state in ("archived", "unsupported"):
                data = (home / stored).read_bytes()
                assert hashlib.sha256(data).hexdigest() == sha, f"{rel}: archive differs"
            elif state == "quarantined":
                assert (home / stored).exists(), f"{rel}: quarantined file missing"
                sidecar = json.loads((home / stored).with_suffix(".json").read_text())
                assert sidecar["reason_code"] == code and sidecar["reason"], sidecar
        # an instance row exists only with its archive file
        for (path,) in conn.execute("SELECT path FROM instances"):
            assert (home / path).is_file(), f"instance without its archive file: {path}"
        # one decision per study round; queue items agree with their decisions
        twice = conn.execute("SELECT study_id, round, COUNT(*) FROM decisions "
                             "GROUP BY study_id, round HAVING COUNT(*) > 1").fetchall()
        assert twice == [], f"a study round was decided twice: {twice}"
        for study_id, reason, decision_id in conn.execute(
            "SELECT study_id, reason, decision_id FROM queue_items"
        ):
            decision = conn.execute("SELECT study_id, needs_label FROM decisions WHERE id = ?",
                                    [decision_id]).fetchone()
            assert decision == (study_id, 1), f"queue item of study {study_id} lacks its decision"
            first = conn.execute("SELECT reason FROM decisions WHERE study_id = ? AND "
                                 "needs_label = 1 ORDER BY id LIMIT 1", [study_id]).fetchone()
            assert first[0] == reason, f"study {study_id}: queue reason {reason}, first {first}"
        unqueued = conn.execute("SELECT DISTINCT study_id FROM decisions WHERE needs_label = 1 "
                                "AND study_id NOT IN (SELECT study_id FROM queue_items)"
                                ).fetchall()
        assert unqueued == [], f"routed studies missing from the queue: {unqueued}"
    finally:
        conn.close()


def check_final(home: Path, batch: Batch) -> dict[str, int]:
    """Everything settled: all of :func:`check_always`, and every file and study is done."""
    check_always(home)
    expected = _all_expected(batch)
    conn = _connect(home)
    try:
        rows = {rel: (state, code) for rel, state, code in conn.execute(
            "SELECT inbox_path, state, reason_code FROM files")}
        assert set(rows) == set(expected), (set(rows) ^ set(expected))
        states: dict[str, int] = {}
        for rel, (state, code) in rows.items():
            states[state] = states.get(state, 0) + 1
            if code == "reader_crashed":  # killed twice while reading it: by design
                continue
            assert state in expected[rel], f"{rel}: {state} ({code}), expected {expected[rel]}"
            if rel in batch.bad_codes:
                assert code in batch.bad_codes[rel], f"{rel}: {code}"
        for pair in batch.copies:
            assert sorted(rows[rel][0] for rel in pair) == ["archived", "duplicate"], pair
        assert not [p for p in (home / "inbox").rglob("*") if p.is_file()], "inbox not empty"
        # nothing stored that no row accounts for (a kill between move and commit)
        stored = {r[0] for r in conn.execute("SELECT stored_path FROM files "
                                             "WHERE stored_path IS NOT NULL")}
        for folder in ("archive", "quarantine"):
            for path in (home / folder).rglob("*"):
                if path.is_file() and path.suffix != ".json":
                    assert str(path.relative_to(home)) in stored, f"orphan {path}"
                if path.suffix == ".tmp" or path.name.endswith(".partial"):
                    raise AssertionError(f"left-over temporary file {path}")
        studies = conn.execute("SELECT id, study_uid, state, round FROM studies").fetchall()
        assert {uid for _, uid, _, _ in studies} == batch.studies
        for study_id, _, state, round_ in studies:
            assert state == "scored", f"study {study_id} ended {state}"
            rounds = [r for (r,) in conn.execute(
                "SELECT round FROM decisions WHERE study_id = ? ORDER BY round", [study_id])]
            # a study reopened before its turn skips a round; its last round is decided once
            assert rounds and rounds[-1] == round_ and len(rounds) == len(set(rounds)), (
                f"study {study_id} round {round_}: decisions for rounds {rounds}")
            results = conn.execute("SELECT COUNT(*) FROM study_results WHERE study_id = ?",
                                   [study_id]).fetchone()[0]
            assert results == len(rounds), f"study {study_id}: {results} results, {rounds}"
        # whether the late instance came after study 0 was decided (a second round) or before
        states["second_rounds"] = conn.execute(
            "SELECT COUNT(*) FROM studies WHERE round >= 2").fetchone()[0]
        return states
    finally:
        conn.close()


def check_logs(home: Path) -> None:
    """No traceback and no patient identifier in anything the daemon wrote."""
    texts = {"stderr": (home / "stderr.log").read_text(errors="replace")}
    for path in (home / "logs").glob("*.log*"):
        texts[path.name] = path.read_text(errors="replace")
    for path in (home / "quarantine").glob("*.json"):
        texts[path.name] = path.read_text()
    for name, text in texts.items():
        assert "Traceback" not in text, f"traceback in {name}: {text[-3000:]}"
        # uvicorn's unhandled-exception line (the JSON log keeps only the type)
        assert "Exception in ASGI application" not in text, f"unhandled error in {name}"
        for secret in PHI_STRINGS:
            assert secret not in text, f"patient identifier {secret!r} in {name}"


def _settled(home: Path, batch: Batch) -> bool:
    if [p for p in (home / "inbox").rglob("*") if p.is_file()]:
        return False
    if _final_files(home) < len(_all_expected(batch)):
        return False
    return _scalar(home, "SELECT COUNT(*) FROM studies WHERE state NOT IN "
                         "('scored','unscoreable','error')") == 0 and _scalar(
        home, "SELECT COUNT(*) FROM studies") == len(batch.studies)


def _wait(predicate, timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.003)
    return False


# -- kill points -------------------------------------------------------------------------


def plan_kills(rng: random.Random, n: int, total_files: int) -> list[tuple[str, float]]:
    """``n`` kill points from the seed: (kind, target), targets growing within a kind so
    every restart makes progress."""
    kinds = ["startup", "files", "files", "decisions", "in_flight", "in_flight", "shutdown"]
    plan = []
    files_done = 0
    for _ in range(n):
        kind = rng.choice(kinds)
        if kind == "startup":
            plan.append((kind, rng.uniform(0.0, 2.5)))
        elif kind == "files":
            files_done = min(total_files, files_done + rng.randint(1, 6))
            plan.append((kind, files_done))
        elif kind == "decisions":
            plan.append((kind, rng.randint(1, 2)))  # new decisions after the restart
        elif kind == "shutdown":
            plan.append((kind, rng.uniform(0.0, 0.3)))  # SIGTERM, then SIGKILL this later
        else:
            plan.append((kind, rng.uniform(0.0, 0.03)))
    return plan


def kill_at(proc: HarnessDaemon, kind: str, target: float, baseline: int, batch: Batch) -> str:
    """Start ``proc`` and SIGKILL it at the kill point; return what actually happened.

    A point that can no longer come (nothing left in flight) falls back to a kill as
    soon as the daemon has drained, marked "(drained)"; one that did not come in time,
    to a kill at the timeout, marked "(timeout)"."""
    home = proc.home
    drained = False

    def in_flight_or_drained() -> bool:
        return _in_flight(home) > 0 or _settled(home, batch)

    if kind == "startup":
        proc.spawn()
        time.sleep(target)
        proc.kill()
        return f"startup+{target:.2f}s"
    if kind in ("in_flight", "shutdown"):
        proc.spawn()  # ingestion starts before the HTTP server answers: watch from the start
    else:
        proc.start()
    if kind == "files":
        hit = _wait(lambda: _final_files(home) >= target, 20, "files")
    elif kind == "shutdown":
        # an orderly stop cut short: SIGTERM while files or studies are in flight
        hit = _wait(in_flight_or_drained, 10, "in flight")
        drained = hit and _in_flight(home) == 0
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(target)
        proc.kill(sigterm_sent=True)
        return f"{kind}@{target:.3g}" + (" (drained)" if drained else "")
    elif kind == "decisions":
        # at most 5 decisions exist in a trial (4 studies, one scored twice)
        goal = min(baseline + target, 5)
        hit = _wait(lambda: _decisions(home) >= goal or _settled(home, batch), 12, "decisions")
    else:
        hit = _wait(in_flight_or_drained, 10, "in flight")
        drained = hit and _in_flight(home) == 0
        time.sleep(target)
    proc.kill()
    note = " (timeout)" if not hit else " (drained)" if drained else ""
    return f"{kind}@{target:.3g}{note}"


def run_trial(tmp_path: Path, seed: int) -> str:
    rng = random.Random(seed)
    home = tmp_path / "home"
    batch = Batch()
    scratch = tmp_path / "scratch"
    (home / "inbox").mkdir(parents=True)
    wave_one(home / "inbox", scratch, seed, batch)
    plan = plan_kills(rng, KILLS_PER_TRIAL, len(_all_expected(batch)) + 4)
    done = []
    for n, (kind, target) in enumerate(plan):
        proc = HarnessDaemon(home, ENV, [])
        done.append(kill_at(proc, kind, target, _decisions(home), batch))
        EXERCISED[kind] = EXERCISED.get(kind, 0) + 1
        if (home / "triage.db").exists():
            check_always(home)
        if n == 0:
            wave_two(home / "inbox", scratch, seed, batch)
    proc = HarnessDaemon(home, ENV, []).start()
    try:
        if not _wait(lambda: _settled(home, batch), 90, "settled"):
            raise AssertionError(f"seed {seed}: not settled after kills {done}: "
                                 f"{proc.status()}")
    finally:
        proc.stop(signal.SIGTERM)
    states = check_final(home, batch)
    check_logs(home)
    summary = f"seed {seed}: {len(done)} kill points {done}; files {states}"
    print(summary)
    return summary


def test_kill_points_seed_0(tmp_path: Path) -> None:
    run_trial(tmp_path, 0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", list(SLOW_SEEDS))
def test_kill_points(tmp_path: Path, seed: int) -> None:
    run_trial(tmp_path, seed)


def test_zz_report_kill_points() -> None:
    """Runs after the trials (file order): how many kill points this session exercised."""
    total = sum(EXERCISED.values())
    print(f"kill points exercised: {total} {EXERCISED}")
    if total:
        assert total >= KILLS_PER_TRIAL


# -- corruption between runs -------------------------------------------------------------


def _flip(path: Path, offsets: list[int]) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corruption_between_runs_ends_in_named_states(tmp_path: Path) -> None:
    """What a site sees on disk: an archived file truncated, one with flipped bytes, one
    deleted by a clean-up job, and a stored image blob damaged in the database (found
    when a late instance reopens its study). The daemon must keep running and end each
    in a named state, with no traceback and no patient identifier in its output.

    (Deleting the serving checkpoint needs a model; cold start has none, and degraded
    serving is covered by tests/test_model_registry.py.)
    """
    home = tmp_path / "home"
    batch = Batch()
    proc = HarnessDaemon(home, ENV, []).start()
    wave_one(proc.inbox, tmp_path / "scratch", 77, batch)
    assert _wait(lambda: _settled(home, batch), 90, "settled"), proc.status()
    wave_two(proc.inbox, tmp_path / "scratch", 77, batch)
    assert _wait(lambda: _settled(home, batch), 90, "settled"), proc.status()
    assert check_final(home, batch)["second_rounds"] == 1
    token = proc.cli("token", "create", "--role", "admin", "--name", "ops").stdout
    token = token.strip().splitlines()[-1]
    proc.kill()

    conn = sqlite3.connect(home / "triage.db")
    images = conn.execute(
        "SELECT instances.id, instances.study_id, instances.path, studies.study_uid "
        "FROM instances JOIN studies ON studies.id = instances.study_id "
        "WHERE scoreable = 1 ORDER BY instances.id").fetchall()
    truncated, flipped, deleted, blob = images[0], images[3], images[6], images[9]
    path = home / truncated[2]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _flip(home / flipped[2], [128, 129, 130, 131, 140, 200, 300])
    (home / deleted[2]).unlink()
    conn.execute("UPDATE images SET data = substr(data, 1, 10) WHERE instance_id = ?",
                 [blob[0]])
    conn.commit()
    conn.close()

    proc = HarnessDaemon(home, ENV, []).start()
    try:
        # a late instance reopens the study whose stored image is damaged
        _drop(proc.inbox, "late/again.dcm", _image_bytes(tmp_path / "scratch", blob[3], 4242, 7))
        assert _wait(lambda: _scalar(home, f"SELECT COUNT(*) FROM studies WHERE id = {blob[1]} "
                                           "AND state = 'error'") == 1, 30, "error"), (
            proc.status())
        conn = _connect(home)
        reason, count = conn.execute("SELECT error_reason, error_count FROM studies "
                                     "WHERE id = ?", [blob[1]]).fetchone()
        statuses = [r[0] for r in conn.execute(
            "SELECT status FROM study_results WHERE study_id = ? ORDER BY id", [blob[1]])]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        assert "could not be read" in reason and count == 1 and statuses[-1] == "error"

        headers = {"Authorization": f"Bearer {token}"}
        answers = {}
        for name, (instance_id, study_id, _, _) in (
            ("truncated", truncated), ("flipped", flipped), ("deleted", deleted),
        ):
            response = httpx.get(f"{proc.url}/api/studies/{study_id}/images/{instance_id}/0.png",
                                 headers=headers, timeout=30)
            answers[name] = response.status_code
            if response.status_code != 200:  # flipped header bytes may still decode
                # named, server-side: not a bare "Internal Server Error", not a 400
                assert response.status_code == 500, (name, response.text)
                assert "archived file of this instance cannot be read" in (
                    response.json()["detail"]), (name, response.text)
        assert answers["truncated"] == answers["deleted"] == 500, answers
        log_text = (home / "logs" / "triage.log").read_text()
        assert log_text.count('"archive_file_unreadable"') >= 2
        assert '"reason_code": "missing"' in log_text
        assert httpx.get(f"{proc.url}/healthz", timeout=5).json()["ok"]
        print(f"corruption: study error reason {reason!r}; image answers {answers}")
    finally:
        proc.stop(signal.SIGTERM)
    check_logs(home)
