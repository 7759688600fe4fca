"""The fault-injection harness's shared pieces: the real daemon as a killable subprocess,
waves of real DICOM files, and the invariants checked after every fault.

Used by ``tests/test_fault_harness.py`` (seeded kill points and corruption between runs)
and by ``bench/faults.py`` (ten fault scenarios, counted into bench/results/faults.json),
so both check the same invariants. Each invariant check returns :class:`Problem` records
of one of :data:`KINDS`; the ``check_*`` functions assert that there are none.

* ``lost``: a file that entered the inbox with no row, or no final state, once the daemon
  settled; a stored file or instance whose archive file is gone or differs; a routed
  study without its queue item; a labelled queue item without its label; a promoted
  registry left with no serving version; an acknowledged label missing.
* ``duplicated``: two rows for one inbox file, a final file still in the inbox (it would
  be read again), two instances of one SOP Instance UID, both byte-identical copies
  archived, a study round decided twice, two serving models, two current labels.
* ``stuck``: after recovery settled, a file still in the inbox or in flight
  (``received``/``reading``/``moving``), a study ``open``/``complete``/``scoring``, a
  study ``waiting_model`` while a promoted version loads, an ``error`` study whose
  retry is overdue or that has no reason, a ``running`` retrain whose process is gone,
  a ``candidate`` of a run that ended, a claim whose lease is longer than any lease the
  daemon grants (the clock went back).
* ``other``: any other broken invariant (integrity check, audit trail against labels,
  a queue item's reason, orphan or temporary files, a traceback or patient identifier
  in the logs).

``flooded`` is measured by the bench around each fault (queue growth against the label
rate), not from a single state.
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from conftest import FAST_ENV, PHI_STRINGS, REPO, DaemonProcess, make_image  # noqa: F401

from triage.store import db as store
from triage.store.db import DATABASE_ERRORS, FINAL_FILE_STATES

FINAL = FINAL_FILE_STATES
IN_FLIGHT_FILES = ("received", "reading", "moving")
STORED = ("archived", "unsupported", "out_of_scope")
KINDS = ("lost", "duplicated", "stuck", "other")


class Problem(NamedTuple):
    """One broken invariant: its kind (:data:`KINDS`) and a stable one-line detail."""

    kind: str
    detail: str


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

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# -- the batch ---------------------------------------------------------------------------


@dataclass
class Batch:
    """What was put in the inbox and what each file must end as."""

    expect: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rel -> allowed states
    bad_codes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # rel -> reason codes
    studies: set[str] = field(default_factory=set)
    # byte-identical copies: whichever is read first is archived, the other a duplicate
    copies: list[tuple[str, str]] = field(default_factory=list)
    study_files: dict[str, list[str]] = field(default_factory=dict)  # study UID -> rels

    def add(self, study: str, rel: str, states: tuple[str, ...] = ("archived",)) -> None:
        self.studies.add(study)
        self.study_files.setdefault(study, []).append(rel)
        self.expect[rel] = states


def drop(inbox: Path, rel: str, data: bytes) -> None:
    """Deliver as a careful sender does: a temporary name, then a rename."""
    dest = inbox / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def image_bytes(scratch: Path, study: str, seed: int, number: int, size: int = 48) -> bytes:
    scratch.mkdir(parents=True, exist_ok=True)
    path = make_image(scratch / f"{seed}.dcm", study_uid=study, seed=seed, size=size,
                      instance_number=number, window=(40.0, 400.0))
    data = path.read_bytes()
    path.unlink()
    return data


def wave_one(inbox: Path, scratch: Path, seed: int, batch: Batch, prefix: str = "") -> None:
    """Three studies of three instances, a byte-identical resend, and three bad files
    (empty, not DICOM, truncated). ``prefix`` keeps the names of later waves apart."""
    base = 1000 * (seed + 1)
    for s in range(3):
        study = f"2.25.{base + s}"
        for i in range(3):
            rel = f"{prefix}w1/s{s}/i{i}.dcm"
            data = image_bytes(scratch, study, base + 10 * s + i, i + 1)
            drop(inbox, rel, data)
            batch.add(study, rel)
            if s == 0 and i == 0:
                resend = f"{prefix}w1/resend.dcm"
                drop(inbox, resend, data)  # byte-identical resend
                batch.add(study, resend, ("archived", "duplicate"))
                batch.expect[rel] = ("archived", "duplicate")
                batch.copies.append((rel, resend))
    drop(inbox, f"{prefix}w1/empty.dcm", b"")
    batch.bad_codes[f"{prefix}w1/empty.dcm"] = ("empty_file",)
    drop(inbox, f"{prefix}w1/report.dcm", b"typed report, not an image\n" * 30)
    batch.bad_codes[f"{prefix}w1/report.dcm"] = ("not_dicom",)
    full = image_bytes(scratch, f"2.25.{base + 9}", base + 99, 1)
    drop(inbox, f"{prefix}w1/truncated.dcm", full[: len(full) - 700])
    batch.bad_codes[f"{prefix}w1/truncated.dcm"] = ("truncated", "invalid_header")


def wave_two(inbox: Path, scratch: Path, seed: int, batch: Batch, prefix: str = "") -> None:
    """Arrives later: a new two-instance study, a late instance of study 0 (a second
    round), and one more bad file."""
    base = 1000 * (seed + 1)
    study = f"2.25.{base + 5}"
    for i in range(2):
        rel = f"{prefix}w2/s5/i{i}.dcm"
        drop(inbox, rel, image_bytes(scratch, study, base + 50 + i, i + 1))
        batch.add(study, rel)
    drop(inbox, f"{prefix}w2/late.dcm", image_bytes(scratch, f"2.25.{base}", base + 7, 9))
    batch.add(f"2.25.{base}", f"{prefix}w2/late.dcm")
    drop(inbox, f"{prefix}w2/junk.dcm", os.urandom(2048))
    batch.bad_codes[f"{prefix}w2/junk.dcm"] = ("not_dicom", "invalid_header")


def single_studies(inbox: Path, scratch: Path, first_uid: int, count: int, batch: Batch,
                   prefix: str) -> list[str]:
    """``count`` one-image studies (UIDs ``2.25.<first_uid + k>``); their UIDs."""
    uids = []
    for k in range(count):
        uid = f"2.25.{first_uid + k}"
        rel = f"{prefix}single/{k}.dcm"
        drop(inbox, rel, image_bytes(scratch, uid, first_uid + k, 1))
        batch.add(uid, rel)
        uids.append(uid)
    return uids


def all_expected(batch: Batch) -> dict[str, tuple[str, ...]]:
    return {**batch.expect, **{rel: ("quarantined",) for rel in batch.bad_codes}}


# -- reading the store -------------------------------------------------------------------


# A daemon's store: its home's SQLite file, or the PostgreSQL database `use_store`
# names for that home (bench/faults.py --store postgresql).
_STORES: dict[Path, str] = {}


def use_store(home: Path, url: str) -> None:
    """The daemon of `home` keeps its store in the PostgreSQL database `url`."""
    _STORES[Path(home).resolve()] = url


def store_of(home: Path) -> Path | str:
    return _STORES.get(Path(home).resolve(), home / "triage.db")


def store_exists(home: Path) -> bool:
    """Whether the daemon created its store (a SIGKILL may land before it did)."""
    target = store_of(home)
    if not isinstance(target, str):
        return Path(target).exists()
    try:
        db = store.connect(target, readonly=True)
    except DATABASE_ERRORS:
        return False
    try:
        return db.execute("SELECT to_regclass('files') IS NOT NULL").fetchone()[0] in (1, True)
    finally:
        db.close()


def connect_ro(home: Path):  # type: ignore[no-untyped-def]
    """A read-only connection to the daemon's store (sqlite3's, or the store's own on
    PostgreSQL: the same execute/fetch/close)."""
    target = store_of(home)
    if isinstance(target, str):
        return store.connect(target, readonly=True)
    return sqlite3.connect(f"file:{target}?mode=ro", uri=True, timeout=30)


def scalar(home: Path, sql: str, params: Iterable[object] = ()) -> int:
    if not store_exists(home):
        return 0
    try:
        conn = connect_ro(home)
    except DATABASE_ERRORS:
        return 0
    try:
        value = conn.execute(sql, list(params)).fetchone()[0]
        return int(value or 0)
    except DATABASE_ERRORS:  # schema not created yet
        return 0
    finally:
        conn.close()


_FINAL_SQL = ", ".join(f"'{state}'" for state in FINAL)


def final_files(home: Path) -> int:
    return scalar(home, f"SELECT COUNT(*) FROM files WHERE state IN ({_FINAL_SQL})")


def decisions(home: Path) -> int:
    return scalar(home, "SELECT COUNT(*) FROM decisions")


def in_flight(home: Path) -> int:
    return scalar(home, "SELECT (SELECT COUNT(*) FROM files WHERE state IN "
                        "('reading','moving')) + (SELECT COUNT(*) FROM studies WHERE "
                        "state = 'scoring')")


def inbox_files(home: Path) -> list[Path]:
    return [p for p in (home / "inbox").rglob("*") if p.is_file()]


# -- invariants --------------------------------------------------------------------------


def always_problems(home: Path, damaged: Iterable[str] = ()) -> list[Problem]:
    """Invariants that hold at every instant, a SIGKILL included.

    ``damaged``: inbox paths (or archive paths) whose stored file a fault damaged on
    purpose; their archive content is not checked.
    """
    damaged = set(damaged)
    out: list[Problem] = []
    conn = connect_ro(home)
    try:
        # SQLite's own checks; PostgreSQL enforces foreign keys as it writes
        if isinstance(conn, sqlite3.Connection):
            if conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                out.append(Problem("other", "database integrity check failed"))
            if conn.execute("PRAGMA foreign_key_check").fetchall():
                out.append(Problem("other", "foreign key check failed"))
        for rel, n in conn.execute("SELECT inbox_path, COUNT(*) FROM files "
                                   "GROUP BY origin, inbox_path HAVING COUNT(*) > 1"):
            out.append(Problem("duplicated", f"inbox file {rel} has {n} rows"))
        # a final row's file is where its state says
        for rel, state, stored, sha, code, origin in conn.execute(
            "SELECT inbox_path, state, stored_path, sha256, reason_code, origin FROM files"
        ):
            if state not in FINAL:
                continue
            if origin == "inbox" and (home / "inbox" / rel).exists():
                out.append(Problem("duplicated", f"{rel} is {state} but still in the inbox"))
            if rel in damaged or stored in damaged:
                continue
            if state in STORED:
                try:
                    data = (home / stored).read_bytes()
                except OSError as exc:
                    out.append(Problem("lost", f"{rel}: archived file unreadable "
                                               f"({type(exc).__name__})"))
                    continue
                if hashlib.sha256(data).hexdigest() != sha:
                    out.append(Problem("lost", f"{rel}: archive differs"))
            elif state == "quarantined":
                if not (home / stored).exists():
                    out.append(Problem("lost", f"{rel}: quarantined file missing"))
                    continue
                sidecar = json.loads((home / stored).with_suffix(".json").read_text())
                if sidecar["reason_code"] != code or not sidecar["reason"]:
                    out.append(Problem("other", f"{rel}: quarantine sidecar {sidecar}"))
        # an instance row exists only with its archive file; one instance per SOP UID
        for (path,) in conn.execute("SELECT path FROM instances"):
            if path not in damaged and not (home / path).is_file():
                out.append(Problem("lost", f"instance without its archive file: {path}"))
        for uid, n in conn.execute("SELECT sop_uid, COUNT(*) FROM instances GROUP BY sop_uid "
                                   "HAVING COUNT(*) > 1"):
            out.append(Problem("duplicated", f"SOP instance {uid} stored {n} times"))
        out += _decision_problems(conn)
        out += _label_problems(conn)
        out += _registry_problems(conn)
    finally:
        conn.close()
    return out


def _decision_problems(conn: sqlite3.Connection) -> list[Problem]:
    """One decision per study round; one queue item per routed study, agreeing with the
    decisions (its reason is the first routed decision's: it never changes)."""
    out = []
    for study_id, round_, n in conn.execute(
        "SELECT study_id, round, COUNT(*) FROM decisions GROUP BY study_id, round "
        "HAVING COUNT(*) > 1"
    ):
        out.append(Problem("duplicated", f"study {study_id} round {round_} decided {n} times"))
    for study_id, reason, decision_id in conn.execute(
        "SELECT study_id, reason, decision_id FROM queue_items"
    ):
        decision = conn.execute("SELECT study_id, needs_label FROM decisions WHERE id = ?",
                                [decision_id]).fetchone()
        if reason == "coverage":  # routed by a promoted retrain, on a not-routed decision
            if decision is None or decision[0] != study_id:
                out.append(Problem("other", f"coverage item of study {study_id} lacks "
                                            "its decision"))
            continue
        if decision != (study_id, 1):
            out.append(Problem("other", f"queue item of study {study_id} lacks its decision"))
            continue
        first = conn.execute("SELECT reason FROM decisions WHERE study_id = ? AND "
                             "needs_label = 1 ORDER BY id LIMIT 1", [study_id]).fetchone()
        if first[0] != reason:
            out.append(Problem("other", f"study {study_id}: queue reason {reason}, "
                                        f"first routed as {first[0]}"))
    for (study_id,) in conn.execute(
        "SELECT DISTINCT study_id FROM decisions WHERE needs_label = 1 "
        "AND study_id NOT IN (SELECT study_id FROM queue_items)"
    ):
        out.append(Problem("lost", f"routed study {study_id} missing from the queue"))
    return out


def _label_problems(conn: sqlite3.Connection) -> list[Problem]:
    """Labels agree with the queue and with the append-only audit trail."""
    out = []
    for study_id, n in conn.execute("SELECT study_id, COUNT(*) FROM labels WHERE "
                                    "superseded_by IS NULL GROUP BY study_id "
                                    "HAVING COUNT(*) > 1"):
        out.append(Problem("duplicated", f"study {study_id} has {n} current labels"))
    for (study_id,) in conn.execute(
        "SELECT study_id FROM queue_items WHERE state = 'labeled' AND study_id NOT IN "
        "(SELECT study_id FROM labels)"
    ):
        out.append(Problem("lost", f"queue item of study {study_id} labeled without a label"))
    for (study_id,) in conn.execute(
        "SELECT DISTINCT labels.study_id FROM labels JOIN queue_items ON "
        "queue_items.id = labels.item_id WHERE queue_items.state != 'labeled'"
    ):
        out.append(Problem("other", f"study {study_id} has a label but its item is not "
                                    "labeled"))
    for action, correction in (("label", 0), ("correct", 1)):
        labels = conn.execute("SELECT COUNT(*) FROM labels WHERE is_correction = ?",
                              [correction]).fetchone()[0]
        audited = conn.execute("SELECT COUNT(*) FROM audit WHERE action = ?",
                               [action]).fetchone()[0]
        if labels != audited:
            out.append(Problem("other", f"{labels} {action} rows but {audited} in the audit "
                                        "trail"))
    return out


def _registry_problems(conn: sqlite3.Connection) -> list[Problem]:
    """Exactly one serving model once any version was promoted, none before."""
    serving = conn.execute("SELECT COUNT(*) FROM models WHERE status = 'serving'").fetchone()[0]
    promoted = conn.execute("SELECT COUNT(*) FROM models WHERE promoted_at IS NOT NULL"
                            ).fetchone()[0]
    if serving > 1:
        return [Problem("duplicated", f"{serving} serving models")]
    if promoted and not serving:
        return [Problem("lost", "versions were promoted but none is serving")]
    return []


def check_always(home: Path) -> None:
    """Assert the invariants that hold at every instant, a SIGKILL included."""
    problems = always_problems(home)
    assert not problems, problems


def scored_only(state: str, row: dict) -> str | None:
    """The kill harness's rule: every study ends ``scored``."""
    return None if state == "scored" else f"ended {state}"


def final_problems(
    home: Path,
    batch: Batch,
    *,
    damaged: Iterable[str] = (),
    study_rule: Callable[[str, dict], str | None] = scored_only,
    strict_results: bool = True,
) -> tuple[list[Problem], dict[str, int]]:
    """Everything settled: all of :func:`always_problems`, every inbox file in its
    expected final state, nothing left over, every study as ``study_rule`` allows.

    Returns the problems and the count of files per final state (plus
    ``second_rounds``: studies scored more than once).
    """
    out = always_problems(home, damaged)
    expected = all_expected(batch)
    conn = connect_ro(home)
    try:
        rows = {rel: (state, code) for rel, state, code in conn.execute(
            "SELECT inbox_path, state, reason_code FROM files WHERE origin = 'inbox'")}
        for rel in sorted(set(expected) - set(rows)):
            if (home / "inbox" / rel).exists():
                out.append(Problem("stuck", f"{rel} still in the inbox, never read"))
            else:
                out.append(Problem("lost", f"{rel} left the inbox with no row"))
        for rel in sorted(set(rows) - set(expected)):
            out.append(Problem("other", f"unexpected row for {rel}"))
        states: dict[str, int] = {}
        for rel, (state, code) in rows.items():
            states[state] = states.get(state, 0) + 1
            if rel not in expected:
                continue
            if state in IN_FLIGHT_FILES:
                out.append(Problem("stuck", f"{rel} left {state}"))
                continue
            if state not in FINAL:
                out.append(Problem("lost", f"{rel} has no final state ({state})"))
                continue
            if code == "reader_crashed":  # killed twice while reading it: by design
                continue
            if state not in expected[rel]:
                out.append(Problem("other", f"{rel}: {state} ({code}), expected {expected[rel]}"))
            elif rel in batch.bad_codes and code not in batch.bad_codes[rel]:
                out.append(Problem("other", f"{rel}: reason {code}"))
        for pair in batch.copies:
            got = sorted(rows[rel][0] for rel in pair if rel in rows)
            if got == ["archived", "archived"]:
                out.append(Problem("duplicated", f"both copies archived: {pair}"))
            elif len(got) == 2 and got != ["archived", "duplicate"] and (
                    rows[pair[0]][1] != "reader_crashed" and rows[pair[1]][1] != "reader_crashed"):
                out.append(Problem("other", f"copies {pair} ended {got}"))
        for path in inbox_files(home):
            rel = str(path.relative_to(home / "inbox"))
            if rel in rows and rows[rel][0] in FINAL:
                continue  # counted as duplicated by always_problems
            if rel in expected and rel in rows:
                continue  # counted above
            if rel not in expected:
                out.append(Problem("stuck", f"{rel} in the inbox"))
        # nothing stored that no row accounts for (a kill between move and commit)
        stored = {r[0] for r in conn.execute("SELECT stored_path FROM files "
                                             "WHERE stored_path IS NOT NULL")}
        for folder in ("archive", "quarantine"):
            for path in (home / folder).rglob("*"):
                if path.is_file() and path.suffix != ".json":
                    if str(path.relative_to(home)) not in stored:
                        out.append(Problem("other", f"orphan {path.relative_to(home)}"))
                if path.suffix == ".tmp" or path.name.endswith(".partial"):
                    out.append(Problem("other", f"left-over temporary file {path.name}"))
        studies = conn.execute(
            "SELECT id, study_uid, state, round, error_count, error_reason, (SELECT "
            "MAX(created_at) FROM study_results WHERE study_id = studies.id) FROM studies"
        ).fetchall()
        for uid in sorted(batch.studies - {row[1] for row in studies}):
            out.append(Problem("lost", f"study {uid} never assembled"))
        for uid in sorted({row[1] for row in studies} - batch.studies):
            out.append(Problem("other", f"study {uid} was never sent"))
        for study_id, _, state, round_, error_count, error_reason, last_result in studies:
            row = {"id": study_id, "round": round_, "error_count": error_count,
                   "error_reason": error_reason, "last_result_at": last_result}
            why = study_rule(state, row)
            if why is not None:
                out.append(Problem("stuck", f"study {study_id} {why}"))
            rounds = [r for (r,) in conn.execute(
                "SELECT round FROM decisions WHERE study_id = ? ORDER BY round", [study_id])]
            if state != "scored":
                continue
            # a study reopened before its turn skips a round; its last round is decided once
            if not (rounds and rounds[-1] == round_ and len(rounds) == len(set(rounds))):
                out.append(Problem("other", f"study {study_id} round {round_}: decisions for "
                                            f"rounds {rounds}"))
            if strict_results:
                results = conn.execute("SELECT COUNT(*) FROM study_results WHERE study_id = ?",
                                       [study_id]).fetchone()[0]
                if results != len(rounds):
                    out.append(Problem("other", f"study {study_id}: {results} results for "
                                                f"rounds {rounds}"))
        # whether the late instance came after study 0 was decided (a second round) or before
        states["second_rounds"] = conn.execute(
            "SELECT COUNT(*) FROM studies WHERE round >= 2").fetchone()[0]
    finally:
        conn.close()
    return out, states


def check_final(home: Path, batch: Batch) -> dict[str, int]:
    """Assert that everything settled: all invariants, every file and study done."""
    problems, states = final_problems(home, batch)
    assert not problems, problems
    return states


def log_problems(home: Path, stderr: Path | None = None) -> list[Problem]:
    """No traceback and no patient identifier in anything the daemon wrote."""
    texts = {}
    stderr = stderr or home / "stderr.log"
    if stderr.exists():
        texts["stderr"] = stderr.read_text(errors="replace")
    for path in (home / "logs").glob("*.log*"):
        texts[path.name] = path.read_text(errors="replace")
    for path in (home / "quarantine").glob("*.json"):
        texts[path.name] = path.read_text()
    out = []
    for name, text in texts.items():
        at = text.find("Traceback")
        for _ in range(5):  # each one, with what led to it (a few at most)
            if at < 0:
                break
            out.append(Problem("other", f"traceback in {name}: "
                                        f"{text[max(0, at - 300):at + 2700]}"))
            at = text.find("Traceback", at + 1)
        # uvicorn's unhandled-exception line (the JSON log keeps only the type)
        if "Exception in ASGI application" in text:
            out.append(Problem("other", f"unhandled error in {name}"))
        for secret in PHI_STRINGS:
            if secret in text:
                out.append(Problem("other", f"patient identifier {secret!r} in {name}"))
    return out


def check_logs(home: Path) -> None:
    problems = log_problems(home)
    assert not problems, problems


def settled(home: Path, batch: Batch, done_states: tuple[str, ...] = (
        "scored", "unscoreable", "out_of_scope", "error")) -> bool:
    """Inbox empty, every expected file final, every expected study in ``done_states``."""
    if inbox_files(home):
        return False
    if final_files(home) < len(all_expected(batch)):
        return False
    marks = ", ".join(f"'{s}'" for s in done_states)
    return scalar(home, f"SELECT COUNT(*) FROM studies WHERE state NOT IN ({marks})") == 0 \
        and scalar(home, "SELECT COUNT(*) FROM studies") >= len(batch.studies)


def wait_until(predicate: Callable[[], bool], timeout: float, poll: float = 0.003) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


# -- kill points -------------------------------------------------------------------------

KILL_KINDS = ("startup", "files", "files", "decisions", "in_flight", "in_flight", "shutdown")


def plan_kills(rng: random.Random, n: int, total_files: int,
               kinds: tuple[str, ...] = KILL_KINDS, files_done: int = 0,
               max_decisions: int = 5) -> list[tuple[str, float]]:
    """``n`` kill points from the seed: (kind, target), targets growing within a kind so
    every restart makes progress."""
    plan = []
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
        elif kind == "scoring":
            plan.append((kind, rng.uniform(0.0, 0.05)))  # this long after a study is scoring
        else:
            plan.append((kind, rng.uniform(0.0, 0.03)))
    return plan


def kill_at(proc: HarnessDaemon, kind: str, target: float, baseline: int, batch: Batch,
            max_decisions: int = 5) -> str:
    """Start ``proc`` and SIGKILL it at the kill point; return what actually happened.

    A point that can no longer come (nothing left in flight) falls back to a kill as
    soon as the daemon has drained, marked "(drained)"; one that did not come in time,
    to a kill at the timeout, marked "(timeout)"."""
    home = proc.home
    drained = False

    def in_flight_or_drained() -> bool:
        return in_flight(home) > 0 or settled(home, batch)

    def scoring_or_drained() -> bool:
        return scalar(home, "SELECT COUNT(*) FROM studies WHERE state = 'scoring'") > 0 \
            or settled(home, batch)

    if kind == "startup":
        proc.spawn()
        time.sleep(target)
        proc.kill()
        return f"startup+{target:.2f}s"
    if kind in ("in_flight", "shutdown", "scoring"):
        proc.spawn()  # ingestion starts before the HTTP server answers: watch from the start
    else:
        proc.start()
    if kind == "files":
        hit = wait_until(lambda: final_files(home) >= target, 20)
    elif kind == "shutdown":
        # an orderly stop cut short: SIGTERM while files or studies are in flight
        hit = wait_until(in_flight_or_drained, 10)
        drained = hit and in_flight(home) == 0
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(target)
        proc.kill(sigterm_sent=True)
        return f"{kind}@{target:.3g}" + (" (drained)" if drained else "")
    elif kind == "decisions":
        goal = min(baseline + target, max_decisions)
        hit = wait_until(lambda: decisions(home) >= goal or settled(home, batch), 12)
    elif kind == "scoring":
        hit = wait_until(scoring_or_drained, 15)
        drained = hit and scalar(home, "SELECT COUNT(*) FROM studies WHERE "
                                       "state = 'scoring'") == 0
        time.sleep(target)
    else:
        hit = wait_until(in_flight_or_drained, 10)
        drained = hit and in_flight(home) == 0
        time.sleep(target)
    proc.kill()
    note = " (timeout)" if not hit else " (drained)" if drained else ""
    return f"{kind}@{target:.3g}{note}"
