"""The fault-injecting file system: write cache, cut, tear, freeze, fail, and SQLite WAL through it."""

from __future__ import annotations

import ast
import errno
import os
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import REPO

if TYPE_CHECKING:  # imported for real as a plugin, so that pytest rewrites its asserts
    from tests.faultfs_fixture import FaultMount

pytest_plugins = ("tests.faultfs_fixture",)

CYCLES = int(os.environ.get("INVOICER_FAULT_CYCLES", "10"))

# One process inserting ``count`` rows (0: until it fails), one transaction each, printing each number once
# its COMMIT has returned, i.e. once SQLite has synced it (synchronous=FULL).
WRITER = """
import sqlite3, sys
path, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
db = sqlite3.connect(path, timeout=30, isolation_level=None)
db.execute("PRAGMA synchronous=FULL")
db.execute("PRAGMA wal_autocheckpoint=8")  # checkpoints and log restarts all along
db.execute("CREATE TABLE IF NOT EXISTS items (worker INTEGER, n INTEGER, payload BLOB, "
           "PRIMARY KEY (worker, n))")
n = 0
while count == 0 or n < count:
    db.execute("INSERT INTO items VALUES (?, ?, randomblob(700))", (worker, n))
    print(n, flush=True)
    n += 1
"""

# Statements from stdin, one a line; answers "ok ROWS" or "error MESSAGE" on stdout.
SQL_SHELL = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
for line in sys.stdin:
    try:
        print("ok", repr(db.execute(line).fetchall()), flush=True)
    except sqlite3.Error as exc:
        print("error", exc, flush=True)
"""


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll a real condition (a counter of the file system) until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def python_in(fs: FaultMount, script: str, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    """A Python process in the mount's namespace, running ``script`` (SQLite must see the real mount path)."""
    return subprocess.Popen([*fs.enter, sys.executable, "-c", script, *args], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def create_database(fs: FaultMount) -> Path:
    """A WAL database in the mount with the items table; return its path as the namespace sees it."""
    database = fs.inside / "test.db"
    setup = python_in(fs, WRITER + "\ndb.execute('PRAGMA journal_mode=WAL')", str(database), "0", "-1")
    _, errors = setup.communicate(timeout=30)
    assert setup.returncode == 0, errors
    return database


def committed(writer: subprocess.Popen[str]) -> set[int]:
    """The numbers a writer reported committed, read to its end.

    Not communicate(): it reads the pipe itself and would skip what an earlier readline() left buffered.
    """
    assert writer.stdout is not None
    assert writer.stderr is not None
    with writer.stdout, writer.stderr:
        out = writer.stdout.read()
        writer.stderr.read()
    writer.wait(60)
    return {int(line) for line in out.split()}


def rows(database: Path) -> dict[int, set[int]]:
    """Open ``database`` with plain sqlite3: check integrity, return the row numbers per worker."""
    connection = sqlite3.connect(database)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        found: dict[int, set[int]] = {}
        for worker, n in connection.execute("SELECT worker, n FROM items"):
            found.setdefault(worker, set()).add(n)
        return found
    finally:
        connection.close()


# -- the cache -------------------------------------------------------------------------------------


def test_passthrough_basics(faultfs: FaultMount) -> None:
    """Directories, files, renames, links, modes and removal act on the backing directory at once."""
    (faultfs.mount / "dir").mkdir()
    (faultfs.mount / "dir" / "a").write_text("alpha")
    assert (faultfs.mount / "dir" / "a").read_text() == "alpha"
    (faultfs.mount / "dir" / "a").rename(faultfs.mount / "dir" / "b")
    (faultfs.mount / "dir" / "b").chmod(0o600)
    os.link(faultfs.mount / "dir" / "b", faultfs.mount / "dir" / "c")
    assert sorted(os.listdir(faultfs.mount / "dir")) == ["b", "c"]
    assert sorted(os.listdir(faultfs.backing / "dir")) == ["b", "c"]
    assert (faultfs.backing / "dir" / "b").stat().st_mode & 0o777 == 0o600
    assert (faultfs.mount / "dir" / "c").read_text() == "alpha"  # the hard link shares the cached data
    (faultfs.mount / "dir" / "b").unlink()
    (faultfs.mount / "dir" / "c").unlink()
    (faultfs.mount / "dir").rmdir()
    assert os.listdir(faultfs.backing) == []


def test_write_reaches_the_backing_file_only_on_fsync(faultfs: FaultMount) -> None:
    """A write is visible through the mount (data and size) at once, in the backing file only after fsync."""
    fd = os.open(faultfs.mount / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"x" * 10000)
        assert os.pread(fd, 20000, 0) == b"x" * 10000
        assert os.stat(faultfs.mount / "f").st_size == 10000
        assert (faultfs.backing / "f").read_bytes() == b""
        assert faultfs.client.stats()["dirty"] == {"/f": 10000}
        os.fsync(fd)
        assert (faultfs.backing / "f").read_bytes() == b"x" * 10000
        os.pwrite(fd, b"y", 5)
        os.fdatasync(fd)
        assert (faultfs.backing / "f").read_bytes()[:7] == b"xxxxxyx"
        assert faultfs.client.stats()["dirty"] == {}
    finally:
        os.close(fd)


def test_truncate_drops_cached_data_beyond_the_new_end(faultfs: FaultMount) -> None:
    """Shrinking a file with dirty data past the new end forgets it: growing again reads zeros."""
    fd = os.open(faultfs.mount / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"a" * 6000)
        os.ftruncate(fd, 100)
        assert os.stat(faultfs.mount / "f").st_size == 100
        os.ftruncate(fd, 6000)
        assert os.pread(fd, 6000, 0) == b"a" * 100 + bytes(5900)
        os.fsync(fd)
        assert (faultfs.backing / "f").read_bytes() == b"a" * 100 + bytes(5900)
    finally:
        os.close(fd)


# -- faults ----------------------------------------------------------------------------------------


def test_cut_keeps_synced_data_drops_the_rest_then_fails(faultfs: FaultMount) -> None:
    """After a cut the backing files hold exactly what was synced, and every operation fails with EIO."""
    fd = os.open(faultfs.mount / "synced", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"kept")
    os.fsync(fd)
    os.write(fd, b" and lost")
    (faultfs.mount / "unsynced").write_bytes(b"lost")
    assert faultfs.client.cut() == {}
    assert (faultfs.backing / "synced").read_bytes() == b"kept"
    assert (faultfs.backing / "unsynced").read_bytes() == b""  # created (metadata is immediate), no data
    for operation in (lambda: os.write(fd, b"more"), lambda: os.fsync(fd),
                      lambda: (faultfs.mount / "new").write_bytes(b""),
                      lambda: os.stat(faultfs.mount / "synced"),
                      lambda: os.close(fd)):  # its flush fails too (the descriptor is closed anyway)
        with pytest.raises(OSError, match="Input/output error") as raised:
            operation()
        assert raised.value.errno == errno.EIO


def test_cut_with_tear_applies_a_sector_prefix_of_the_last_write(faultfs: FaultMount) -> None:
    """A torn last write leaves a whole number of 512-byte sectors of it in the backing file, no more."""
    for name in ("given", "random"):
        fd = os.open(faultfs.mount / name, os.O_CREAT | os.O_RDWR, 0o644)
        os.write(fd, b"a" * 8192)
        os.fsync(fd)
        os.pwrite(fd, b"c" * 3000, 4000)  # dropped: not the last write
        os.pwrite(fd, b"b" * 5000, 100)
        os.close(fd)
    torn = faultfs.client.cut(tear="/given,/random", keep=2000, seed=7)
    assert torn["/given"] == {"offset": 100, "length": 5000, "kept": 1536}
    kept = torn["/random"]["kept"]
    assert kept % 512 == 0
    assert kept < 5000
    for name, length in (("given", 1536), ("random", kept)):
        assert (faultfs.backing / name).read_bytes() == b"a" * 100 + b"b" * length + b"a" * (8092 - length)


def test_freeze_blocks_fsync_until_thaw(faultfs: FaultMount) -> None:
    """While frozen an fsync waits (reads and other writes go on); thaw lets it reach the backing file."""
    fd = os.open(faultfs.mount / "f", os.O_CREAT | os.O_RDWR, 0o644)
    synced = threading.Event()

    def sync() -> None:
        os.fsync(fd)
        synced.set()

    try:
        os.write(fd, b"frozen")
        faultfs.client.freeze()
        syncer = threading.Thread(target=sync)
        syncer.start()
        wait_until(lambda: faultfs.client.stats()["waiting"] == 1)
        # Not the same file: the kernel holds the file's inode lock through fuse_fsync, as for any fsync.
        (faultfs.mount / "other").write_bytes(b"cached")
        assert (faultfs.mount / "other").read_bytes() == b"cached"
        assert os.pread(fd, 6, 0) == b"frozen"
        assert not synced.is_set()
        assert (faultfs.backing / "f").read_bytes() == b""
        faultfs.client.thaw()
        assert synced.wait(10)
        syncer.join()
        assert (faultfs.backing / "f").read_bytes() == b"frozen"
    finally:
        os.close(fd)


def test_failed_fsync_drops_the_data_and_failed_writes_say_enospc(faultfs: FaultMount) -> None:
    """Under fail fsync: EIO and the dirty data is gone (not retried); fail write: ENOSPC; heal ends both."""
    path = faultfs.mount / "f"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"old")
        os.fsync(fd)
        os.pwrite(fd, b"new", 0)
        faultfs.client.fail("fsync")
        with pytest.raises(OSError, match="Input/output error"):
            os.fsync(fd)
        faultfs.client.heal()
        os.fsync(fd)  # succeeds, but has nothing left to write: the data was dropped, not retried
        assert (faultfs.backing / "f").read_bytes() == b"old"
        assert path.read_bytes() == b"old"  # a fresh open reads what the disk holds
        assert faultfs.client.stats()["fsync_failures"] == 1
        faultfs.client.fail("write")
        with pytest.raises(OSError, match="No space left on device"):
            os.pwrite(fd, b"more", 0)
        faultfs.client.heal()
        os.pwrite(fd, b"more", 0)
        os.fsync(fd)
        assert (faultfs.backing / "f").read_bytes() == b"more"
    finally:
        os.close(fd)


# -- SQLite ----------------------------------------------------------------------------------------


def test_sqlite_wal_with_concurrent_writer_processes(faultfs: FaultMount) -> None:
    """Three processes inserting into one WAL database at once: locks and -shm work, every row is there."""
    database = create_database(faultfs)
    writers = [python_in(faultfs, WRITER, str(database), str(worker), "150") for worker in range(3)]
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        assert out.split() == [str(n) for n in range(150)]
    reader = python_in(faultfs, SQL_SHELL, str(database), stdin=subprocess.PIPE)
    query = "PRAGMA integrity_check\nSELECT worker, count(*) FROM items GROUP BY worker\n"
    out, _ = reader.communicate(query, timeout=60)
    assert out.splitlines() == ["ok [('ok',)]", "ok [(0, 150), (1, 150), (2, 150)]"]
    assert {worker: len(numbers) for worker, numbers in rows(faultfs.backing / "test.db").items()} == {
        0: 150, 1: 150, 2: 150}  # the last close checkpointed and synced everything into the backing file


def cut_while_writing(fs: FaultMount, chooser: random.Random) -> tuple[dict[int, set[int]], str]:
    """Two writers, a cut (tearing every file's last write) after a random number of commits."""
    database = create_database(fs)
    writers = [python_in(fs, WRITER, str(database), str(worker), "0") for worker in range(2)]
    assert writers[0].stdout is not None
    early = [writers[0].stdout.readline() for _ in range(chooser.randint(1, 60))]
    torn = fs.client.cut(tear="all", seed=chooser.randrange(1 << 30))
    reported = {worker: committed(writer) for worker, writer in enumerate(writers)}
    reported[0] |= {int(line) for line in early}
    fs.stop()
    return reported, f"torn {torn}"


@pytest.mark.parametrize("cycle", range(CYCLES))
def test_sqlite_keeps_every_commit_across_a_cut(start_faultfs: Callable[[], FaultMount], cycle: int) -> None:
    """After a power cut at a random moment the backing database is sound and holds every commit."""
    fs = start_faultfs()
    reported, torn = cut_while_writing(fs, random.Random(cycle))
    found = rows(fs.backing / "test.db")
    for worker, numbers in reported.items():
        stored = found.get(worker, set())
        assert numbers <= stored, torn
        assert stored == set(range(len(stored))), torn  # one transaction at a time: a prefix, no holes
        assert len(stored) <= len(numbers) + 1, torn  # at most the commit whose report the cut prevented


# -- the WAL states a power cut leaves (docs/wal-power-loss.md) ------------------------------------


@pytest.fixture(scope="module")
def wal_state() -> Callable[[Path], tuple[str, str]]:
    """The rule proposed in docs/wal-power-loss.md, taken from the document itself."""
    text = (REPO / "docs" / "wal-power-loss.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match is not None
    namespace: dict[str, Any] = {}
    exec(match.group(1), namespace)  # noqa: S102 - our own document's snippet
    rule: Callable[[Path], tuple[str, str]] = namespace["wal_state"]
    return rule


class SqlShell:
    """A SQLite connection in its own process, fed one statement at a time."""

    def __init__(self, fs: FaultMount, database: Path) -> None:
        self.process = python_in(fs, SQL_SHELL, str(database), stdin=subprocess.PIPE)

    def send(self, statement: str) -> None:
        """Start a statement without waiting for it."""
        assert self.process.stdin is not None
        self.process.stdin.write(statement + "\n")
        self.process.stdin.flush()

    def run(self, statement: str) -> str:
        """Run a statement; return its answer line."""
        self.send(statement)
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        """Let the process end (it fails at its next statement after a cut)."""
        self.process.communicate(timeout=30)


@pytest.fixture
def shell(faultfs: FaultMount) -> Iterator[SqlShell]:
    """A WAL database with 20 committed rows, checkpointed, as the generation before the experiment."""
    database = create_database(faultfs)
    sql = SqlShell(faultfs, database)
    for statement in ("PRAGMA synchronous=FULL", "PRAGMA wal_autocheckpoint=0",
                      *["INSERT INTO items VALUES (0, (SELECT count(*) FROM items), randomblob(2000))"] * 20):
        assert sql.run(statement).startswith("ok")
    yield sql
    if sql.process.poll() is None:
        sql.process.kill()
        sql.close()


# experiment -> the checkpoint before the stalled transaction (NONE: append to a live log instead), the
# cut's tear of the log's last write, and what wal_state says of the log left behind
WAL_CASES: dict[str, tuple[str, int | None, int, tuple[str, str]]] = {
    "empty": ("TRUNCATE", 0, 512, ("accept", "empty")),
    "short-header": ("TRUNCATE", 20, 1, ("accept", "short-header")),
    "old-header": ("PASSIVE", None, 512, ("accept", "valid-header")),
    "torn-header": ("PASSIVE", 16, 1, ("accept", "torn-header")),
    "new-header-old-frames": ("PASSIVE", 32, 1, ("accept", "valid-header")),
    "torn-frame": ("NONE", 1024, 512, ("accept", "valid-header")),
}


@pytest.mark.parametrize("experiment", list(WAL_CASES))
def test_power_cut_wal_states_lose_no_commit(faultfs: FaultMount, shell: SqlShell, experiment: str,
                                             wal_state: Callable[[Path], tuple[str, str]]) -> None:
    """A cut while SQLite's next sync is stalled leaves this WAL state; SQLite keeps every commit."""
    checkpoint, keep, sector, expected = WAL_CASES[experiment]
    if checkpoint == "NONE":
        assert shell.run("INSERT INTO items VALUES (1, 0, randomblob(10))").startswith("ok")
    else:  # complete: the next write restarts the log (TRUNCATE: from an empty file)
        answer = shell.run(f"PRAGMA wal_checkpoint({checkpoint})").removeprefix("ok ")
        busy, log, done = ast.literal_eval(answer)[0]
        assert busy == 0
        assert log == done
    faultfs.client.freeze()
    shell.send("INSERT INTO items VALUES (2, 0, randomblob(3000))")  # its first sync stalls
    wait_until(lambda: faultfs.client.stats()["waiting"] == 1)
    faultfs.client.cut(tear="/test.db-wal" if keep is not None else "", keep=keep, sector=sector)
    shell.close()
    faultfs.stop()
    assert wal_state(faultfs.backing / "test.db-wal") == expected
    found = rows(faultfs.backing / "test.db")
    assert found[0] == set(range(20))
    assert 2 not in found  # the stalled transaction never committed
    assert found.get(1, set()) == ({0} if checkpoint == "NONE" else set())


def test_header_damaged_after_use_is_refused_because_sqlite_drops_commits(
        tmp_path: Path, wal_state: Callable[[Path], tuple[str, str]]) -> None:
    """A live log whose header checksum is damaged loses committed rows in SQLite; the rule refuses it."""
    live, copy = tmp_path / "live.db", tmp_path / "copy.db"
    connection = sqlite3.connect(live, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    connection.execute("CREATE TABLE items (worker INTEGER, n INTEGER, payload BLOB)")
    for n in range(5):
        connection.execute("INSERT INTO items VALUES (0, ?, randomblob(100))", (n,))
    # The files as a crash would leave them (the open connection keeps its log), the header's checksum hit.
    copy.write_bytes(live.read_bytes())
    wal = bytearray(Path(f"{live}-wal").read_bytes())
    connection.close()
    wal[24] ^= 0xFF
    Path(f"{copy}-wal").write_bytes(wal)
    assert wal_state(Path(f"{copy}-wal")) == ("refuse", "header-damaged-after-use")
    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        rows(copy)  # SQLite ignored the whole log: the table and its five commits are gone
