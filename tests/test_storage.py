"""Storage against a real SQLite file: marks, batches, recovery, the instance lock, bad files."""

from __future__ import annotations

import queue
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoicer.generator import InvoiceNumberGenerator
from invoicer.pipeline import Part, StorageWriter, failed_row, invoice_row
from invoicer.pipeline.writer import StoredRuns
from invoicer.processing import sample_invoice
from invoicer.storage import (
    EX_TEMPFAIL,
    OK_WIDTH,
    SCHEMA_VERSION,
    Batch,
    RecoveryPlan,
    Row,
    Run,
    Storage,
    StorageError,
    format_runs,
    missing_ranges,
    parse_runs,
)
from invoicer.storage.sqlite import SELECT_FAILED, SELECT_IDS_BETWEEN


def rows(numbers: list[int] | range) -> list[Row]:
    """Table rows for the sample invoices of ``numbers`` (demo invoices: no order)."""
    return [invoice_row(n, sample_invoice(n), 1) for n in numbers]


def batch(numbers: list[int] | range) -> Batch:
    """A batch of the sample invoices of ``numbers``."""
    return Batch.of(rows(numbers))


def flat(ranges: tuple[range, ...]) -> list[int]:
    """The numbers of a plan's missing ranges, in order."""
    return [number for numbers in ranges for number in numbers]


def above(plan: RecoveryPlan) -> list[int]:
    """The numbers a plan's runs say are stored above stored_through."""
    return [number for first, last in plan.runs for number in range(first, last + 1)]


def stored_rows(path: Path) -> list[tuple[object, ...]]:
    """Every row of the invoices table, by number."""
    connection = sqlite3.connect(path)
    try:
        return connection.execute(
            "SELECT id, status, customer, currency, subtotal, tax, total, document, error, attempts, "
            "order_id FROM invoices ORDER BY id").fetchall()
    finally:
        connection.close()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    """An open Storage on a fresh file."""
    opened = Storage(tmp_path / "invoices.db")
    opened.open()
    yield opened
    opened.close()


def test_fresh_database_has_schema_and_zero_marks(storage: Storage) -> None:
    """A new file gets the schema, WAL mode and marks at zero; nothing to recover."""
    assert storage.recovery_plan() == RecoveryPlan(0, 0, (), ())
    with sqlite3.connect(storage.path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("SELECT count(*) FROM invoices").fetchone()[0] == 0


def test_reserve_is_durable(tmp_path: Path) -> None:
    """A reserved block survives closing and reopening the database."""
    first = Storage(tmp_path / "db")
    first.open()
    assert first.reserve(10) == (1, 10)
    assert first.reserve(5) == (11, 15)
    first.close()
    second = Storage(tmp_path / "db")
    second.open()
    plan = second.recovery_plan()
    second.close()
    assert plan.high_water == 15
    assert plan.missing == (range(1, 16),)


def test_save_batch_stores_rows_and_advances_stored_through(storage: Storage) -> None:
    """Rows and the stored_through mark commit together."""
    storage.reserve(10)
    storage.save_batch(batch([1, 2, 3, 5]), stored_through=3, runs=[(5, 5)])
    plan = storage.recovery_plan()
    assert plan.stored_through == 3
    assert plan.runs == ((5, 5),)
    assert plan.missing == (range(4, 5), range(6, 11))
    assert plan.stored_total == 4


@pytest.mark.parametrize("size", [1, 3, 8, 1000, 2048, 2049, 5000])
def test_batches_of_any_size_store_exactly_their_rows(storage: Storage, size: int) -> None:
    """Statements are padded to a power of two with rows of zeros; only the real rows are stored, intact."""
    storage.reserve(size)
    expected = rows(range(1, size + 1))
    storage.save_batch(Batch.of(expected), stored_through=size)
    assert stored_rows(storage.path) == expected


def order_id(number: int) -> int | None:
    """An order id for odd numbers, none (a demo invoice) for even ones."""
    return 10 * number if number % 2 else None


@pytest.mark.parametrize("failed", [1, 3, 2049])
def test_failed_rows_and_processed_ones_share_a_batch(storage: Storage, failed: int) -> None:
    """Failed rows take the full-row statement, processed ones the short one; both land exactly.

    Odd numbers carry an order id, even ones are demo invoices (no order): both kinds keep theirs.
    """
    total = failed + 300
    storage.reserve(total)
    expected = sorted(
        [failed_row(n, ValueError(f"broken {n}"), 3, order_id(n)) for n in range(1, failed + 1)]
        + [invoice_row(n, sample_invoice(n), 1 + n % 3, order_id(n)) for n in range(failed + 1, total + 1)])
    mixed = Batch.of(expected)
    assert (len(mixed.ok) // OK_WIDTH, len(mixed.failed), len(mixed)) == (300, failed, total)
    storage.save_batch(mixed, stored_through=total)
    assert stored_rows(storage.path) == expected


def test_a_batch_gives_back_the_rows_it_was_made_of() -> None:
    """Batch.of and Batch.rows are inverses (processed rows first): what the writer stores is the row."""
    with_order = invoice_row(8, sample_invoice(8), 2, 80)
    made_of = [*rows([4, 5]), failed_row(6, ValueError("x"), 3, 60), *rows([7]), with_order]
    assert Batch.of(made_of).rows() == [*rows([4, 5, 7]), with_order, failed_row(6, ValueError("x"), 3, 60)]
    assert (with_order[10], rows([4])[0][10]) == (80, None)


def test_stored_through_never_moves_back(storage: Storage) -> None:
    """A batch carrying a lower stored_through leaves the mark where it was."""
    storage.reserve(10)
    storage.save_batch(batch(range(1, 6)), stored_through=5)
    storage.save_batch(batch([7]), stored_through=2)
    assert storage.recovery_plan().stored_through == 5


def test_a_number_cannot_be_stored_twice(storage: Storage) -> None:
    """The primary key refuses a duplicate; the whole batch is rolled back."""
    storage.reserve(10)
    storage.save_batch(batch([1]), stored_through=1)
    with pytest.raises(StorageError, match="UNIQUE"):
        storage.save_batch(batch([2, 1]), stored_through=2)
    assert storage.recovery_plan().runs == ()
    assert storage.recovery_plan().missing == (range(2, 11),)


def test_release_gives_back_the_unused_reservation(storage: Storage) -> None:
    """release() lowers the mark to the last number handed out, never raises it."""
    storage.reserve(100)
    storage.release(40)
    assert storage.recovery_plan().high_water == 40
    storage.release(70)
    assert storage.recovery_plan().high_water == 40


def test_release_unpairs_the_orders_of_the_numbers_it_gives_back(storage: Storage) -> None:
    """Orders claimed with numbers above the last one handed out wait again, in their order; the rest stay."""
    with sqlite3.connect(storage.path) as connection:
        connection.executemany("INSERT INTO orders (payload) VALUES (?)",
                               [(f'{{"n":{n}}}',) for n in range(4)])
    connection.close()
    assert storage.claim_orders([1, 2, 3, 4], []) == (1, 4)
    storage.release(2)
    assert storage.recovery_plan().high_water == 2
    assert storage.paired_orders(1, 4) == [(1, 1, b'{"n":0}'), (2, 2, b'{"n":1}')]
    assert storage.waiting_orders(10, 1024) == [(3, b'{"n":2}', 7), (4, b'{"n":3}', 7)]


def test_rows_above_the_mark_are_covered(storage: Storage) -> None:
    """A row inserted above the mark by hand raises the mark, so its number is never reused."""
    with sqlite3.connect(storage.path) as connection:
        connection.execute("INSERT INTO invoices (id, status, attempts) VALUES (3, 'ok', 1)")
    connection.close()
    plan = storage.recovery_plan()
    assert plan.high_water == 3
    assert plan.missing == (range(1, 3),)


def test_recovery_reads_a_primary_key_range_not_the_table(storage: Storage) -> None:
    """The recovery query is a range search on the primary key, so its cost is bounded by the range."""
    with sqlite3.connect(storage.path) as connection:
        plan = connection.execute(f"EXPLAIN QUERY PLAN {SELECT_IDS_BETWEEN}", (0, 10)).fetchall()
    connection.close()
    detail = " ".join(row[-1] for row in plan)
    assert "SEARCH invoices USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)" in detail


def test_second_instance_is_refused(storage: Storage) -> None:
    """Opening a database another Storage holds fails with a clear error and EX_TEMPFAIL."""
    second = Storage(storage.path)
    with pytest.raises(StorageError, match="in use by another invoicer instance") as caught:
        second.open()
    assert caught.value.exit_code == EX_TEMPFAIL
    storage.reserve(1)  # the first one is unharmed


def test_not_a_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """A file that is not SQLite is refused with a message naming it, and its bytes stay the same."""
    path = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 200
    path.write_bytes(content)
    with pytest.raises(StorageError, match=rf"{path} is not a usable SQLite database"):
        Storage(path).open()
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_missing_directory_is_refused_naming_the_path(tmp_path: Path) -> None:
    """A database in a directory that does not exist fails with the path and the reason."""
    path = tmp_path / "nowhere" / "invoices.db"
    with pytest.raises(StorageError, match=rf"{path}.*No such file or directory"):
        Storage(path).open()


def write(storage: Storage, plan: RecoveryPlan, batches: list[list[Row]]) -> StorageWriter:
    """Run a real StorageWriter over ``batches`` (each one consumer part) and wait for it to commit them."""
    results: queue.Queue[Part] = queue.Queue()
    failures: list[BaseException] = []
    writer = StorageWriter(storage, results, plan, lambda _where, exc: failures.append(exc),
                           batch_size=7)
    writer.start()
    for part in batches:
        results.put(Part(tuple(row[0] for row in part), Batch.of(part)))
    writer.stop()
    assert writer.join(30)
    assert failures == []
    return writer


def test_writer_advances_stored_through_over_out_of_order_rows(storage: Storage) -> None:
    """Rows committed out of order move stored_through only across a complete prefix."""
    plan = storage.recovery_plan()
    storage.reserve(20)
    writer = write(storage, plan, [rows([3, 1]), rows([2, 5]), [failed_row(6, ValueError("x"), 3)]])
    assert writer.stored_through == 3
    assert writer.committed_total == 5
    after = storage.recovery_plan()
    assert (after.stored_through, after.runs) == (3, ((5, 6),))


def test_writer_treats_only_consecutive_parts_as_runs(storage: Storage) -> None:
    """A part whose ends look like a run (1 ... 3, three rows) but is not one is taken row by row."""
    plan = storage.recovery_plan()
    storage.reserve(20)
    writer = write(storage, plan, [rows([1, 10, 3]), rows([4, 5, 6])])
    assert writer.stored_through == 1  # 2 is missing: neither 1..3 nor 1..6 is stored
    assert above(storage.recovery_plan()) == [3, 4, 5, 6, 10]


def test_writer_takes_range_parts_as_runs(storage: Storage) -> None:
    """Parts of new chunks arrive as ranges, one run each, in any order; the prefix they close is stored."""
    plan = storage.recovery_plan()
    storage.reserve(20)
    results: queue.Queue[Part] = queue.Queue()
    failures: list[BaseException] = []
    writer = StorageWriter(storage, results, plan, lambda _where, exc: failures.append(exc))
    writer.start()
    for numbers in (range(4, 8), range(9, 12), range(1, 4)):
        results.put(Part(numbers, batch(numbers)))
    writer.stop()
    assert writer.join(30)
    assert failures == []
    assert (writer.stored_through, writer.committed_total) == (7, 10)
    assert storage.recovery_plan().runs == ((9, 11),)
    assert [row[0] for row in stored_rows(storage.path)] == [*range(1, 8), 9, 10, 11]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_invariant_holds_through_random_hand_outs_commits_and_crashes(data: st.DataObject) -> None:
    """Whatever is handed out, committed or lost in a crash, recovery owes exactly the unstored numbers."""
    with tempfile.TemporaryDirectory() as directory:
        check_random_crashes(Path(directory) / "p.db", data)


def check_random_crashes(database: Path, data: st.DataObject) -> None:
    """Drive generator, writer and recovery through drawn steps and crashes, checking after each."""
    block = data.draw(st.integers(1, 30), label="block")
    handed_out: set[int] = set()
    for _crash in range(data.draw(st.integers(1, 4), label="runs")):
        storage = Storage(database, synchronous="OFF")
        storage.open()
        plan = storage.recovery_plan()
        with sqlite3.connect(database) as connection:
            stored = {row[0] for row in connection.execute("SELECT id FROM invoices")}
        connection.close()
        assert handed_out <= set(range(1, plan.high_water + 1))
        assert stored.isdisjoint(flat(plan.missing))
        assert stored | set(flat(plan.missing)) == set(range(1, plan.high_water + 1))
        assert plan.stored_total == len(stored)
        generator = InvoiceNumberGenerator(storage, plan.high_water, block_size=block)
        owed = flat(plan.missing)
        batches: list[list[Row]] = []
        for _step in range(data.draw(st.integers(0, 12), label="steps")):
            if data.draw(st.booleans(), label="take"):
                numbers = list(generator.take(data.draw(st.integers(1, 10), label="limit")))
                handed_out.update(numbers)
                owed.extend(numbers)
            elif owed:
                picked = data.draw(st.lists(st.sampled_from(owed), unique=True, max_size=8), label="commit")
                owed = [n for n in owed if n not in picked]
                batches.append(rows(picked))
        write(storage, plan, batches)
        storage.close()  # crash: whatever is still owed is abandoned, the reservation is not released
    # A final clean run processes everything owed and releases nothing: the table is gap-free.
    storage = Storage(database, synchronous="OFF")
    storage.open()
    plan = storage.recovery_plan()
    write(storage, plan, [rows(flat(plan.missing))])
    final = storage.recovery_plan()
    storage.close()
    assert final.missing == ()
    assert final.stored_total == final.high_water >= len(handed_out)


@pytest.mark.parametrize("name", ["a#b.db", "a?mode=rw.db", "a%20b.db"], ids=["hash", "query", "percent"])
def test_shared_opening_reads_the_named_file(tmp_path: Path, name: str) -> None:
    """A '#', '?' or '%' in the path is quoted: `invoicer failed` reads that file, not another one."""
    storage = Storage(tmp_path / name)
    storage.open()
    storage.reserve(3)
    storage.save_batch(Batch.of([*rows([1, 2]), failed_row(3, ValueError("bad"), 3)]), stored_through=3)
    storage.close()
    shared = Storage(tmp_path / name)
    shared.open_shared()
    try:
        assert [row[0] for row in shared.failed()] == [3]
    finally:
        shared.close()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(name)) == []


def test_failed_invoices_are_found_through_their_own_index(storage: Storage) -> None:
    """Listing failed invoices searches the partial index, not the whole table."""
    with sqlite3.connect(storage.path) as connection:
        plan = connection.execute(f"EXPLAIN QUERY PLAN {SELECT_FAILED}").fetchall()
    connection.close()
    assert "USING COVERING INDEX invoices_failed" in " ".join(row[-1] for row in plan) or \
        "USING INDEX invoices_failed" in " ".join(row[-1] for row in plan)


@pytest.mark.parametrize(("through", "high_water", "runs", "expected"), [
    (0, 0, [], []),
    (0, 5, [], [range(1, 6)]),
    (3, 10, [(5, 6), (8, 8)], [range(4, 5), range(7, 8), range(9, 11)]),
    (3, 6, [(4, 6)], []),
    (3, 10, [(2, 5)], [range(6, 11)]),  # a run reaching below stored_through
], ids=["empty", "all", "gaps", "none", "straddles"])
def test_missing_ranges_are_the_gaps_between_runs(through: int, high_water: int, runs: list[Run],
                                                  expected: list[range]) -> None:
    """What recovery owes: (stored_through, high_water] less the runs, as ranges."""
    assert missing_ranges(through, high_water, runs) == expected


def test_a_schema_1_database_gets_its_runs_saved(tmp_path: Path) -> None:
    """A database from before the saved runs is migrated once: its runs are read from the rows, then saved."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript("""
            CREATE TABLE invoices (id INTEGER PRIMARY KEY, status TEXT NOT NULL, customer TEXT,
                currency TEXT, subtotal TEXT, tax TEXT, total TEXT, document TEXT, error TEXT,
                attempts INTEGER NOT NULL);
            CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1), high_water INTEGER NOT NULL,
                stored_through INTEGER NOT NULL);
            INSERT INTO sequence VALUES (1, 20, 3);
            PRAGMA user_version = 1;
        """)
        connection.executemany("INSERT INTO invoices (id, status, attempts) VALUES (?, 'ok', 1)",
                               [(n,) for n in (1, 2, 3, 5, 6, 7, 9)])
    connection.close()
    storage = Storage(path)
    storage.open()
    plan = storage.recovery_plan()
    storage.close()
    assert plan.runs == ((5, 7), (9, 9))
    assert plan.missing == (range(4, 5), range(8, 9), range(10, 21))
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert connection.execute("SELECT stored_runs FROM sequence").fetchone()[0] == "5-7,9-9"
    connection.close()
    assert_has_orders(path, invoices=7)  # and on through 2 -> 3


def assert_has_orders(path: Path, invoices: int) -> None:
    """The database is at schema 3: invoices have an order_id (NULL for the old rows), orders exist."""
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        columns = [row[1] for row in connection.execute("PRAGMA table_info(invoices)")]
        assert columns[-1] == "order_id"
        assert connection.execute("SELECT count(*) FROM invoices WHERE order_id IS NULL").fetchone()[0] \
            == invoices
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert {"orders", "invoices_order", "orders_waiting", "orders_rejected"} <= names
        assert connection.execute("SELECT count(*) FROM orders").fetchone()[0] == 0
    connection.close()


SCHEMA_2 = """
    CREATE TABLE invoices (id INTEGER PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        customer TEXT, currency TEXT, subtotal TEXT, tax TEXT, total TEXT, document TEXT, error TEXT,
        attempts INTEGER NOT NULL);
    CREATE TABLE sequence (id INTEGER PRIMARY KEY CHECK (id = 1),
        high_water INTEGER NOT NULL CHECK (high_water >= 0),
        stored_through INTEGER NOT NULL CHECK (stored_through >= 0), stored_runs TEXT NOT NULL DEFAULT '');
    INSERT INTO sequence VALUES (1, 20, 3, '5-7');
    CREATE INDEX invoices_failed ON invoices (id) WHERE status = 'failed';
    PRAGMA user_version = 2;
"""


def test_a_schema_2_database_gains_orders(tmp_path: Path) -> None:
    """A database from before orders keeps its invoices and marks; it gains invoices.order_id and orders."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as connection:
        connection.executescript(SCHEMA_2)
        connection.executemany("INSERT INTO invoices (id, status, attempts) VALUES (?, 'ok', 1)",
                               [(n,) for n in (1, 2, 3, 5, 7)])
        connection.execute("INSERT INTO invoices (id, status, error, attempts)"
                           " VALUES (6, 'failed', 'bad', 3)")
    connection.close()
    storage = Storage(path)
    storage.open()
    plan = storage.recovery_plan()
    assert (plan.stored_through, plan.high_water, plan.runs) == (3, 20, ((5, 7),))
    assert plan.missing == (range(4, 5), range(8, 21))
    assert storage.failed() == [(6, 3, "bad")]
    storage.close()
    assert_has_orders(path, invoices=6)
    again = Storage(path)  # the migration is done once; opening again changes nothing
    again.open()
    try:
        assert again.recovery_plan() == plan
        with sqlite3.connect(path) as connection:
            connection.execute("INSERT INTO orders (payload) VALUES ('{}')")
        connection.close()
        assert again.claim_orders([1], []) == (21, 21)  # the orders table works like a new one's
        assert again.paired_orders(21, 21) == [(21, 1, b"{}")]
    finally:
        again.close()


def test_a_database_from_a_newer_invoicer_is_refused_untouched(tmp_path: Path) -> None:
    """A schema version above this invoicer's is refused naming both; nothing is created or downgraded."""
    path = tmp_path / "new.db"
    with sqlite3.connect(path) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    connection.close()
    with pytest.raises(StorageError, match=rf"schema version {SCHEMA_VERSION + 1}, newer than this "
                                           rf"invoicer's {SCHEMA_VERSION}; upgrade invoicer"):
        Storage(path).open()
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert connection.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    connection.close()


def test_recovery_counts_a_row_inside_a_gap_as_stored(storage: Storage) -> None:
    """A row in a gap the saved runs do not know (written by hand) is found and never processed again."""
    storage.reserve(10)
    storage.save_batch(batch([1, 2]), stored_through=2)
    with sqlite3.connect(storage.path) as connection:
        connection.execute("INSERT INTO invoices (id, status, attempts) VALUES (6, 'ok', 1)")
    connection.close()
    plan = storage.recovery_plan()
    assert plan.missing == (range(3, 6), range(7, 11))
    assert plan.stored_total == 3


def test_stored_runs_merge_whatever_order_they_come_in() -> None:
    """Runs that touch merge, and stored_through swallows every run that reaches it."""
    stored = StoredRuns(10)
    for first, last in [(15, 15), (13, 13), (17, 20), (14, 14), (16, 16)]:
        stored.add(first, last)
    assert (stored.through, stored.runs()) == (10, ((13, 20),))
    stored.add(11, 12)
    assert (stored.through, stored.runs(), len(stored)) == (20, (), 0)
    stored.add(5, 8)  # below stored_through: nothing to do
    stored.add_numbers([22, 23, 25])
    assert stored.runs() == ((22, 23), (25, 25))


def test_runs_are_saved_as_readable_text(storage: Storage) -> None:
    """The runs above stored_through are plain text an operator can read: first-last pairs."""
    storage.reserve(20)
    storage.save_batch(batch([1, 2, 5, 6, 9]), stored_through=2, runs=[(5, 6), (9, 9)])
    with sqlite3.connect(storage.path) as connection:
        assert connection.execute("SELECT stored_runs FROM sequence").fetchone()[0] == "5-6,9-9"
    connection.close()
    assert parse_runs(format_runs([(5, 6), (9, 9)])) == [(5, 6), (9, 9)]


def test_damaged_saved_runs_are_a_clear_error(storage: Storage) -> None:
    """Saved runs that are not first-last pairs stop recovery with a message naming them."""
    with sqlite3.connect(storage.path) as connection:
        connection.execute("UPDATE sequence SET stored_runs = 'five-six'")
    connection.close()
    with pytest.raises(StorageError, match=r"sequence.stored_runs is damaged \('five-six'\)"):
        storage.recovery_plan()
