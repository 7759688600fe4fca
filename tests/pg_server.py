"""A private PostgreSQL server for the tests: Debian's `postgresql` binaries, a cluster
in a temporary folder, one fresh database per test.

The server refuses to run as root, so as root it runs as the `postgres` user the Debian
package creates (with `runuser`); otherwise as the current user. It listens on a free
port of 127.0.0.1 with `trust` authentication, nowhere else, and is stopped (and its
folder removed) when the test session ends.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _binary(name: str) -> str | None:
    for folder in BIN_DIRS:
        if (folder / name).exists():
            return str(folder / name)
    return shutil.which(name)


def missing_reason() -> str | None:
    """Why no server can start here (None: one can)."""
    if _binary("initdb") is None or _binary("pg_ctl") is None:
        return "PostgreSQL is not installed (Debian package postgresql; `make test` installs it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One cluster; `new_database()` gives each test its own empty database."""

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync  # off for tests (the product's behaviour, not the disk's)
        self.folder = Path(tempfile.mkdtemp(prefix="triage-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._names = itertools.count()
        self._prefix: list[str] = []
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            self.user = "postgres"
            self._prefix = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.folder, "postgres", "postgres")

    def _run(self, *command: str) -> None:
        subprocess.run([*self._prefix, *command], check=True, capture_output=True,
                       cwd=self.folder, timeout=120)

    def start(self) -> PostgresServer:
        self._run(_binary("initdb"), "-D", str(self.data), "-A", "trust", "-U", self.user,
                  "--no-sync", "-E", "UTF8")
        self._pg_ctl_start()
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """The URL of a new, empty database."""
        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def restart(self) -> None:
        """Stop the server at once (as a crash would) and start it again on the same port."""
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self._pg_ctl_start()

    def _pg_ctl_start(self) -> None:
        # fsync off: the tests check the product's behaviour, not the disk's.
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                   f"-c unix_socket_directories={self.folder} "
                   f"-c fsync={'on' if self.fsync else 'off'} "
                   "-c max_connections=300 -c shared_buffers=64MB")
        self._run(_binary("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-t", "60",
                  "-l", str(self.folder / "server.log"), "start")
