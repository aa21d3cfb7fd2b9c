"""The SQLite backend: the embedded default, one instance per database file.

One connection, one lock, WAL, a busy timeout, schema as constants, ``?`` parameters, behind the
interface :mod:`invoicer.storage` describes.

The ``sequence`` row holds two durable marks:

* ``high_water``: every number <= it may have been handed out, so every such number must end up stored.
* ``stored_through``: every number <= it is stored. It only moves forward, inside the same transaction
  as the rows that let it move.

Above ``stored_through``, column ``stored_runs`` holds the runs of numbers stored out of order (work
still in flight left gaps below them) as text, ``first-last,first-last``, rewritten in every commit by
the same statement that advances ``stored_through`` (another statement per commit would cost the writer
another wait for the GIL). Recovery reads the marks and these few runs
and finds the missing numbers as ranges, without reading the invoices, however many rows a hung call
kept above ``stored_through``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import json
import logging
import os
import sqlite3
import struct
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from invoicer.storage import (
    COLUMNS,
    EX_TEMPFAIL,
    OK_WIDTH,
    Batch,
    ClaimConflictError,
    RecoveryPlan,
    Row,
    Run,
    StorageError,
    StoredRuns,
    format_runs,
    missing_ranges,
    parse_runs,
)

log = logging.getLogger("invoicer")

SCHEMA_VERSION = 3
BUSY_TIMEOUT_S = 5.0
LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")  # another connection's lock: what the busy timeout waits out
SUBMITTED_AT = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

TABLES = (
    """CREATE TABLE IF NOT EXISTS invoices (
        id INTEGER PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        customer TEXT,
        currency TEXT,
        subtotal TEXT,
        tax TEXT,
        total TEXT,
        document TEXT,
        error TEXT,
        attempts INTEGER NOT NULL,
        order_id INTEGER REFERENCES orders (id)
    )""",
    """CREATE TABLE IF NOT EXISTS sequence (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        high_water INTEGER NOT NULL CHECK (high_water >= 0),
        stored_through INTEGER NOT NULL CHECK (stored_through >= 0),
        stored_runs TEXT NOT NULL DEFAULT ''
    )""",
    "INSERT OR IGNORE INTO sequence (id, high_water, stored_through) VALUES (1, 0, 0)",
    # Submitted by any program with INSERT INTO orders (payload) VALUES (?). invoice_id is the number the
    # order was paired with when the daemon claimed it; rejected, why it was refused without a number.
    # AUTOINCREMENT: an id is never used twice, so an order deleted while a claim reads it cannot come
    # back as another order under the same id. bytes is the payload's size, stored once at insert, so
    # that a claim finds what fits in the byte budget without reading payloads it will not take.
    f"""CREATE TABLE IF NOT EXISTS orders (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        payload TEXT NOT NULL,
        submitted_at TEXT NOT NULL DEFAULT ({SUBMITTED_AT}),
        invoice_id INTEGER,
        rejected TEXT,
        bytes INTEGER GENERATED ALWAYS AS (length(CAST(payload AS BLOB))) STORED,
        CHECK (invoice_id IS NULL OR rejected IS NULL)
    )""",
)
INDEXES = (
    # `invoicer failed` reads the failed invoices through this, not the whole table; it holds only them.
    "CREATE INDEX IF NOT EXISTS invoices_failed ON invoices (id) WHERE status = 'failed'",
    # One invoice per order, found with one query; demo invoices (no order) stay out of it.
    "CREATE UNIQUE INDEX IF NOT EXISTS invoices_order ON invoices (order_id) WHERE order_id IS NOT NULL",
    # One number per order. Partial, so that the waiting orders (NULL) are not in it, or the planner
    # reads them through it and sorts them at every claim (docs/performance.md).
    "CREATE UNIQUE INDEX IF NOT EXISTS orders_invoice ON orders (invoice_id) WHERE invoice_id IS NOT NULL",
    # The claim reads the waiting orders in submission order through this; claimed ones leave it.
    "CREATE INDEX IF NOT EXISTS orders_waiting ON orders (id, bytes)"
    " WHERE invoice_id IS NULL AND rejected IS NULL",
    "CREATE INDEX IF NOT EXISTS orders_rejected ON orders (id) WHERE rejected IS NOT NULL",
    # A payload never changes: a claim reads it before the transaction that pairs it, and recovery
    # reprocesses it under its number, so an edit could be invoiced in one version and stored in another.
    """CREATE TRIGGER IF NOT EXISTS orders_payload_fixed BEFORE UPDATE OF payload ON orders
        BEGIN SELECT RAISE(ABORT, 'payload cannot change: submit a new order (a waiting one may be deleted)');
        END""",
    # A paired order must not go away, nor an invoiced one lose or change its number (release unpairs
    # only numbers never handed out, which have no invoice).
    """CREATE TRIGGER IF NOT EXISTS orders_paired_kept BEFORE DELETE ON orders
        WHEN OLD.invoice_id IS NOT NULL
        BEGIN SELECT RAISE(ABORT, 'order has an invoice number; it cannot be deleted'); END""",
    """CREATE TRIGGER IF NOT EXISTS orders_invoiced_fixed BEFORE UPDATE OF invoice_id ON orders
        WHEN OLD.invoice_id IS NOT NULL AND NEW.invoice_id IS NOT OLD.invoice_id
            AND EXISTS (SELECT 1 FROM invoices WHERE id = OLD.invoice_id)
        BEGIN SELECT RAISE(ABORT, 'order is invoiced; its invoice number cannot change'); END""",
)
SCHEMA = (*TABLES, *INDEXES)
# Statements that insert many rows: an INSERT ... SELECT from a VALUES list of ``?`` rows, sized to a
# power of two and padded with rows of zeros that the WHERE drops (invoice numbers start at 1).
INSERT_PREFIX = ("INSERT INTO invoices (id, status, customer, currency, subtotal, tax, total, document,"
                 " error, attempts, order_id) SELECT ")
# Processed invoices bind OK_WIDTH values a row, status and error being literals and a demo invoice's
# order id 0 (NULLIF makes it NULL): binding costs the writer the GIL, and None binds dearest
# (docs/performance.md, "Figures behind the constants").
OK_SELECT = ("column1, 'ok', column2, column3, column4, column5, column6, column7, NULL, column8,"
             " NULLIF(column9, 0)")
ANY_SELECT = "*"
# Rows per INSERT statement, at most: a whole batch is one statement, as far as SQLite's variable limit
# (read at open) allows, because sqlite3 lets go of the GIL at every step and the writer must win it back
# from busy consumers each time; power-of-two sizes keep sqlite3's statement cache small
# (docs/performance.md, "Figures behind the constants").
ROWS_PER_STATEMENT = 2048
SELECT_MARKS = "SELECT high_water, stored_through FROM sequence WHERE id = 1"
SELECT_MAX_ID = "SELECT max(id) FROM invoices"
SELECT_IDS_BETWEEN = "SELECT id FROM invoices WHERE id > ? AND id <= ? ORDER BY id"
SELECT_RUNS = "SELECT stored_runs FROM sequence WHERE id = 1"
ADD_RUNS_COLUMN = "ALTER TABLE sequence ADD COLUMN stored_runs TEXT NOT NULL DEFAULT ''"
SELECT_FAILED = "SELECT id, attempts, error FROM invoices WHERE status = 'failed' ORDER BY id"
RAISE_HIGH_WATER = "UPDATE sequence SET high_water = high_water + ? WHERE id = 1 RETURNING high_water"
LOWER_HIGH_WATER = "UPDATE sequence SET high_water = ? WHERE id = 1 AND high_water > ?"
# Never moves stored_through back; the runs are those above the stored_through the writer passes.
ADVANCE_STORED_THROUGH = ("UPDATE sequence SET stored_through = max(stored_through, ?), stored_runs = ?"
                          " WHERE id = 1")
REPLACE_FAILED = (
    "UPDATE invoices SET status = ?, customer = ?, currency = ?, subtotal = ?, tax = ?, total = ?,"
    " document = ?, error = ?, attempts = attempts + ? WHERE id = ? AND status = 'failed'"
)
SET_HIGH_WATER_AT_LEAST = "UPDATE sequence SET high_water = ? WHERE id = 1 AND high_water < ?"
ADD_ORDER_COLUMN = "ALTER TABLE invoices ADD COLUMN order_id INTEGER REFERENCES orders (id)"
# The waiting orders, oldest first, that begin within :room bytes of payload (so the one that crosses it
# too); a payload over :max is not read out. Sizes come from the index, payloads are read for these rows
# only. One row holds them all (ids, byte sizes, and the payloads' bytes end to end): sqlite3 lets go of
# the GIL for every row it steps to, and winning it back from a busy consumer thread can take a switch
# interval each time. Bytes, not text: a payload stored as a BLOB, holding a NUL or not UTF-8 must not
# shift the others, nor fail the whole read (each is decoded, or refused, on its own).
SELECT_WAITING = """
    SELECT group_concat(o.id), group_concat(o.bytes),
           CAST(group_concat(iif(o.bytes <= :max, CAST(o.payload AS BLOB), x''), '') AS BLOB)
    FROM (SELECT id, iif(bytes <= :max, bytes, 0) AS own,
                 sum(iif(bytes <= :max, bytes, 0)) OVER (ORDER BY id ROWS UNBOUNDED PRECEDING) AS running
          FROM (SELECT id, bytes FROM orders INDEXED BY orders_waiting
                WHERE invoice_id IS NULL AND rejected IS NULL AND id > :after ORDER BY id LIMIT :limit)) AS w
    CROSS JOIN orders AS o ON o.id = w.id
    WHERE w.running - w.own < :room"""
# Pairs the claimed orders (a JSON array of ids, in order) with consecutive numbers from the first one.
PAIR_ORDERS = ("UPDATE orders SET invoice_id = ? + claimed.key FROM json_each(?) AS claimed"
               " WHERE orders.id = claimed.value AND orders.invoice_id IS NULL AND orders.rejected IS NULL")
REJECT_ORDER = "UPDATE orders SET rejected = ? WHERE id = ? AND invoice_id IS NULL"
SELECT_PAIRED = ("SELECT invoice_id, id, CAST(payload AS BLOB) FROM orders WHERE invoice_id BETWEEN ? AND ?"
                 " ORDER BY invoice_id")
UNPAIR_ABOVE = "UPDATE orders SET invoice_id = NULL WHERE invoice_id > ?"
INSERT_ORDER = "INSERT INTO orders (payload) VALUES (?)"
SELECT_REJECTED = "SELECT id, submitted_at, rejected FROM orders WHERE rejected IS NOT NULL ORDER BY id"
SELECT_ORDER_OF = "SELECT id, CAST(payload AS BLOB) FROM orders WHERE invoice_id = ?"

WAL_MAGICS = (0x377F0682, 0x377F0683)  # sqlite.org/fileformat2.html#walformat; bit 0: big-endian sums
WAL_VERSION = 3007000
WAL_HEADER = 32
WAL_FRAME_HEADER = 24

@functools.lru_cache(maxsize=32)
def _insert_statement(select: str, width: int, rows: int) -> str:
    row = f"({', '.join('?' * width)})"
    values = ", ".join([row] * rows)  # placeholders only: no value enters the SQL text
    return f"{INSERT_PREFIX}{select} FROM (VALUES {values}) WHERE column1 > 0"


def _padded_size(rows: int) -> int:
    """Return the power of two at or above ``rows``: the statement size that carries them."""
    return 1 << (rows - 1).bit_length()


# What failed, by SQLite's extended result code (sqlite.org/rescode.html): a failed fsync is the one to
# name, as the data it was to make durable may be gone from the page cache (never retried: "fsyncgate").
IO_FAILURES = {
    "SQLITE_IOERR_FSYNC": "fsync failed", "SQLITE_IOERR_DIR_FSYNC": "fsync of its directory failed",
    "SQLITE_IOERR_WRITE": "a write failed", "SQLITE_IOERR_READ": "a read failed",
    "SQLITE_IOERR_SHORT_READ": "a read failed", "SQLITE_IOERR_TRUNCATE": "a truncate failed",
}


def describe_error(  # noqa: PLR0911  # one return per kind
        path: Path, exc: BaseException, doing: str = "") -> StorageError:
    """Turn an OS or SQLite error into a one-line StorageError naming ``path``, the problem and ``doing``."""
    text = str(exc)
    during = f" while {doing}" if doing else ""
    if isinstance(exc, sqlite3.DatabaseError):
        lowered = text.lower()
        name = getattr(exc, "sqlite_errorname", "")
        if "locked" in lowered or "busy" in lowered:
            return StorageError(f"database {path} is locked by another program and stayed locked for "
                                f"{BUSY_TIMEOUT_S:g}s ({text})", EX_TEMPFAIL)
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return StorageError(f"database {path} is not a usable SQLite database ({text})")
        if "readonly" in lowered or "read-only" in lowered:
            return StorageError(f"database {path} is read-only ({text})")
        if "full" in lowered:
            return StorageError(f"database {path}: the disk is full{during} ({text})")
        if name.startswith("SQLITE_IOERR"):
            return StorageError(f"database {path}: {IO_FAILURES.get(name, 'I/O failed')}{during} ({text})")
        return StorageError(f"database {path}: {text}{during}")
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else text
        if exc.errno == errno.ENOSPC:
            return StorageError(f"database {path}: the disk is full{during} ({reason})")
        return StorageError(f"database {path} cannot be opened for writing ({reason})")
    return StorageError(f"database {path}: {type(exc).__name__}: {text}")


def _wal_checksum(data: bytes, big_endian: bool, first: int = 0, second: int = 0) -> tuple[int, int]:
    """SQLite's walChecksumBytes(): two running sums over pairs of 32-bit words."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for index in range(0, len(words), 2):
        first = (first + words[index] + second) & 0xFFFFFFFF
        second = (second + words[index + 1] + first) & 0xFFFFFFFF
    return first, second


def wal_header_problem(head: bytes, size: int) -> str | None:
    """Describe a write-ahead log state no power cut can leave (None: SQLite may open it, losing nothing).

    ``head`` is the log's start (its header, then frame 1's header and page), ``size`` the file's size.
    SQLite syncs a log's header before it writes a frame under it, and restarts a log only after every
    frame was checkpointed into the synced database; so a cut leaves a torn header only over nothing or
    over frames the database already holds, and SQLite's ignoring it loses nothing
    (docs/wal-power-loss.md). What the cut cannot explain may hide commits SQLite would silently drop.
    """
    if size < WAL_HEADER:
        return None  # absent, empty, or a new log's header write torn: no frame can follow it
    magic, version, page_size, _, salt1, salt2, sum1, sum2 = struct.unpack(">8I", head[:WAL_HEADER])
    big_endian = magic & 1 == 1
    sane = (magic in WAL_MAGICS and version == WAL_VERSION
            and 512 <= page_size <= 65536 and page_size & (page_size - 1) == 0)
    checksum = _wal_checksum(head[:24], big_endian)
    if magic in WAL_MAGICS and checksum == (sum1, sum2):
        # SQLite wrote it whole; frame by frame it checks salts and checksums and drops a torn tail.
        return None if sane else f"damaged (version {version}, page size {page_size}: not SQLite's)"
    if size == WAL_HEADER:
        return None  # a header torn with nothing behind it
    if not sane:  # a restart rewrites bytes 0-11 unchanged, and a new log has no frames before its sync
        return "damaged (not a SQLite write-ahead log header)"
    frame = head[WAL_HEADER:WAL_HEADER + WAL_FRAME_HEADER + page_size]
    if len(frame) == WAL_FRAME_HEADER + page_size:
        chained = _wal_checksum(frame[:8] + frame[WAL_FRAME_HEADER:], big_endian, *checksum)
        if (struct.unpack(">2I", frame[8:16]) == (salt1, salt2)
                and chained == struct.unpack(">2I", frame[16:24])):
            return "damaged (header checksum mismatch, though its first frame was written under it)"
    return None  # a restart's header, torn: the frames behind it are all in the database


class Storage:
    """The SQLite database of invoices and the durable numbering marks.

    Built without side effects; ``open()`` takes the instance lock, opens and checks the database.
    """

    contiguous = True  # one instance: each reservation follows the last

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        # Set by the running daemon: wait out another program's write lock however long it is held
        # (the health check reports a write that waits too long) instead of failing after the busy
        # timeout. Start-up is not patient: it exits 75 and lets systemd try again.
        self.patient = False
        # Rule: _reader_lock guards _reader, a second connection for the claims' reads: a claim reads
        # many payloads, and on the writer's connection the writer would wait for it.
        self._reader_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        # Rule: _lock guards _connection and every statement run on it. Any thread may take it (the
        # producer reserving numbers, the writer saving batches, the main thread opening, releasing and
        # closing); nobody holds it while doing anything but SQLite work.
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._writing = False  # a transaction of _connection is under way, its COMMIT included
        self._lock_fd: int | None = None
        self._rows_per_statement = 1

    # -- life cycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Take the one-instance lock, open the database, apply pragmas and schema, prove it writable."""
        self._take_instance_lock()
        try:
            self._check_wal()
            self._connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            connection = self._connection
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(f"database {self.path} cannot use WAL mode (journal_mode={mode})")
            connection.execute(f"PRAGMA synchronous={self._synchronous}")
            variables = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
            self._rows_per_statement = 1 << (min(ROWS_PER_STATEMENT, variables // COLUMNS).bit_length() - 1)
            with self._transaction() as cursor:  # the first write proves the file is writable
                version = cursor.execute("PRAGMA user_version").fetchone()[0]
                had_invoices = cursor.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'invoices'").fetchone() is not None
                if version > SCHEMA_VERSION:
                    raise StorageError(f"database {self.path} has schema version {version}, newer than "
                                       f"this invoicer's {SCHEMA_VERSION}; upgrade invoicer")
                for statement in TABLES:
                    cursor.execute(statement)
                if had_invoices and version < 2:
                    _migrate_runs(cursor)
                if had_invoices and version < 3:
                    _migrate_orders(cursor)
                for statement in INDEXES:
                    cursor.execute(statement)
                cursor.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except StorageError:
            self.close()
            raise
        except (sqlite3.Error, OSError) as exc:
            self.close()
            raise describe_error(self.path, exc) from exc

    def open_shared(self) -> None:
        """Open for reading only, beside a running daemon: no instance lock, no schema changes."""
        if not self.path.exists():
            raise StorageError(f"database {self.path.absolute()} does not exist")
        try:
            # as_uri() percent-encodes the path: a '#', '?' or '%' in it must not change which file opens.
            uri = f"{self.path.absolute().as_uri()}?mode=ro"
            self._connection = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S,
                                               isolation_level=None, check_same_thread=False)
            self._connection.execute("SELECT count(*) FROM sequence").fetchone()
        except sqlite3.Error as exc:
            self.close()
            raise describe_error(self.path, exc) from exc

    def _check_wal(self) -> None:
        """Refuse a write-ahead log that no power cut can explain; accept every state a cut leaves.

        SQLite ignores a log whose header is torn or damaged without a word, and with it every
        transaction it holds. After a power cut that loses nothing (the frames behind a torn header are
        all checkpointed), so the daemon starts by itself; any other damage may hide invoices and marks
        whose numbers would be handed out again, so it stops and lets an operator look.
        """
        wal = Path(f"{self.path}-wal")
        try:
            with wal.open("rb") as log:
                size = os.fstat(log.fileno()).st_size
                head = log.read(WAL_HEADER + WAL_FRAME_HEADER + 65536)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise describe_error(wal, exc) from exc
        problem = wal_header_problem(head, size)
        if problem:
            raise StorageError(f"database {self.path}: its write-ahead log {wal} is {problem}; refusing "
                               "to open it, as SQLite would silently drop the transactions in it")

    def _take_instance_lock(self) -> None:
        # flock(2) on the database file itself: independent of SQLite's POSIX record locks, released by
        # the kernel when the process dies however it dies, and it creates no extra file.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise describe_error(self.path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StorageError(f"database {self.path} is in use by another invoicer instance; "
                                   "only one may run per database", EX_TEMPFAIL) from None
            raise describe_error(self.path, exc) from exc
        self._lock_fd = fd

    def close(self) -> None:
        """Close the connections, then drop the instance lock; safe to call twice."""
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # only after SQLite closed: closing an fd drops POSIX locks
            self._lock_fd = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """Run a block as one write transaction (BEGIN IMMEDIATE ... COMMIT) under ``_lock``."""
        with self._lock:
            if self._connection is None:
                raise StorageError(f"database {self.path} is not open")
            cursor = self._connection.cursor()
            self._writing = True
            try:
                self._begin(cursor)
                try:
                    yield cursor
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT")
            finally:
                self._writing = False

    def _begin(self, cursor: sqlite3.Cursor) -> None:
        """BEGIN IMMEDIATE; a patient storage waits out another program's write lock, however long."""
        waited = 0.0
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not self.patient or getattr(exc, "sqlite_errorname", "") not in LOCKED:
                    raise
                waited += BUSY_TIMEOUT_S
                log.warning("database %s is locked by another program (%gs so far); still waiting",
                            self.path, waited, extra={"waited": waited})

    def open_reader(self) -> None:
        """Open the second connection the claims read through (the daemon's storage, after open())."""
        try:
            self._reader = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                           check_same_thread=False)
        except sqlite3.Error as exc:
            raise describe_error(self.path, exc) from exc

    def _write(self, action: Any, doing: str) -> Any:
        """Run ``action(cursor)`` in a transaction; an error becomes a StorageError that names ``doing``."""
        try:
            with self._transaction() as cursor:
                return action(cursor)
        except (sqlite3.Error, OSError) as exc:
            raise describe_error(self.path, exc, doing) from exc

    # -- the storage interface ------------------------------------------------------------------------

    def recovery_plan(self) -> RecoveryPlan:
        """Find what start-up must recover: every number <= high_water that is not stored.

        Reads the marks and the saved runs, not the invoices: the missing numbers are the gaps between
        the runs, and each gap is checked to hold no row (an index probe that finds nothing), so the cost
        follows what was in flight, however large the table is.
        """
        def plan(cursor: sqlite3.Cursor) -> RecoveryPlan:
            high_water, stored_through = cursor.execute(SELECT_MARKS).fetchone()
            max_id = cursor.execute(SELECT_MAX_ID).fetchone()[0] or 0
            if max_id > high_water:  # rows written by hand above the mark: cover them, never reuse them
                cursor.execute(SET_HIGH_WATER_AT_LEAST, (max_id, max_id))
                high_water = max_id
            saved = cursor.execute(SELECT_RUNS).fetchone()[0]
            try:
                runs = [run for run in parse_runs(saved) if run[1] > stored_through]
            except ValueError:
                raise StorageError(f"database {self.path}: sequence.stored_runs is damaged "
                                   f"({saved[:80]!r})") from None
            found: list[Run] = []  # rows inside a gap: written by hand, say; stored all the same
            for gap in missing_ranges(stored_through, high_water, runs):
                found += ((n, n) for (n,) in cursor.execute(SELECT_IDS_BETWEEN, (gap.start - 1, gap[-1])))
            runs = sorted([*runs, *found])
            return RecoveryPlan(high_water, stored_through, tuple(runs),
                                tuple(missing_ranges(stored_through, high_water, runs)))
        result: RecoveryPlan = self._write(plan, "finding the numbers to recover")
        return result

    def reserve(self, count: int) -> tuple[int, int]:
        """Durably raise the high-water mark by ``count``; return the first and last reserved number."""
        def raise_mark(cursor: sqlite3.Cursor) -> int:
            return int(cursor.execute(RAISE_HIGH_WATER, (count,)).fetchone()[0])
        last: int = self._write(raise_mark, "reserving invoice numbers")
        return last - count + 1, last

    def release(self, last_issued: int) -> None:
        """Lower the high-water mark to ``last_issued``, giving back reserved numbers never handed out.

        Orders claimed with those numbers wait again, for the next claim.
        """
        def release(cursor: sqlite3.Cursor) -> None:
            cursor.execute(LOWER_HIGH_WATER, (last_issued, last_issued))
            cursor.execute(UNPAIR_ABOVE, (last_issued,))
        self._write(release, "releasing unused invoice numbers")

    # -- orders -------------------------------------------------------------------------------------------

    def waiting_orders(self, limit: int, max_bytes: int,
                       room: int = 1 << 62) -> list[tuple[int, bytes | None, int]]:
        """Return (id, payload, bytes) of waiting orders, oldest first (payload None: over ``max_bytes``).

        At most ``limit`` orders, those that begin within ``room`` bytes. Payloads are the stored bytes
        (UTF-8, unless a program stored something else). Read on a connection of its own, beside the
        writer's transactions. (The check process reads on after a given id: invoicer.checker.claim.)
        """
        return split_waiting(self._read(SELECT_WAITING, {"max": max_bytes, "limit": limit, "room": room,
                                                         "after": 0}, "reading waiting orders")[0],
                             max_bytes)

    def _read(self, statement: str, parameters: Any, doing: str) -> list[Any]:
        """Run a query on the reading connection (the daemon's own, or the only one)."""
        connection, lock = ((self._reader, self._reader_lock) if self._reader is not None
                            else (self._connection, self._lock))
        with lock:
            if connection is None:
                raise StorageError(f"database {self.path} is not open")
            try:
                return connection.execute(statement, parameters).fetchall()
            except sqlite3.Error as exc:
                raise describe_error(self.path, exc, doing) from exc

    @contextlib.contextmanager
    def claiming(self, limit: int, max_bytes: int, room: int) -> Iterator[SQLiteClaim]:
        """One claim: the waiting orders that begin within ``room`` bytes, then ``pair``.

        The read runs on the reading connection, outside the write transaction that pairs them, which
        finds out (ClaimConflictError) if another program deleted one meanwhile.
        """
        yield SQLiteClaim(self, self.waiting_orders(limit, max_bytes, room))

    def claim_orders(self, order_ids: Sequence[int],
                     rejected: Sequence[tuple[int, str]]) -> tuple[int, int]:
        """Pair ``order_ids`` with the next numbers and mark ``rejected`` (id, reason), in one transaction.

        Returns the first and last number (last < first when none was paired). Raises
        ClaimConflictError, having changed nothing, if an order went away meanwhile (deleted by another
        program while it waited).
        """
        def claim(cursor: sqlite3.Cursor) -> tuple[int, int]:
            return pair_orders(cursor, order_ids, rejected)
        paired: tuple[int, int] = self._write(claim, "claiming orders")
        return paired

    def claim_database(self) -> tuple[str, str]:
        """Return what the check process claims with (invoicer.checker): the path and synchronous."""
        return str(self.path), self._synchronous

    def claim_failed(self, message: str, name: str, waited: float = 0.0) -> None:
        """Report a claim the check process could not make: SQLite's ``message`` and error ``name``.

        Another connection's write lock, held ``waited`` seconds so far, is waited out by a patient storage
        (a warning; the claim is asked for again), and silently while this daemon's own connection is in
        a transaction (its writer reports a long one); anything else is the StorageError a claim made
        here would raise.
        """
        if name in LOCKED and self._writing:
            return  # the lock is this daemon's own transaction (a commit on a stalled disk, say): reported
        if name in LOCKED and self.patient:
            log.warning("database %s is locked by another program (%gs so far); still waiting",
                        self.path, round(waited), extra={"waited": round(waited)})
            return
        exc = sqlite3.OperationalError(message)
        exc.sqlite_errorname = name
        raise describe_error(self.path, exc, "claiming orders")

    def paired_orders(self, first: int, last: int) -> list[tuple[int, int, bytes]]:
        """Return (number, order id, payload bytes) of the orders paired with numbers ``first..last``."""
        return self._read(SELECT_PAIRED, (first, last), "reading orders to recover")

    def order_of(self, number: int) -> tuple[int, bytes] | None:
        """Return (order id, payload bytes) of the order paired with invoice ``number``, or None (demo)."""
        found = self._read(SELECT_ORDER_OF, (number,), "reading an order")
        return cast("tuple[int, bytes]", found[0]) if found else None

    def rejected_orders(self) -> list[tuple[int, str, str]]:
        """(id, submitted_at, reason) of the orders rejected before numbering, by id."""
        with self._lock:
            if self._connection is None:
                raise StorageError(f"database {self.path} is not open")
            try:
                return self._connection.execute(SELECT_REJECTED).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" not in str(exc):
                    raise describe_error(self.path, exc, "reading rejected orders") from exc
                raise StorageError(f"database {self.path} has no orders table yet (schema from before "
                                   "orders); start the daemon once to upgrade it") from None
            except sqlite3.Error as exc:
                raise describe_error(self.path, exc, "reading rejected orders") from exc

    def failed(self, ids: Sequence[int] = ()) -> list[tuple[int, int, str]]:
        """(id, attempts, error) of the invoices stored as failed (only ``ids``, if given), by number."""
        with self._lock:
            if self._connection is None:
                raise StorageError(f"database {self.path} is not open")
            try:
                if not ids:
                    return self._connection.execute(SELECT_FAILED).fetchall()
                found = []
                for invoice_id in sorted(set(ids)):
                    found += self._connection.execute(
                        "SELECT id, attempts, error FROM invoices WHERE id = ? AND status = 'failed'",
                        (invoice_id,)).fetchall()
                return found
            except sqlite3.Error as exc:
                raise describe_error(self.path, exc) from exc

    def replace_failed(self, row: Row) -> bool:
        """Overwrite a failed invoice with a new outcome (attempts add up); False if it is not failed."""
        def replace(cursor: sqlite3.Cursor) -> bool:
            cursor.execute(REPLACE_FAILED, (*row[1:9], row[9], row[0]))
            return cursor.rowcount == 1
        result: bool = self._write(replace, "replacing a failed invoice")
        return result

    def ledger(self, plan: RecoveryPlan) -> Ledger:
        """Return the writer's bookkeeping, starting from what start-up found."""
        return Ledger(self, plan)

    def recovering(self) -> int:
        """Numbers taken over from other instances, unstored (none: one instance per SQLite database)."""
        return 0

    def may_retry(self, exc: StorageError, attempt: int) -> bool:
        """Never: SQLite's busy timeout (and ``patient``) did the waiting already."""
        return False

    def take_over(self) -> list[range]:
        """Numbers another instance left (none: one instance per SQLite database)."""
        return []

    def save_batch(self, batch: Batch, stored_through: int, runs: Sequence[Run] = ()) -> None:
        """Insert ``batch``, advance ``stored_through`` and save the ``runs`` above it, in one transaction."""
        most = self._rows_per_statement
        saved_runs = format_runs(runs)

        def save(cursor: sqlite3.Cursor) -> None:
            _insert(cursor, OK_SELECT, OK_WIDTH, batch.ok, most)
            if batch.failed:
                failed = list(itertools.chain.from_iterable(batch.failed))
                _insert(cursor, ANY_SELECT, COLUMNS, failed, most)
            cursor.execute(ADVANCE_STORED_THROUGH, (stored_through, saved_runs))
        self._write(save, "committing invoices")


class SQLiteClaim:
    """A claim on SQLite: the waiting orders read, and ``pair`` to number them."""

    def __init__(self, storage: Storage, waiting: list[tuple[int, bytes | None, int]]) -> None:
        self._storage = storage
        self.waiting = waiting

    def pair(self, order_ids: Sequence[int], rejected: Sequence[tuple[int, str]]) -> tuple[int, int]:
        """Pair ``order_ids`` with the next numbers and mark ``rejected`` (see Storage.claim_orders)."""
        return self._storage.claim_orders(order_ids, rejected)


class Ledger:
    """What the writer commits through on SQLite.

    ``stored_through`` and the runs above it are saved with every batch, which is what keeps recovery
    from reading the table.
    """

    def __init__(self, storage: Storage, plan: RecoveryPlan) -> None:
        self._storage = storage
        self._stored = StoredRuns(plan.stored_through, plan.runs)

    @property
    def stored_through(self) -> int:
        """Every number up to this one is stored (and committed)."""
        return self._stored.through

    @property
    def gaps(self) -> int:
        """Runs stored above stored_through: gaps left by work in flight (bounded by it)."""
        return len(self._stored)

    def commit(self, batch: Batch, numbers: Iterable[Sequence[int]]) -> None:
        """Store ``batch`` (the rows of ``numbers``) and the marks they move, in one transaction."""
        stored = self._stored.copy()  # moves on only after the commit
        for part in numbers:
            stored.add_numbers(part)
        self._storage.save_batch(batch, stored.through, stored.runs())
        self._stored = stored


def split_waiting(row: tuple[Any, Any, Any], max_bytes: int) -> list[tuple[int, bytes | None, int]]:
    """Return SELECT_WAITING's one row as (id, payload, bytes) of each order (None: over the limit)."""
    ids, sizes, joined = row
    if ids is None:
        return []
    waiting: list[tuple[int, bytes | None, int]] = []
    position = 0
    for order_id, size in zip(ids.split(","), sizes.split(","), strict=True):
        size_bytes = int(size)
        if size_bytes > max_bytes:
            waiting.append((int(order_id), None, size_bytes))
            continue
        waiting.append((int(order_id), joined[position:position + size_bytes], size_bytes))
        position += size_bytes
    waiting.sort(key=lambda order: order[0])
    return waiting


def pair_orders(cursor: sqlite3.Cursor, order_ids: Sequence[int],
                rejected: Sequence[tuple[int, str]]) -> tuple[int, int]:
    """In the caller's transaction: mark ``rejected``, pair ``order_ids`` with the next numbers.

    Returns the first and last number (last < first when none was paired); ClaimConflictError if an
    order went away meanwhile (the caller rolls back).
    """
    count = len(order_ids)
    for order_id, reason in rejected:
        cursor.execute(REJECT_ORDER, (reason, order_id))
    if not count:
        high_water = int(cursor.execute(SELECT_MARKS).fetchone()[0])
        return high_water + 1, high_water
    last = int(cursor.execute(RAISE_HIGH_WATER, (count,)).fetchone()[0])
    cursor.execute(PAIR_ORDERS, (last - count + 1, json.dumps(list(order_ids))))
    if cursor.rowcount != count:  # deleted (or rejected, paired) by another program meanwhile
        raise ClaimConflictError(f"{count - cursor.rowcount} of {count} orders went away while being claimed")
    return last - count + 1, last


def _migrate_runs(cursor: sqlite3.Cursor) -> None:
    """Migrate schema 1 to 2: save the runs above stored_through, found the old way (the rows)."""
    high_water, stored_through = cursor.execute(SELECT_MARKS).fetchone()
    stored = [row[0] for row in cursor.execute(SELECT_IDS_BETWEEN, (stored_through, high_water))]
    runs: list[Run] = []
    for number in stored:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    if "stored_runs" not in {row[1] for row in cursor.execute("PRAGMA table_info(sequence)")}:
        cursor.execute(ADD_RUNS_COLUMN)
    cursor.execute(ADVANCE_STORED_THROUGH, (stored_through, format_runs(runs)))


def _migrate_orders(cursor: sqlite3.Cursor) -> None:
    """Migrate schema 2 to 3: invoices get their order_id column (the orders table is created anew)."""
    if "order_id" not in {row[1] for row in cursor.execute("PRAGMA table_info(invoices)")}:
        cursor.execute(ADD_ORDER_COLUMN)


def submit_orders(path: Path, payloads: Sequence[str]) -> tuple[int, int]:
    """Insert ``payloads`` into the orders table of ``path`` in one transaction; return the first and last id.

    Beside a running daemon (no instance lock, no schema change): SQLite's busy timeout waits out the
    daemon's short transactions.
    """
    if _schema_version(path) < SCHEMA_VERSION:
        # A new database (the quick start submits before the first run), or one from before orders:
        # create or upgrade the schema as the daemon would. A running daemon has done it already.
        created = not path.exists()
        storage = Storage(path)
        storage.open()
        storage.close()
        if created:
            _own_like_directory(path)
    try:
        connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise describe_error(path, exc, "submitting orders") from exc
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(INSERT_ORDER, ((payload,) for payload in payloads))
            last = connection.execute("SELECT last_insert_rowid()").fetchone()[0]
            connection.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise describe_error(path, exc, "submitting orders") from exc
    finally:
        connection.close()
    return last - len(payloads) + 1, last


def _own_like_directory(path: Path) -> None:
    """Give a database root just created to its directory's owner: the daemon's user must open it."""
    if os.geteuid() != 0:
        return
    directory = os.stat(path.parent)
    if directory.st_uid != 0:
        with contextlib.suppress(OSError):  # best effort: the daemon names the problem if it remains
            os.chown(path, directory.st_uid, directory.st_gid)


def _schema_version(path: Path) -> int:
    """Return the database's schema version (0 for a file that does not exist yet)."""
    if not path.exists():
        return 0
    try:
        connection = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            return int(connection.execute("PRAGMA user_version").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise describe_error(path, exc) from exc


def _insert(cursor: sqlite3.Cursor, select: str, width: int, values: Sequence[object], most: int) -> None:
    """Insert flat ``values`` (``width`` per row) in statements of at most ``most`` rows."""
    step = most * width
    for start in range(0, len(values), step):
        part = list(values[start:start + step])
        rows = len(part) // width
        size = _padded_size(rows)
        part += [0] * ((size - rows) * width)  # ints: the cheapest value to bind
        cursor.execute(_insert_statement(select, width, size), part)
