"""PostgreSQL behind the store's one interface: the same SQL, the same schema history.

The product's SQL is written once, in the common subset of SQLite and PostgreSQL with
SQLite's ``?`` placeholders. :class:`PostgresDatabase` offers what the code uses of a
``sqlite_utils.Database`` (``execute``, ``query``, ``conn.in_transaction``, ``close``)
over a psycopg 3 connection, and :func:`translate` rewrites the few spellings the two
dialects do not share, once per statement text (cached):

- ``?`` placeholders become ``%s`` (and a literal ``%`` becomes ``%%``), outside quotes;
- an ``INSERT`` into a table with an identity ``id`` gains ``RETURNING id``, which
  fills the cursor's ``lastrowid`` as SQLite's does;
- ``GROUP_CONCAT(DISTINCT x)`` becomes ``string_agg(DISTINCT x, ',')``;
- ``json_extract(col, '$.key')`` becomes ``(col::jsonb ->> 'key')``;
- ``BEGIN IMMEDIATE`` becomes ``BEGIN`` plus a transaction-scoped advisory lock: like
  SQLite's write lock, it lets one write transaction at a time run, so code that reads
  and then writes inside one (the gate's budget, the queue's claims, migrations) keeps
  the isolation it was written for, across processes and replicas alike;
- ``PRAGMA busy_timeout = N`` becomes ``SET lock_timeout``; ``PRAGMA synchronous`` is a
  no-op (a PostgreSQL commit is durable with the server's default
  ``synchronous_commit = on``); ``PRAGMA user_version`` reads ``triage_schema``.

The schema is the SQLite migrations' DDL turned into PostgreSQL types by
:func:`postgres_ddl` (``id INTEGER PRIMARY KEY`` -> an identity column, ``REAL`` ->
``DOUBLE PRECISION``, ``INTEGER`` -> ``BIGINT``, ``BLOB`` -> ``BYTEA``); the few triggers,
whose bodies the dialects spell differently, are given here in PL/pgSQL
(:data:`TRIGGERS`) and stand in for their SQLite text, one for one, by name.

Parameters are bound on the client (psycopg's ``ClientCursor``): literals typed by the
server as SQLite would take them, so ``?`` can stand wherever SQLite allows one. Python
``bool`` is bound as 0/1 (the schema's flags are integers, as in SQLite); ``numeric``
results (``SUM`` and ``AVG`` over integers) come back as ``int`` when whole, else float.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg.adapt import Loader
from psycopg.rows import dict_row

# Any 64-bit constant: the one advisory lock taken by every write transaction.
WRITE_LOCK = 0x7472696167650001  # "triage" + 1
SCHEMA_TABLE = "triage_schema"
IDLE_IN_TRANSACTION_MS = 10_000

# PL/pgSQL for each SQLite trigger of the migrations, by trigger name.
TRIGGERS: dict[str, str] = {
    "audit_no_update": """
        CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the audit trail is append-only'; END $$;
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    """,
    "audit_no_delete": """
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            FOR EACH ROW EXECUTE FUNCTION audit_append_only();
    """,
    "gate_offset_coverage": """
        CREATE FUNCTION gate_offset_coverage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE gate_state SET value = value + 1 WHERE name = 'budget_offset';
            RETURN NULL;
        END $$;
        CREATE TRIGGER gate_offset_coverage AFTER INSERT ON queue_items
            FOR EACH ROW WHEN (NEW.reason = 'coverage')
            EXECUTE FUNCTION gate_offset_coverage();
    """,
    "gate_offset_paid": """
        CREATE FUNCTION gate_offset_paid() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE gate_state SET value = GREATEST(0, value - 1) WHERE name = 'budget_offset';
            RETURN NULL;
        END $$;
        CREATE TRIGGER gate_offset_paid AFTER INSERT ON decisions
            FOR EACH ROW WHEN (NEW.reason = 'budget_offset')
            EXECUTE FUNCTION gate_offset_paid();
    """,
}

_TRIGGER = re.compile(r"CREATE TRIGGER (\w+)\b.*?\bEND;", re.S)
_CREATE_TABLE = re.compile(r"CREATE TABLE (\w+) \((.*?)\n    \)", re.S)
_REFERENCE = re.compile(r"^(\s*\w+)([^,\n]*?) REFERENCES (\w+\(\w+\))", re.M)
_IDENTITY = re.compile(r"\bid INTEGER PRIMARY KEY,")
_TYPES = ((re.compile(r"\bINTEGER\b"), "BIGINT"), (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
          (re.compile(r"\bBLOB\b"), "BYTEA"))


def postgres_ddl(script: str) -> str:
    """One SQLite migration script in PostgreSQL's types, its triggers in PL/pgSQL."""

    def trigger(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TRIGGERS:
            raise RuntimeError(f"migration trigger {name!r} has no PostgreSQL text")
        return TRIGGERS[name].strip()

    out = _TRIGGER.sub(trigger, script)
    # SQLite lets a table refer to one created later in the script, PostgreSQL does not:
    # the references become constraints added at the end.
    foreign: list[str] = []

    def table(match: re.Match[str]) -> str:
        name, body = match.group(1), match.group(2)

        def column(ref: re.Match[str]) -> str:
            foreign.append(f"ALTER TABLE {name} ADD FOREIGN KEY ({ref.group(1).strip()}) "
                           f"REFERENCES {ref.group(3)};")
            return ref.group(1) + ref.group(2)

        return f"CREATE TABLE {name} ({_REFERENCE.sub(column, body)})"

    out = _CREATE_TABLE.sub(table, out)
    out = out.rstrip() + "\n" + "\n".join(foreign)
    out = _IDENTITY.sub("id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,", out)
    for pattern, replacement in _TYPES:
        out = pattern.sub(replacement, out)
    return out


_GROUP_CONCAT = re.compile(r"GROUP_CONCAT\((DISTINCT )?([^()]+)\)", re.I)
_JSON_EXTRACT = re.compile(r"json_extract\(([\w.]+), '\$\.(\w+)'\)", re.I)
_INSERT = re.compile(r"^\s*INSERT INTO (\w+)", re.I)
_PRAGMA = re.compile(r"^\s*PRAGMA (\w+)(?:\s*=\s*(\w+))?\s*;?\s*$", re.I)


@functools.lru_cache(maxsize=4096)
def translate(sql: str, identity: frozenset[str]) -> tuple[str, bool]:
    """PostgreSQL text of one statement of the product's SQL, and whether it returns
    the new row's id (see the module docstring)."""
    out: list[str] = []
    quote: str | None = None
    for char in sql:
        if quote is not None:
            out.append("%%" if char == "%" else char)
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
            out.append(char)
        elif char == "?":
            out.append("%s")
        elif char == "%":
            out.append("%%")
        else:
            out.append(char)
    text = "".join(out)
    text = _GROUP_CONCAT.sub(lambda m: f"string_agg({m.group(1) or ''}{m.group(2)}, ',')", text)
    text = _JSON_EXTRACT.sub(lambda m: f"({m.group(1)}::jsonb ->> '{m.group(2)}')", text)
    insert = _INSERT.match(text)
    returns_id = bool(insert and insert.group(1) in identity
                      and "RETURNING" not in text.upper())
    if returns_id:
        text = text.rstrip().rstrip(";") + " RETURNING id"
    return text, returns_id


class _NumericLoader(Loader):
    """``numeric`` as int when whole (SUM over integers), else float (AVG)."""

    def load(self, data: Any) -> int | float:
        text = bytes(data)
        return float(text) if b"." in text or b"e" in text.lower() else int(text)


def _bind(params: Sequence[Any] | None) -> list[Any]:
    return [int(p) if isinstance(p, bool) else p for p in (params or ())]


class Cursor:
    """The result of one statement: rows as tuples, ``lastrowid`` and ``rowcount``."""

    def __init__(self, cursor: psycopg.Cursor[Any] | None, lastrowid: int | None = None,
                 rowcount: int = -1) -> None:
        self._cursor = cursor
        self.lastrowid = lastrowid
        self.rowcount = cursor.rowcount if cursor is not None else rowcount

    def _has_rows(self) -> bool:
        return self._cursor is not None and self._cursor.description is not None

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._cursor.fetchone() if self._has_rows() else None  # type: ignore[union-attr]

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._cursor.fetchall() if self._has_rows() else []  # type: ignore[union-attr]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.fetchall())


class _Connection:
    """What the code reads of a connection: whether a transaction is open."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    @property
    def in_transaction(self) -> bool:
        conn = self._db._conn  # noqa: SLF001 - the wrapper's own connection
        return (not conn.broken and conn.info.transaction_status
                != psycopg.pq.TransactionStatus.IDLE)


class PostgresDatabase:
    """A store connection on PostgreSQL (autocommit; ``BEGIN IMMEDIATE`` opens a write
    transaction). One per thread, as with SQLite.

    A connection the server dropped (a restart, a failover, a network cut) fails the
    statement that met it, and the transaction it was in; the next statement outside a
    transaction connects again, with the session's settings, so a daemon's loops go on
    after their usual back-off instead of failing every statement until a restart.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]],
                 identity: frozenset[str]) -> None:
        self._connect = connect
        self._identity = identity
        self._session: list[str] = []  # SET statements replayed on a new connection
        self._conn = self._open()
        self.conn = _Connection(self)

    def _open(self) -> psycopg.Connection[Any]:
        conn = self._connect()
        conn.adapters.register_loader("numeric", _NumericLoader)
        for statement in self._session:
            conn.execute(statement)
        return conn

    def _live(self) -> psycopg.Connection[Any]:
        if self._conn.broken:
            self._conn = self._open()
        return self._conn

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Cursor:
        self._live()
        pragma = _PRAGMA.match(sql)
        if pragma is not None:
            return self._pragma(pragma.group(1).lower(), pragma.group(2))
        if sql.strip().upper() in ("BEGIN", "BEGIN IMMEDIATE"):
            self._conn.execute("BEGIN")
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
            return Cursor(None)
        text, returns_id = translate(sql, self._identity)
        cursor = self._conn.cursor()
        cursor.execute(text, _bind(params))
        if returns_id:
            row = cursor.fetchone()
            return Cursor(None, lastrowid=int(row[0]) if row else None, rowcount=cursor.rowcount)
        return Cursor(cursor)

    @contextlib.contextmanager
    def session_lock(self) -> Iterator[None]:
        """The write lock held outside any transaction, for as long as the block runs
        (the migrations: each of their transactions starts after the lock was won)."""
        self._conn.execute("SELECT pg_advisory_lock(%s)", [WRITE_LOCK])
        try:
            yield
        finally:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", [WRITE_LOCK])

    def executescript(self, script: str) -> None:
        """Run a script of several statements as it is (no placeholders: the migrations)."""
        self._conn.execute(script.encode())

    def query(self, sql: str, params: Sequence[Any] | None = None) -> Iterator[dict[str, Any]]:
        text, _ = translate(sql, self._identity)
        with self._live().cursor(row_factory=dict_row) as cursor:
            cursor.execute(text, _bind(params))
            rows = cursor.fetchall() if cursor.description is not None else []
        yield from rows

    def _pragma(self, name: str, value: str | None) -> Cursor:
        if name == "user_version" and value is None:
            row = None
            if self._conn.execute("SELECT to_regclass(%s)", [SCHEMA_TABLE]).fetchone()[0]:
                row = self._conn.execute(f"SELECT max(version) FROM {SCHEMA_TABLE}").fetchone()
            return _Rows([(int(row[0]) if row and row[0] is not None else 0,)])
        if name == "user_version":  # inside the migration's write transaction
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA_TABLE} "
                               "(version BIGINT NOT NULL)")
            self._conn.execute(f"DELETE FROM {SCHEMA_TABLE}")
            self._conn.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (%s)",
                               [int(value)])
        elif name == "busy_timeout" and value is not None:
            statement = f"SET lock_timeout = {int(value)}"
            self._conn.execute(statement)
            self._session.append(statement)
        elif name in ("synchronous", "foreign_keys", "journal_mode"):
            pass  # durable commits, enforced foreign keys: PostgreSQL's defaults
        else:
            raise ValueError(f"PRAGMA {name} has no PostgreSQL equivalent")
        return Cursor(None)

    def close(self) -> None:
        self._conn.close()


class _Rows(Cursor):
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        super().__init__(None)
        self._rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows[0] if self._rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._rows)


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def open_postgres(url: str, identity: frozenset[str], *, readonly: bool,
                  lock_timeout_ms: int) -> PostgresDatabase:
    """Connect to ``url``: autocommit, parameters bound on the client, waits for a lock
    bounded like SQLite's busy timeout."""
    # A session that stops talking inside a write transaction (a replica paused or cut
    # off from the server) would hold the write lock for every replica until TCP gave
    # up, hours later: the server ends it after IDLE_IN_TRANSACTION_MS instead. The
    # product's transactions are short (milliseconds between statements).
    options = (f"-c lock_timeout={lock_timeout_ms} "
               f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}")
    if readonly:
        options += " -c default_transaction_read_only=on"

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(url, autocommit=True, cursor_factory=psycopg.ClientCursor,
                               options=options, connect_timeout=10)

    return PostgresDatabase(connect, identity)


def listen(url: str, channel: str, wake: Callable[[], None], stop: threading.Event,
           poll_seconds: float = 1.0) -> None:
    """Call `wake` for each ``NOTIFY channel`` until `stop` is set (run it on a thread of
    its own). A lost connection is opened again after `poll_seconds`; meanwhile callers
    keep polling, so a notification is a shortcut, never the only way work is found."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", channel):
        raise ValueError(f"not a channel name: {channel!r}")
    while not stop.is_set():
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"LISTEN {channel}")
                wake()  # anything notified while not listening
                while not stop.is_set():
                    for _ in conn.notifies(timeout=poll_seconds):
                        wake()
        except psycopg.Error:
            stop.wait(poll_seconds)
