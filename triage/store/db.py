"""The store: one way to open it, the schema and its migrations.

SQLite (one file, through sqlite-utils) is the embedded default; ``store.url`` names a
PostgreSQL server instead (:mod:`triage.store.postgres`), with the same schema, the same
migration history and the same SQL. Every thread opens its own connection with
:func:`connect`. On SQLite, WAL mode lets the HTTP server read while ingestion writes;
the busy timeout makes writers wait instead of fail. The schema version is SQLite's
``user_version`` (PostgreSQL: the ``triage_schema`` table); :data:`MIGRATIONS` are applied
in order, each in its own write transaction that first reads the version, so an
interrupted upgrade is rolled back whole and processes starting at once apply each step
once.
"""

from __future__ import annotations

import math
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Union

import psycopg
import sqlite_utils

from triage.store.settings import POSTGRES_SCHEMES

if TYPE_CHECKING:
    from triage.store.postgres import PostgresDatabase

BUSY_TIMEOUT_MS = 30_000
DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
"""What a failing database raises, on either backend."""

# File states. ``reading`` and ``moving`` are the two in-flight states of the ingestion
# journal; the others are final and every file that entered the inbox ends in one.
# ``out_of_scope``: an image outside ``scope`` (triage/ingest/scope.py), archived unscored.
FINAL_FILE_STATES = ("archived", "unsupported", "out_of_scope", "quarantined", "duplicate",
                     "vanished")
# ``unscoreable``: no scoreable image; ``out_of_scope``: no scoreable image and at least
# one image outside ``scope``; neither reaches the scorer. ``error``: the study's stored
# images could not be read; ``error_reason`` says why, and a late instance reopens it
# like any other study. ``waiting_model``: models exist but none
# loads; neither scored nor routed, it goes back to ``complete`` once one loads again.
# ``batched``: scored under the `batch` budget manager and waiting in ``gate_buffer`` for
# its batch to be decided; it becomes ``scored`` with its decision.
STUDY_STATES = ("open", "complete", "scoring", "batched", "scored", "unscoreable",
                "out_of_scope", "error", "waiting_model")

MIGRATIONS: tuple[str, ...] = (
    # 1: ingestion journal, instances with their preprocessed pixels, studies, results.
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        inbox_path TEXT NOT NULL,
        sha256 TEXT,
        size INTEGER NOT NULL,
        state TEXT NOT NULL,
        target_state TEXT,
        reason_code TEXT,
        reason TEXT,
        stored_path TEXT,
        instance_id INTEGER REFERENCES instances(id),
        attempts INTEGER NOT NULL DEFAULT 1,
        received_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE INDEX files_state ON files(state);
    CREATE TABLE studies (
        id INTEGER PRIMARY KEY,
        study_uid TEXT NOT NULL UNIQUE,
        state TEXT NOT NULL,
        first_seen_at REAL NOT NULL,
        last_instance_at REAL NOT NULL,
        completed_at REAL,
        n_instances INTEGER NOT NULL DEFAULT 0,
        n_images INTEGER NOT NULL DEFAULT 0,
        round INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX studies_state ON studies(state, completed_at);
    CREATE TABLE instances (
        id INTEGER PRIMARY KEY,
        sop_uid TEXT NOT NULL UNIQUE,
        sha256 TEXT NOT NULL,
        study_id INTEGER REFERENCES studies(id),
        series_uid TEXT,
        sop_class_uid TEXT,
        modality TEXT,
        photometric TEXT,
        rows INTEGER,
        cols INTEGER,
        frames INTEGER NOT NULL DEFAULT 0,
        scoreable INTEGER NOT NULL,
        note TEXT,
        path TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX instances_study ON instances(study_id);
    CREATE INDEX instances_sha ON instances(sha256);
    CREATE TABLE images (
        instance_id INTEGER PRIMARY KEY REFERENCES instances(id),
        size INTEGER NOT NULL,
        frames INTEGER NOT NULL,
        data BLOB NOT NULL
    );
    CREATE TABLE study_results (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        round INTEGER NOT NULL,
        status TEXT NOT NULL,
        model_version TEXT,
        detail TEXT,
        created_at REAL NOT NULL
    );
    CREATE INDEX study_results_study ON study_results(study_id);
    """,
    # 2: the model registry and the needs-label gate's decisions.
    """
    CREATE TABLE models (
        version TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        path TEXT NOT NULL,
        parent TEXT,
        source TEXT NOT NULL,
        created_at REAL NOT NULL,
        promoted_at REAL,
        metrics TEXT,
        data_summary TEXT,
        note TEXT
    );
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY,
        result_id INTEGER NOT NULL UNIQUE REFERENCES study_results(id),
        study_id INTEGER NOT NULL REFERENCES studies(id),
        round INTEGER NOT NULL,
        sequence INTEGER NOT NULL,
        created_at REAL NOT NULL,
        model_version TEXT,
        strategy TEXT NOT NULL,
        needs_label INTEGER NOT NULL,
        reason TEXT NOT NULL,
        combined REAL,
        threshold REAL,
        scores TEXT,
        quantiles TEXT,
        prediction TEXT,
        uncertainty TEXT,
        predicted_loss REAL,
        images_scored INTEGER,
        images_total INTEGER,
        decision TEXT NOT NULL
    );
    CREATE INDEX decisions_study ON decisions(study_id);
    CREATE INDEX decisions_routed ON decisions(needs_label, reason);
    """,
    # 3: the review queue, labels, API tokens and the append-only audit trail.
    """
    CREATE TABLE tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        token_hash TEXT NOT NULL UNIQUE,
        created_at REAL NOT NULL,
        revoked_at REAL,
        last_used_at REAL
    );
    CREATE TABLE queue_items (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL UNIQUE REFERENCES studies(id),
        decision_id INTEGER NOT NULL REFERENCES decisions(id),
        reason TEXT NOT NULL,
        priority REAL NOT NULL,
        state TEXT NOT NULL,
        routed_at REAL NOT NULL,
        claimed_by INTEGER REFERENCES tokens(id),
        claimed_at REAL,
        lease_expires_at REAL,
        labeled_at REAL
    );
    CREATE INDEX queue_items_state ON queue_items(state, reason, priority);
    CREATE TABLE labels (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        item_id INTEGER NOT NULL REFERENCES queue_items(id),
        label TEXT NOT NULL,
        comment TEXT,
        token_id INTEGER NOT NULL REFERENCES tokens(id),
        role TEXT NOT NULL,
        created_at REAL NOT NULL,
        seconds_spent REAL,
        model_version TEXT,
        is_correction INTEGER NOT NULL DEFAULT 0,
        superseded_by INTEGER,
        split TEXT
    );
    CREATE INDEX labels_study ON labels(study_id);
    CREATE UNIQUE INDEX labels_one_current ON labels(study_id) WHERE superseded_by IS NULL;
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        role TEXT,
        action TEXT NOT NULL,
        study_id INTEGER,
        address TEXT,
        model_version TEXT,
        detail TEXT
    );
    CREATE INDEX audit_at ON audit(at);
    CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END;
    """,
    # 4: retraining runs (written by the training subprocess, read by the daemon).
    """
    CREATE TABLE retrain_runs (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL,
        state TEXT NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL,
        pid INTEGER,
        progress REAL NOT NULL DEFAULT 0,
        message TEXT,
        labels_used INTEGER,
        candidate_version TEXT,
        metrics TEXT
    );
    CREATE INDEX retrain_runs_state ON retrain_runs(state);
    """,
    # 5: how many coverage queries each promoted run has routed (NULL: not yet).
    """
    ALTER TABLE retrain_runs ADD COLUMN coverage_routed INTEGER;
    """,
    # 6: why a study ended `error`, and how often it did; what orders a study's instances
    # independently of arrival (series number, position along the slice normal, instance
    # number). Instances stored before this step keep NULLs there and sort by UID.
    """
    ALTER TABLE studies ADD COLUMN error_reason TEXT;
    ALTER TABLE studies ADD COLUMN error_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN series_number INTEGER;
    ALTER TABLE instances ADD COLUMN slice_position REAL;
    ALTER TABLE instances ADD COLUMN instance_number INTEGER;
    """,
    # 7: which model the scorer actually serves and why (one row, written by the scoring
    # thread when it changes); the gate's pending budget offset, kept by triggers in the
    # same transaction as the rows that change it: +1 per coverage route (an inserted
    # `coverage` queue item), -1 per `budget_offset` decision, so a restart resumes it.
    """
    CREATE TABLE serving_state (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        registry_version TEXT,
        served_version TEXT,
        ok INTEGER NOT NULL,
        reason TEXT,
        detail TEXT,
        since REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE gate_state (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO gate_state (name, value) VALUES ('budget_offset', 0);
    CREATE TRIGGER gate_offset_coverage AFTER INSERT ON queue_items
        WHEN NEW.reason = 'coverage'
        BEGIN UPDATE gate_state SET value = value + 1 WHERE name = 'budget_offset'; END;
    CREATE TRIGGER gate_offset_paid AFTER INSERT ON decisions
        WHEN NEW.reason = 'budget_offset'
        BEGIN UPDATE gate_state SET value = MAX(0, value - 1) WHERE name = 'budget_offset'; END;
    """,
    # 8: what the review view shows of each instance's header (the window chosen among the
    # header's presets, which one and how many there were, the descriptions), kept at
    # ingest so a view reads no file. `view_cached` = 0: stored before this step; the
    # first view reads that header once and fills the columns.
    """
    ALTER TABLE instances ADD COLUMN view_cached INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE instances ADD COLUMN window_center REAL;
    ALTER TABLE instances ADD COLUMN window_width REAL;
    ALTER TABLE instances ADD COLUMN window_index INTEGER;
    ALTER TABLE instances ADD COLUMN window_count INTEGER;
    ALTER TABLE instances ADD COLUMN window_explanation TEXT;
    ALTER TABLE instances ADD COLUMN series_description TEXT;
    ALTER TABLE instances ADD COLUMN study_description TEXT;
    """,
    # 9: instances that arrive over the network (DICOM C-STORE, DICOMweb STOW-RS) are
    # journaled `received` once their bytes are durable under paths.received, before they
    # are read: `origin` says how a file came (inbox | dicom | stow; `inbox_path` is then
    # its name under paths.received) and `sender` who sent it (calling AE title or token
    # name, never patient data).
    """
    ALTER TABLE files ADD COLUMN origin TEXT NOT NULL DEFAULT 'inbox';
    ALTER TABLE files ADD COLUMN sender TEXT;
    CREATE INDEX files_origin ON files(origin, received_at);
    """,
    # 10: instances outside the model's `scope` (files state `out_of_scope`): the first
    # check they failed (modality | body_part | photometric | size; the reason in words
    # is the instance's `note`), NULL for every other instance. A study with no
    # scoreable image and at least one such instance completes `out_of_scope`.
    """
    ALTER TABLE instances ADD COLUMN scope_reason TEXT;
    """,
    # 11: forgetting events (Toneva et al. 2019) of each labelled study in each retrain
    # run that trained the model it registered: the presentations at which one of its
    # images went from classified correctly to misclassified, and whether every image
    # was classified correctly at some presentation (`learned`).
    """
    CREATE TABLE forgetting (
        run_id INTEGER NOT NULL REFERENCES retrain_runs(id),
        study_id INTEGER NOT NULL REFERENCES studies(id),
        events INTEGER NOT NULL,
        learned INTEGER NOT NULL,
        PRIMARY KEY (run_id, study_id)
    );
    CREATE INDEX forgetting_study ON forgetting(study_id);
    """,
    # 12: scored studies waiting for the `batch` budget manager's next batch (study state
    # `batched`), written in the transaction that scores them and deleted in the one
    # that stores their decisions: the model that scored them, their scores and batch
    # embedding (float32), and the result's detail and decision columns as JSON.
    """
    CREATE TABLE gate_buffer (
        id INTEGER PRIMARY KEY,
        study_id INTEGER NOT NULL REFERENCES studies(id),
        round INTEGER NOT NULL,
        model_version TEXT NOT NULL,
        scored_at REAL NOT NULL,
        scores TEXT NOT NULL,
        embedding BLOB,
        result TEXT NOT NULL
    );
    CREATE UNIQUE INDEX gate_buffer_study ON gate_buffer(study_id, round);
    """,
    # 13: replicas sharing the store (triage/store/replicas.py): each daemon's row and
    # heartbeat, named leases held by one replica at a time (the retrain scheduler), the
    # replica scoring a study (`claimed_by`, while `scoring`), the one whose batch a
    # study waits in (`gate_buffer.replica`), the one that started a retrain run, and
    # the one whose inbox or received folder holds a file (`files.replica`: each reads
    # only its own; rows left in flight before this migration are the first replica's
    # to start, `triage.store.replicas.register`).
    """
    CREATE TABLE replicas (
        name TEXT PRIMARY KEY,
        roles TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at REAL NOT NULL,
        heartbeat_at REAL NOT NULL,
        stopped_at REAL
    );
    CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    ALTER TABLE studies ADD COLUMN claimed_by TEXT;
    ALTER TABLE gate_buffer ADD COLUMN replica TEXT;
    ALTER TABLE retrain_runs ADD COLUMN replica TEXT;
    ALTER TABLE files ADD COLUMN replica TEXT;
    CREATE INDEX files_replica_state ON files(replica, state);
    """,
)


Database = Union[sqlite_utils.Database, "PostgresDatabase"]
"""A store connection: SQLite (sqlite-utils) or PostgreSQL; the same methods on both."""


# Tables whose `id` the database assigns (PostgreSQL returns it to the INSERT).
IDENTITY_TABLES = frozenset(
    name for script in MIGRATIONS
    for name in re.findall(r"CREATE TABLE (\w+) \(\s*id INTEGER PRIMARY KEY,", script)
)


def connect(target: Path | str, *, readonly: bool = False) -> Database:
    """Open the store (creating and migrating it unless ``readonly``).

    Args:
        target: The SQLite file, or a ``postgresql://`` URL (``store.url``); use
            `Settings.database()`, which picks the one configured.
        readonly: Open for reading only; the store must exist and be migrated.
    """
    if is_postgres_url(target):
        from triage.store.postgres import open_postgres

        db: Database = open_postgres(str(target), IDENTITY_TABLES, readonly=readonly,
                                     lock_timeout_ms=BUSY_TIMEOUT_MS)
        if not readonly:
            migrate(db)
        return db
    path = Path(target)
    # A connection is used by one thread at a time, but FastAPI may open it on one worker
    # thread and use it on another within the same request: allow that.
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # FLOOR as PostgreSQL has it, whether or not this SQLite was built with its math
    # functions.
    conn.create_function("floor", 1, _floor, deterministic=True)
    if not readonly:
        _enable_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
    db = sqlite_utils.Database(conn)
    if not readonly:
        migrate(db)
    return db


STUDIES_CHANNEL = "triage_studies"
"""Notified (PostgreSQL ``NOTIFY``) when studies become ready to score, so idle scorers
of every replica wake at once instead of at their next poll."""


def notify(db: Database, channel: str = STUDIES_CHANNEL) -> None:
    """Tell the store's listeners on `channel` (:func:`listen`); nothing on SQLite, where
    one process both writes and scores."""
    if dialect(db) == "postgresql":
        db.execute(f"NOTIFY {channel}")


def listen(target: Path | str, channel: str, wake: Callable[[], None],
           stop: threading.Event) -> None:
    """Call `wake` for each notification on `channel` until `stop` is set; returns at
    once on SQLite. Blocks: run it on a thread of its own."""
    if is_postgres_url(target):
        from triage.store.postgres import listen as pg_listen

        pg_listen(str(target), channel, wake, stop)


def is_postgres_url(target: Path | str) -> bool:
    """Whether ``target`` names a PostgreSQL server rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def describe(target: Path | str) -> str:
    """``target`` for status and logs: the file's path, or the URL without its password."""
    if is_postgres_url(target):
        from triage.store.postgres import redact

        return redact(str(target))
    return str(target)


def explain(exc: Exception, target: Path | str) -> str:
    """One line for an admin on a store that cannot be used: where it is and why. The
    server's own words only for a failed connection (they name the host, never data)."""
    why = type(exc).__name__
    if isinstance(exc, psycopg.OperationalError) and str(exc).strip():
        why = str(exc).strip().splitlines()[0]
        why = why.replace(str(target), describe(target))
    return f"the store {describe(target)} cannot be used: {why}"


def dialect(db: Database) -> str:
    """``sqlite`` or ``postgresql``."""
    return "sqlite" if isinstance(db, sqlite_utils.Database) else "postgresql"


def _floor(value: float | None) -> int | None:
    return None if value is None else math.floor(value)


def _enable_wal(conn: sqlite3.Connection) -> None:
    """Switch a new file to WAL, waiting out other processes doing the same.

    Changing the journal mode needs an exclusive lock and SQLite answers "database is
    locked" at once, without the busy handler, while another connection holds one (two
    daemons or CLI commands opening a new store together): retry up to the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def schema_version(db: sqlite_utils.Database) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite_utils.Database) -> int:
    """Apply pending migrations; return the schema version now in force.

    Each step runs in one write transaction that reads the version after taking the lock:
    a second process starting at the same time waits, then finds the step applied,
    instead of applying it again ("table already exists"). An up-to-date store is
    recognised without taking the write lock (the version only ever grows). On
    PostgreSQL the lock is also held across the steps, taken before their transactions
    begin: a process that waited for it inside a transaction could read the catalog as
    it was before the other's steps (four processes on one empty database: 9 of 15
    trials applied step 1 twice without it, measured on 2026-12-04).
    """
    version = schema_version(db)
    _check_known(version)
    if version == len(MIGRATIONS):
        return version
    if dialect(db) == "postgresql":
        # Taken before any transaction starts, so that each step's transaction, begun
        # after the previous migrator has finished, reads the catalog as it now is.
        with db.session_lock():
            return _apply_migrations(db)
    return _apply_migrations(db)


def _apply_migrations(db: Database) -> int:
    while schema_version(db) < len(MIGRATIONS):
        with transaction(db):
            version = schema_version(db)  # under the write lock: no one else migrates now
            _check_known(version)
            if version == len(MIGRATIONS):
                break
            if dialect(db) == "postgresql":
                from triage.store.postgres import postgres_ddl

                db.executescript(postgres_ddl(MIGRATIONS[version]))
            else:
                for statement in _statements(MIGRATIONS[version]):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
    return schema_version(db)


def _check_known(version: int) -> None:
    if version > len(MIGRATIONS):
        raise RuntimeError(
            f"database schema version {version} is newer than this triage "
            f"({len(MIGRATIONS)}): upgrade triage or restore a matching database"
        )


def _statements(script: str) -> Iterator[str]:
    # Split on ';' at the end of a line; trigger bodies keep their inner statements.
    buffer: list[str] = []
    for line in script.splitlines():
        buffer.append(line)
        joined = "\n".join(buffer)
        if line.rstrip().endswith(";") and sqlite3.complete_statement(joined):
            yield joined
            buffer = []
    if "\n".join(buffer).strip():
        yield "\n".join(buffer)


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, a failed COMMIT included.

    A COMMIT can fail (a deferred constraint, disk full, an I/O error) and SQLite then
    keeps the transaction open: without the ROLLBACK the connection would hold the write
    lock and its next BEGIN would fail. Errors that already ended the transaction
    (SQLite rolls back on some) are re-raised as they are.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise


def count_by(db: sqlite_utils.Database, table: str, column: str) -> dict[str, int]:
    """Row counts of ``table`` grouped by ``column`` (for status and metrics)."""
    rows = db.execute(f"SELECT {column}, COUNT(*) FROM {table} GROUP BY {column}").fetchall()
    return {str(value): int(count) for value, count in rows}
