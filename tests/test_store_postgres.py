"""The PostgreSQL store: its dialect layer, and what only a real server can show.

The product's behaviour on PostgreSQL is checked by the store- and daemon-level tests
themselves, which `make test` runs a second time with TRIAGE_TEST_STORE=postgresql.
These tests cover what is particular to the backend: how the shared SQL is translated,
that the schema history applies once when several processes start together, that write
transactions exclude each other as SQLite's do, and what an admin sees of the setting.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from triage.store import db as store
from triage.store.postgres import postgres_ddl, redact, translate

REPO = Path(__file__).resolve().parents[1]
IDENTITY = store.IDENTITY_TABLES
# They start servers of their own: once per `make test`, in its PostgreSQL pass.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRIAGE_TEST_STORE", "sqlite") != "postgresql",
    reason="PostgreSQL backend tests run in the TRIAGE_TEST_STORE=postgresql pass")


def test_placeholders_become_psycopg_ones_outside_quotes_and_percent_signs_are_escaped():
    text, returns_id = translate(
        "SELECT id FROM models WHERE source LIKE 'retrain:%' AND note = '?' AND id = ?",
        IDENTITY)
    assert text == ("SELECT id FROM models WHERE source LIKE 'retrain:%%' AND note = '?' "
                    "AND id = %s")
    assert not returns_id


def test_an_insert_returns_the_new_id_only_where_the_database_assigns_it():
    text, returns_id = translate("INSERT INTO tokens (name) VALUES (?)", IDENTITY)
    assert (text, returns_id) == ("INSERT INTO tokens (name) VALUES (%s) RETURNING id", True)
    # `models` is keyed by its version, `images` by its instance: nothing to return.
    assert translate("INSERT INTO models (version) VALUES (?)", IDENTITY)[1] is False
    assert translate("INSERT INTO images (instance_id) VALUES (?)", IDENTITY)[1] is False
    assert {"files", "studies", "instances", "decisions", "queue_items", "labels",
            "tokens", "audit", "retrain_runs", "study_results"} <= IDENTITY
    assert "serving_state" not in IDENTITY  # its one row is id 1, given


def test_sqlite_only_functions_become_their_postgresql_equivalents():
    text, _ = translate("SELECT GROUP_CONCAT(DISTINCT instances.modality), "
                        "json_extract(d.prediction, '$.label') FROM x", IDENTITY)
    assert text == ("SELECT string_agg(DISTINCT instances.modality, ','), "
                    "(d.prediction::jsonb ->> 'label') FROM x")


def test_every_migration_has_a_postgresql_text_with_references_added_after_the_tables():
    for script in store.MIGRATIONS:
        ddl = postgres_ddl(script)
        assert "INTEGER PRIMARY KEY" not in ddl and " REAL" not in ddl and "BLOB" not in ddl
        assert "RAISE(ABORT" not in ddl
    first = postgres_ddl(store.MIGRATIONS[0])
    # files refers to instances, created after it: the reference comes last.
    assert first.index("CREATE TABLE instances") < first.index(
        "ALTER TABLE files ADD FOREIGN KEY (instance_id) REFERENCES instances(id)")


def test_a_password_in_the_url_is_never_shown():
    assert redact("postgresql://triage:s3cret@db.local:5432/triage") == (
        "postgresql://triage:***@db.local:5432/triage")
    assert redact("postgresql://triage@db.local/triage") == "postgresql://triage@db.local/triage"


# --- against a real server -------------------------------------------------------------


def _migrate(url: str) -> int:
    db = store.connect(url)
    try:
        return store.schema_version(db)
    finally:
        db.close()


def test_processes_starting_together_on_an_empty_database_apply_each_step_once(postgres_server):
    url = postgres_server.new_database()
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        versions = pool.map(_migrate, [url] * 4)
    assert versions == [len(store.MIGRATIONS)] * 4
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*), max(version) FROM triage_schema").fetchone() == (
            1, len(store.MIGRATIONS))
        # The gate's budget row is inserted by migration 7: once.
        assert conn.execute("SELECT count(*) FROM gate_state").fetchone()[0] == 1


def test_write_transactions_exclude_each_other_as_on_sqlite(postgres_server):
    """Read, wait, write back +1 in two threads: both increments survive only if the
    second transaction waits for the first (SQLite's BEGIN IMMEDIATE; here the write
    lock). Under PostgreSQL's READ COMMITTED alone one update would be lost."""
    url = postgres_server.new_database()
    store.connect(url).close()

    def bump() -> None:
        db = store.connect(url)
        try:
            with store.transaction(db):
                (value,) = db.execute(
                    "SELECT value FROM gate_state WHERE name = 'budget_offset'").fetchone()
                time.sleep(0.3)
                db.execute("UPDATE gate_state SET value = ? WHERE name = 'budget_offset'",
                           [value + 1])
        finally:
            db.close()

    threads = [threading.Thread(target=bump) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    db = store.connect(url, readonly=True)
    assert db.execute("SELECT value FROM gate_state").fetchone()[0] == 2
    db.close()


def test_the_append_only_audit_trail_and_readonly_connections_hold(postgres_server):
    url = postgres_server.new_database()
    db = store.connect(url)
    db.execute("INSERT INTO audit (at, actor, action) VALUES (?, ?, ?)", [1.0, "admin", "x"])
    for statement in ("UPDATE audit SET actor = 'y'", "DELETE FROM audit"):
        with pytest.raises(psycopg.Error, match="append-only"):
            db.execute(statement)
    reader = store.connect(url, readonly=True)
    with pytest.raises(psycopg.Error, match="read-only"):
        reader.execute("DELETE FROM tokens")
    assert reader.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
    reader.close()
    db.close()


def _triage(*args: str, env: dict[str, str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage", *args, "--config", str(REPO / "config.yaml"),
         "--home", str(home)],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_status_names_the_server_without_the_password(postgres_server, tmp_path):
    url = postgres_server.new_database()
    # trust authentication ignores the password, so the URL can carry one.
    with_password = url.replace(f"{postgres_server.user}@", f"{postgres_server.user}:hunter2@")
    env = {"TRIAGE__STORE__URL": with_password}
    assert _triage("token", "create", "--name", "ops", "--role", "admin", env=env,
                   home=tmp_path).returncode == 0
    done = _triage("status", "--json", env=env, home=tmp_path)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["database"] == with_password.replace(":hunter2@", ":***@")
    assert status["schema_version"] == len(store.MIGRATIONS)
    assert "hunter2" not in done.stdout + done.stderr
    assert not (tmp_path / "triage.db").exists()  # nothing went to a SQLite file


def test_a_bad_store_url_names_the_key_and_an_unreachable_server_says_so(tmp_path):
    done = _triage("status", env={"TRIAGE__STORE__URL": "mysql://db/triage"}, home=tmp_path)
    assert done.returncode == 2
    assert "store.url" in done.stderr and "Traceback" not in done.stderr
    with __import__("socket").socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens
    url = f"postgresql://triage:pw@127.0.0.1:{port}/triage"
    done = _triage("token", "list", env={"TRIAGE__STORE__URL": url}, home=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert f"postgresql://triage:***@127.0.0.1:{port}/triage" in done.stderr
    assert "pw@" not in done.stderr


def test_a_running_daemon_goes_on_after_the_database_server_restarts(tmp_path):
    """The server restarts (as after a crash or a failover) under a running daemon: its
    loops meet dropped connections, back off, connect again, and what arrives after the
    restart is ingested and accounted for like what arrived before."""
    from conftest import FAST_ENV, DaemonProcess, make_image
    from pg_server import PostgresServer, missing_reason

    if missing_reason() is not None:
        pytest.skip(missing_reason())
    server = PostgresServer().start()  # its own server: the restart stays in this test
    proc = None
    try:
        url = server.new_database()
        proc = DaemonProcess(tmp_path / "home", {**FAST_ENV, "TRIAGE__STORE__URL": url},
                             []).start()
        make_image(proc.inbox / "before.dcm", study_uid="2.25.301")
        proc.wait_for(lambda s: s["files"]["archived"] == 1, 60, "the first instance")
        server.restart()
        make_image(proc.inbox / "after.dcm", study_uid="2.25.302")
        status = proc.wait_for(
            lambda s: s["files"]["archived"] == 2
            and s["studies"]["scored"] + s["studies"]["waiting_model"]
            + s["studies"]["unscoreable"] == 2,
            90, "the instance sent after the restart, and both studies decided")
        assert status["files"]["total"] == 2 and status["files"]["in_flight"] == 0
        assert proc.proc is not None and proc.proc.poll() is None
        assert httpx.get(f"{proc.url}/healthz", timeout=5).status_code == 200
        assert "Traceback" not in proc.log.read_text()
    finally:
        if proc is not None:
            proc.stop()
        server.stop()
