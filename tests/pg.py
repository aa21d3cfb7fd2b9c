"""A real PostgreSQL 15 server for the tests: a cluster of its own in a temporary directory.

Debian's ``initdb`` and ``pg_ctl`` refuse to run as root, so they run as the ``postgres`` user (runuser).
The server listens on a socket in its directory and on a loopback TCP port (or the address given); the
``invoicer`` role logs in without a password over the socket (trust) and with one over TCP
(scram-sha-256), so that both the socket form and a URI carrying a password are tried for real.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

PASSWORD = "s3cret-Pa55word"  # noqa: S105  # the invoicer role's, over TCP; the tests look for it where it must not be
ROLE = "invoicer"


def bindir() -> Path | None:
    """The PostgreSQL 15 server programs, or None where they are not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def unavailable() -> str:
    """Why no server can be started here ("" if one can)."""
    if bindir() is None:
        return "PostgreSQL server programs not installed (Debian package postgresql-15)"
    if os.geteuid() != 0:
        return "starting PostgreSQL as the postgres user needs root (runuser)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install '.[postgresql]')"
    return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One cluster: ``start()``, ``stop()``, ``uri()``; ``sql()`` runs a statement as the superuser."""

    def __init__(self, root: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.root = root
        self.data = root / "data"
        self.socket_dir = root / "socket"
        self.host = host
        self.port = port or free_port(host)
        found = bindir()
        assert found is not None
        self._bin: Path = found

    def _as_postgres(self, *argv: str, check: bool = True,
                     timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              check=check, timeout=timeout, cwd="/")

    def init(self) -> None:
        """Create the cluster (the postgres user must be able to reach the directory)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for path in (self.root, self.socket_dir):
            path.mkdir(exist_ok=True)
            shutil.chown(path, "postgres", "postgres")
        parent = self.root
        while parent != parent.parent:  # tmp_path's parents are 0700 root: let postgres through
            parent = parent.parent
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)
        self._as_postgres(str(self._bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                          "--no-sync", "-E", "UTF8", "--locale=C.UTF-8")
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 0.0.0.0/0 scram-sha-256\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.socket_dir}'\n"
                       "max_connections = 200\nfsync = on\nsynchronous_commit = on\n"
                       "log_min_messages = warning\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self.data), "-l",
                          str(self.root / "server.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate``: as a crash would)."""
        self._as_postgres(str(self._bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                          check=False)

    def restart(self) -> None:
        """Stop (fast: every session is cut) and start again."""
        self.stop()
        self.start()

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement as the superuser over the socket; return its rows."""
        import psycopg
        with psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname,
                             autocommit=True) as connection:
            cursor = connection.execute(statement.encode())
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str) -> None:
        """A database owned by the invoicer role (created with its password if missing)."""
        if not self.sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}'"):  # noqa: S608  # constants
            self.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        self.sql(f"CREATE DATABASE {name} OWNER {ROLE}")

    def uri(self, dbname: str, *, tcp: bool = False, password: bool = False, host: str | None = None) -> str:
        """A libpq URI for ``dbname`` as the invoicer role: over the socket, or over TCP."""
        if tcp:
            auth = f"{ROLE}:{PASSWORD}" if password else ROLE
            return f"postgresql://{auth}@{host or self.host}:{self.port}/{dbname}"
        return f"postgresql://{ROLE}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def remove(self) -> None:
        """Stop the server and delete its directory."""
        self.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


def wait_for(predicate: object, timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout``: for state another process changes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(step)
    return bool(predicate())  # type: ignore[operator]
