"""Shared fixtures: a real unixgram NOTIFY_SOCKET listener, a daemon subprocess, table checks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from invoicer.storage import Storage

REPO = Path(__file__).resolve().parent.parent
DAEMON_SRC = REPO / "daemon"


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notification socket.

    Like systemd it reads continuously (a background thread), so a sender never finds the queue full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # as systemd: who sent it
        self.socket.bind(str(path))
        self.messages: list[str] = []
        self.senders: list[int] = []
        self._cursor = 0
        self._arrived = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.socket.recvmsg(65536, socket.CMSG_SPACE(12))
            except OSError:
                return
            if not data:
                return
            pid = next((struct.unpack("3i", payload[:12])[0] for level, kind, payload in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            with self._arrived:
                self.messages.append(data.decode("latin-1"))
                self.senders.append(pid)
                self._arrived.notify_all()

    def receive(self, timeout: float, pid: int | None = None) -> str | None:
        """Return the next unseen message (from ``pid`` only, if given), waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                if not self._arrived.wait_for(lambda: self._cursor < len(self.messages),
                                              max(0.0, deadline - time.monotonic())):
                    return None
                self._cursor += 1
                if pid is None or self.senders[self._cursor - 1] == pid:
                    return self.messages[self._cursor - 1]

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 30.0,
                 pid: int | None = None) -> str:
        """Receive until a message (from ``pid``, if given) satisfies ``predicate``; else fail the test."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            message = self.receive(left, pid)
            if message is not None and predicate(message):
                return message
        raise AssertionError(f"no notification matched within {timeout}s; got {self.messages[-5:]}")

    def drain(self, timeout: float = 0.2) -> None:
        """Let whatever is still in flight arrive, and mark everything received as seen."""
        while self.receive(timeout) is not None:
            pass

    def assignments(self) -> list[str]:
        """Every ``KEY=value`` line received so far, in order."""
        with self._arrived:
            return [line for message in self.messages for line in message.split("\n")]

    def close(self) -> None:
        """Stop reading and close the socket."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)
        self.socket.close()
        self._reader.join(5)


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, but fail on CI (CI=true), where everything must be present."""
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"required on CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    """An open SQLite Storage on a fresh file, without fsyncs (test_storage.py has its own, with them)."""
    store = Storage(tmp_path / "orders.db", synchronous="OFF")
    store.open()
    yield store
    store.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (AF_UNIX socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="inv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(short_tmp: Path) -> Iterator[NotifyListener]:
    """A listening NOTIFY_SOCKET."""
    listener = NotifyListener(short_tmp / "notify.sock")
    yield listener
    listener.close()


def daemon_env(database: Path | str, **overrides: str) -> dict[str, str]:
    """An environment for ``invoicer run`` on ``database``, free of any inherited INVOICER_* setting."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("INVOICER_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM"))}
    env["PYTHONPATH"] = f"{DAEMON_SRC}:{REPO}"  # the package, and tests.plugins
    env["INVOICER_DATABASE"] = str(database)
    env["INVOICER_STATUS_INTERVAL"] = "0.1"
    env["INVOICER_SOURCE"] = "demo"  # most tests want work without submitting it; orders tests override
    env.update(overrides)
    return env


@dataclasses.dataclass
class Daemon:
    """A running ``invoicer run`` subprocess."""

    process: subprocess.Popen[str]
    notify: NotifyListener | None
    log_path: Path

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a real signal."""
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> tuple[int, str]:
        """Wait for the exit; return the exit code and everything the daemon printed."""
        self.process.wait(timeout=timeout)
        return self.process.returncode, self.log_path.read_text()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until READY=1 arrived."""
        assert self.notify is not None
        self.notify.wait_for(lambda m: "READY=1" in m.split("\n"), timeout, self.process.pid)

    def wait_stored(self, at_least: int, timeout: float = 30.0) -> None:
        """Block until a STATUS= line reports at least ``at_least`` invoices stored."""
        assert self.notify is not None
        self.notify.wait_for(lambda m: stored_in_status(m) >= at_least, timeout, self.process.pid)


def stored_in_status(message: str) -> int:
    """The stored total a STATUS= line reports (-1 if none)."""
    for line in message.split("\n"):
        if line.startswith("STATUS=") and " stored" in line:
            number = line.split(" stored")[0].rsplit(" ", 1)[-1]
            return int(number.replace(",", ""))
    return -1


@pytest.fixture
def start_daemon(notify_socket: NotifyListener, short_tmp: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``invoicer run`` subprocesses with NOTIFY_SOCKET pointing at the listener; kill leftovers."""
    started: list[subprocess.Popen[str]] = []

    def start(database: Path | str, *, notify: bool = True, python: str = sys.executable,
              prefix: Sequence[str] = (), **env: str) -> Daemon:
        environment = daemon_env(database, **env)
        if notify:
            environment["NOTIFY_SOCKET"] = str(notify_socket.path)
        # A file, not a pipe: nobody reads a pipe while the test waits, and a full pipe blocks logging.
        log_path = short_tmp / f"daemon-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen([*prefix, python, "-m", "invoicer", "run"], env=environment,
                                       stdout=log_file, stderr=subprocess.STDOUT, text=True)
        started.append(process)
        return Daemon(process, notify_socket if notify else None, log_path)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@dataclasses.dataclass(frozen=True)
class TableFacts:
    """What plain SQL says about the invoices table and the sequence marks."""

    count: int
    distinct: int
    min_id: int | None
    max_id: int | None
    failed: int
    high_water: int
    stored_through: int


def table_facts(database: Path) -> TableFacts:
    """Read the table with plain SQL, as an external check would."""
    with sqlite3.connect(database) as connection:
        count, distinct, low, high, failed = connection.execute(
            "SELECT count(*), count(DISTINCT id), min(id), max(id), "
            "coalesce(sum(status = 'failed'), 0) FROM invoices").fetchone()
        high_water, stored_through = connection.execute(
            "SELECT high_water, stored_through FROM sequence").fetchone()
    connection.close()
    return TableFacts(count, distinct, low, high, failed, high_water, stored_through)


def assert_consistent(database: Path) -> TableFacts:
    """After any crash: the file is sound, no number twice, nothing above the mark, the prefix complete."""
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        through = connection.execute("SELECT stored_through FROM sequence").fetchone()[0]
        below = connection.execute("SELECT count(*) FROM invoices WHERE id <= ?", (through,)).fetchone()[0]
    connection.close()
    facts = table_facts(database)
    assert facts.count == facts.distinct
    assert facts.max_id is None or facts.max_id <= facts.high_water
    assert below == through  # every number up to stored_through really is stored
    return facts


def assert_gap_free(database: Path, *, clean: bool = True) -> TableFacts:
    """Assert 1..max(id) are all stored exactly once; after a clean stop also that nothing is owed."""
    facts = table_facts(database)
    assert facts.count > 0
    assert facts.min_id == 1
    assert facts.count == facts.max_id == facts.distinct
    if clean:
        assert facts.high_water == facts.max_id == facts.stored_through
    return facts


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real PostgreSQL 15 server for the whole run (each test makes a database of its own)."""
    from tests.pg import PostgresServer, unavailable

    reason = unavailable()
    require(not reason, reason)
    root = Path(tempfile.mkdtemp(prefix="invpg-", dir="/tmp"))  # short: the socket path is limited
    server = PostgresServer(root)
    server.init()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg_database(postgres_server: Any, request: pytest.FixtureRequest) -> str:
    """A fresh database owned by the invoicer role; returns its socket URI."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    postgres_server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    postgres_server.create_database(name)
    return str(postgres_server.uri(name))
