"""Replicas sharing one store: who is alive, and leases that one replica holds at a time.

Several daemons may run on one PostgreSQL database (`store.url`), each with its own home
(inbox, logs) and the shared `paths.archive`, `paths.models` and `paths.quarantine`. They
split the work without a coordinator of their own, through three tables:

* ``replicas``: one row per replica, by name (`replica.name`, by default the host name
  and a digest of the home directory), with its roles, host, pid and its heartbeat,
  written every `replica.heartbeat_seconds`. A replica is *live* while its heartbeat is
  younger than `replica.lease_seconds` and it has not stopped.
* ``studies.claimed_by``: the replica scoring a study (state ``scoring``), and
  ``gate_buffer.replica``, the replica whose batch a ``batched`` study waits in. What a
  replica that is no longer live held goes back to ``complete`` and is scored by another
  (:func:`release_dead_claims`); a replica that lost its claim stores nothing for it.
* ``leases``: a named lease (``retrain``: the retrain scheduler) held by one replica
  until it expires; the holder renews it, another takes it once it has expired.

Claims need no ``SELECT ... FOR UPDATE SKIP LOCKED``: every write transaction of the
store holds the one write lock (SQLite's, or an advisory lock on PostgreSQL,
:mod:`triage.store.postgres`), so a claim's read and its update are never interleaved
with another replica's. Times are the replicas' wall clocks (epoch seconds): their hosts'
clocks must agree to well within the lease (NTP does).

With one daemon on SQLite there is one row, and nothing changes but a heartbeat write
every few seconds.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from triage.store.db import Database, transaction


NAME_FILE = "triage.replica"  # in the home: the name this home's daemon runs under


def default_name(home: Path) -> str:
    """This host's name and a digest of the home directory: distinct for two daemons on
    one host, and no path (names are metric labels)."""
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:6]
    return f"{socket.gethostname()}-{digest}"


def stored_name(home: Path) -> str | None:
    """The name the daemon of `home` last ran under (kept in the home, so that a new
    host name, as a recreated container gets, or a moved home keeps it)."""
    try:
        return (Path(home) / NAME_FILE).read_text().strip() or None
    except OSError:
        return None


def adopt_name(db: Database, home: Path, name: str) -> str | None:
    """Start-up, holding the home's lock: run under `name` from now on. What the home's
    previous name held in flight (files not yet read, studies being scored or waiting
    in its batch, a running retrain) is its own: re-tagged to `name`. Returns the
    previous name when it differed."""
    previous = stored_name(home)
    if previous is not None and previous != name:
        with transaction(db):
            db.execute("UPDATE files SET replica = ? WHERE replica = ? AND state IN "
                       "('received', 'reading', 'moving')", [name, previous])
            db.execute("UPDATE studies SET claimed_by = ? WHERE claimed_by = ?",
                       [name, previous])
            db.execute("UPDATE gate_buffer SET replica = ? WHERE replica = ?", [name, previous])
            db.execute("UPDATE retrain_runs SET replica = ? WHERE replica = ? AND "
                       "state = 'running'", [name, previous])
    partial = Path(home) / (NAME_FILE + ".partial")
    partial.write_text(name + "\n")
    os.replace(partial, Path(home) / NAME_FILE)
    return previous if previous != name else None


def register(db: Database, name: str, roles: list[str], now: float) -> None:
    """Record this replica as started (a restart of the same name replaces its row)."""
    with transaction(db):
        db.execute(
            "INSERT INTO replicas (name, roles, host, pid, started_at, heartbeat_at, "
            "stopped_at) VALUES (?, ?, ?, ?, ?, ?, NULL) "
            "ON CONFLICT (name) DO UPDATE SET roles = excluded.roles, host = excluded.host, "
            "pid = excluded.pid, started_at = excluded.started_at, "
            "heartbeat_at = excluded.heartbeat_at, stopped_at = NULL",
            [name, ",".join(roles), socket.gethostname(), os.getpid(), now, now],
        )
        # files journaled before replicas were recorded (one daemon) and not yet final
        db.execute("UPDATE files SET replica = ? WHERE replica IS NULL AND state IN "
                   "('received', 'reading', 'moving')", [name])


def heartbeat(db: Database, name: str, now: float) -> None:
    """This replica is alive at `now`."""
    with transaction(db):
        db.execute("UPDATE replicas SET heartbeat_at = ? WHERE name = ?", [now, name])


def stopped(db: Database, name: str, now: float) -> None:
    """This replica stopped cleanly: not live from now on (its claims may be taken)."""
    with transaction(db):
        db.execute("UPDATE replicas SET stopped_at = ? WHERE name = ?", [now, name])


def live_names(db: Database, now: float, lease_seconds: float) -> set[str]:
    """Names of the live replicas (heartbeat younger than the lease, not stopped)."""
    return {str(name) for (name,) in db.execute(
        "SELECT name FROM replicas WHERE stopped_at IS NULL AND heartbeat_at > ?",
        [now - lease_seconds],
    ).fetchall()}


def listing(db: Database, now: float, lease_seconds: float) -> list[dict[str, Any]]:
    """Every replica that ever registered, for the status page and the ops summary:
    name, roles, host, started, last heartbeat (seconds ago), live, stopped."""
    rows = db.execute(
        "SELECT name, roles, host, started_at, heartbeat_at, stopped_at "
        "FROM replicas ORDER BY name"
    ).fetchall()
    return [{
        "name": str(name), "roles": [r for r in str(roles).split(",") if r],
        "host": str(host), "started_at": float(started),
        "last_heartbeat_seconds": round(max(0.0, now - float(beat)), 1),
        "live": stopped_at is None and float(beat) > now - lease_seconds,
        "stopped": stopped_at is not None,
    } for name, roles, host, started, beat, stopped_at in rows]


def release_dead_claims(db: Database, name: str, now: float,
                        lease_seconds: float) -> dict[str, list[int]]:
    """Studies held by replicas that are not live go back to ``complete``: those being
    scored (``scoring``; claims without a holder, written before replicas were recorded,
    count as dead) and those waiting in a dead replica's batch (``batched``, their
    `gate_buffer` rows deleted; a buffer row without a holder is the restarting
    replica's to restore, `GateScorer`). So does what replica `name` holds ``scoring``:
    its scoring worker asks between studies, when it holds none (at start-up, or after a
    try whose result could not be stored); its batch is restored by its scorer. Returns
    the study ids by former state (``scoring``, ``batched``) and, among the ``scoring``
    ones, `name`'s own (``own``)."""
    if not any(_releasable(db, name, now, lease_seconds).values()):
        return {"scoring": [], "batched": [], "own": []}  # the usual case: no write lock
    with transaction(db):
        released = _releasable(db, name, now, lease_seconds)  # again, under the lock
        for study_id in released["scoring"]:
            db.execute("UPDATE studies SET state = 'complete', claimed_by = NULL "
                       "WHERE id = ? AND state = 'scoring'", [study_id])
        for study_id in released["batched"]:
            db.execute("DELETE FROM gate_buffer WHERE study_id = ?", [study_id])
            db.execute("UPDATE studies SET state = 'complete', claimed_by = NULL "
                       "WHERE id = ? AND state = 'batched'", [study_id])
    return released


def _releasable(db: Database, name: str, now: float,
                lease_seconds: float) -> dict[str, list[int]]:
    """What `release_dead_claims` releases, read only."""
    live = live_names(db, now, lease_seconds) - {name}
    held = db.execute(
        "SELECT id, claimed_by FROM studies WHERE state = 'scoring' ORDER BY id"
    ).fetchall()
    batched = db.execute(
        "SELECT b.study_id, b.replica FROM gate_buffer b JOIN studies s "
        "ON s.id = b.study_id AND s.round = b.round WHERE s.state = 'batched' "
        "AND b.replica IS NOT NULL AND b.replica != ? ORDER BY b.id", [name]
    ).fetchall()
    return {"scoring": [int(study_id) for study_id, holder in held if holder not in live],
            "batched": [int(study_id) for study_id, holder in batched if holder not in live],
            "own": [int(study_id) for study_id, holder in held if holder == name]}


def take_lease(db: Database, lease: str, holder: str, now: float, seconds: float) -> bool:
    """Take or renew the named lease for `seconds`; False while another holds it."""
    with transaction(db):
        row = db.execute("SELECT holder, expires_at FROM leases WHERE name = ?",
                         [lease]).fetchone()
        if row is not None and row[0] != holder and float(row[1]) > now:
            return False
        db.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, "
            "expires_at = excluded.expires_at",
            [lease, holder, now + seconds],
        )
    return True


def release_lease(db: Database, lease: str, holder: str) -> None:
    """Give the named lease up (only if `holder` holds it)."""
    with transaction(db):
        db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", [lease, holder])


def lease_holder(db: Database, lease: str, now: float) -> str | None:
    """Who holds the named lease now, None when nobody does."""
    row = db.execute("SELECT holder FROM leases WHERE name = ? AND expires_at > ?",
                     [lease, now]).fetchone()
    return None if row is None else str(row[0])
