"""The orders intake on a real SQLite file: claims, rejections, the byte budget, release, recovery, submit."""

from __future__ import annotations

import codecs
import io
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoicer.generator import InvoiceNumberGenerator
from invoicer.intake import ByteBudget, DemoSource, OrderChunk, OrderSource, Recovery
from invoicer.maintenance import SubmitError, read_orders
from invoicer.orders import DEFAULT_MAX_ORDER_BYTES, InvalidOrder, check_order, demo_order
from invoicer.pipeline import Part, failed_row, invoice_values
from invoicer.pipeline.writer import StoredRuns
from invoicer.processing import build_invoice
from invoicer.storage import Batch, ClaimConflictError, Storage, StorageError, submit_orders
from tests.test_storage import SCHEMA_2

LIMIT = DEFAULT_MAX_ORDER_BYTES


def payload(index: int) -> str:
    """A valid order, different for each index."""
    return json.dumps({**demo_order(index), "reference": f"PO-{index}"})


def submit(database: Path, payloads: list[str] | list[str | bytes]) -> list[int]:
    """Insert payloads with plain SQL, as any application would; return their ids."""
    with sqlite3.connect(database) as connection:
        ids = [connection.execute("INSERT INTO orders (payload) VALUES (?)", (text,)).lastrowid or 0
               for text in payloads]
    connection.close()
    return ids


def pairs(database: Path) -> dict[int, int]:
    """Map order id to invoice number, read by another connection (what is durable)."""
    with sqlite3.connect(database) as connection:
        found = dict(connection.execute("SELECT id, invoice_id FROM orders WHERE invoice_id IS NOT NULL"))
    connection.close()
    return found


def source(storage: Storage, budget: int = 1 << 30, high_water: int | None = None) -> OrderSource:
    if high_water is None:
        high_water = storage.recovery_plan().high_water
    return OrderSource(storage, high_water, ByteBudget(budget), check_order, max_order_bytes=LIMIT)


def refusing(reference: str, error: Exception) -> Callable[..., dict[str, Any]]:
    """The built-in check, raising ``error`` for the order with ``reference`` (a stricter or broken one)."""
    def check(text: str, *, max_bytes: int) -> dict[str, Any]:
        order = check_order(text, max_bytes=max_bytes)
        if order["reference"] == reference:
            raise error
        return order
    return check


def commit(storage: Storage, chunks: list[OrderChunk]) -> None:
    """Store every request of ``chunks`` as the pipeline would, advancing the marks."""
    plan = storage.recovery_plan()
    stored = StoredRuns(plan.stored_through, plan.runs)
    ok: list[object] = []
    for chunk in chunks:
        stored.add_numbers(chunk)
        for request in chunk.requests:
            ok += invoice_values(request.number, build_invoice(request.number, request.order), 1,
                                 request.order_id or 0)
    storage.save_batch(Batch(ok), stored.through, stored.runs())


def test_a_claim_pairs_orders_with_consecutive_numbers_in_submission_order(storage: Storage) -> None:
    """The pairing is in the database, for any other connection to see, before a processor gets the order."""
    ids = submit(storage.path, [payload(i) for i in range(10)])
    orders = source(storage)
    chunk = orders.take(4)
    assert chunk is not None
    assert list(chunk) == [1, 2, 3, 4]
    assert [request.order_id for request in chunk.requests] == ids[:4]
    assert chunk.requests[2].order == json.loads(payload(2))
    # The whole claim is durable, handed out or not: ten orders, numbers 1..10 in id order.
    assert pairs(storage.path) == dict(zip(ids, range(1, 11), strict=True))
    assert storage.recovery_plan().high_water == 10


def test_invalid_orders_are_rejected_without_a_number(storage: Storage) -> None:
    """Bad JSON, wrong types, absurd nesting and oversize orders are rejected; the rest stays gap-free."""
    deep = json.dumps({**demo_order(4), "metadata": {"a": "[" * 100 + "]" * 100}})
    deep = deep.replace('"[', "[").replace(']"', "]")
    bad = ["{not json", json.dumps({**demo_order(1), "lines": "many"}), deep,
           json.dumps({**demo_order(2), "currency": "euro"}), json.dumps(demo_order(3) | {"x": "y" * LIMIT})]
    texts = [payload(0), bad[0], payload(1), bad[1], bad[2], payload(2), bad[3], bad[4], payload(3)]
    ids = submit(storage.path, texts)
    chunk = source(storage).take(100)
    assert chunk is not None
    assert [request.order_id for request in chunk.requests] == [ids[0], ids[2], ids[5], ids[8]]
    assert list(chunk) == [1, 2, 3, 4]
    rejected = {order_id: reason for order_id, _, reason in storage.rejected_orders()}
    assert set(rejected) == {ids[1], ids[3], ids[4], ids[6], ids[7]}
    assert rejected[ids[1]].startswith("malformed JSON")
    assert rejected[ids[3]].startswith("lines:")
    assert "deeper than" in rejected[ids[4]]
    assert rejected[ids[6]].startswith("currency:")
    assert f"over the limit of {LIMIT:,} bytes" in rejected[ids[7]]
    assert all("\n" not in reason for reason in rejected.values())
    assert source(storage).take(100) is None  # nothing is waiting any more: rejected ones stay out


def test_the_byte_budget_bounds_a_claim_and_admits_a_large_order_alone(storage: Storage) -> None:
    big = json.dumps({**demo_order(1), "metadata": {"note": "x" * 5000}})
    submit(storage.path, [payload(1), payload(2), big, payload(3)])
    budget = ByteBudget(2 * len(payload(1)) + 10)
    orders = OrderSource(storage, 0, budget, check_order, max_order_bytes=LIMIT)
    first = orders.take(10)
    assert first is not None
    assert len(first) == 2  # the big one does not fit beside them
    assert budget.used == first.weight == len(payload(1)) + len(payload(2))
    assert orders.take(10) is None  # no room: nothing claimed, the big order still waits
    assert pairs(storage.path) == {1: 1, 2: 2}
    budget.give_back(first.weight)  # committed
    alone = orders.take(10)
    assert alone is not None
    assert [request.order_id for request in alone.requests] == [3]  # over the budget, so alone
    assert budget.used == len(big)


def test_a_stop_gives_back_what_was_claimed_but_not_handed_out(storage: Storage) -> None:
    ids = submit(storage.path, [payload(i) for i in range(10)])
    orders = source(storage)
    chunk = orders.take(3)
    assert chunk is not None
    commit(storage, [chunk])
    storage.release(orders.last_issued)
    assert pairs(storage.path) == dict(zip(ids[:3], range(1, 4), strict=True))
    assert storage.recovery_plan().high_water == 3
    again = source(storage).take(100)  # the next start claims the rest, numbering on from 4
    assert again is not None
    assert list(again) == list(range(4, 11))
    assert [request.order_id for request in again.requests] == ids[3:]


def test_give_back_returns_a_chunk_in_front_of_the_claim(storage: Storage) -> None:
    submit(storage.path, [payload(i) for i in range(6)])
    orders = source(storage)
    chunk = orders.take(2)
    assert chunk is not None
    orders.give_back(chunk)
    assert orders.last_issued == 0
    whole = orders.take(100)
    assert whole is not None
    assert list(whole) == list(range(1, 7))


def test_recovery_gives_a_number_its_own_order_again(storage: Storage) -> None:
    """After a crash the same orders come back under the same numbers; a number without one is a demo."""
    ids = submit(storage.path, [payload(i) for i in range(8)])
    chunk = source(storage).take(8)
    assert chunk is not None
    commit(storage, [chunk[2:5]])  # crash: 1, 2 and 6..8 were in flight
    plan = storage.recovery_plan()
    assert plan.missing == (range(1, 3), range(6, 9))
    fresh = source(storage, high_water=plan.high_water)
    recovered = [item for numbers in plan.missing for item in fresh.recover(numbers)]
    assert all(isinstance(item, OrderChunk) for item in recovered)
    requests = [request for item in recovered for request in item.requests]
    assert [(r.number, r.order_id) for r in requests] == [(1, ids[0]), (2, ids[1]), (6, ids[5]),
                                                           (7, ids[6]), (8, ids[7])]
    assert requests[2].order == json.loads(payload(5))
    storage.reserve(1)  # a number handed out by the demo source: no order is paired with it
    assert fresh.recover(range(9, 10)) == [range(9, 10)]  # demo numbers stay bare: their orders are made
    (mixed,) = fresh.recover(range(8, 10))
    assert isinstance(mixed, OrderChunk)
    assert [(r.number, r.order_id) for r in mixed.requests] == [(8, ids[7]), (9, None)]
    assert mixed.requests[1].order == demo_order(9)
    assert mixed.weight == len(payload(7))


def test_a_restart_as_a_demo_still_recovers_orders_with_their_own_orders(storage: Storage) -> None:
    """Orders claimed under INVOICER_SOURCE=orders keep their orders when the next start is a demo."""
    ids = submit(storage.path, [payload(i) for i in range(3)])
    assert source(storage).take(1) is not None  # crash: all three claimed, none stored
    plan = storage.recovery_plan()
    budget = ByteBudget(1 << 20)
    demo = DemoSource(InvoiceNumberGenerator(storage, plan.high_water),
                      Recovery(storage, budget, check_order, LIMIT))
    (chunk,) = demo.recover(plan.missing[0])
    assert isinstance(chunk, OrderChunk)
    assert [(r.number, r.order_id) for r in chunk.requests] == list(zip([1, 2, 3], ids, strict=True))
    assert demo.admit(chunk, timeout=0)
    assert budget.used == chunk.weight > 0


def test_an_order_failing_its_check_at_recovery_is_stored_failed_under_its_number(storage: Storage) -> None:
    ids = submit(storage.path, [payload(i) for i in range(3)])
    assert source(storage).take(3) is not None

    stricter = refusing("PO-1", InvalidOrder("reference: PO-1 is blocked"))
    later = OrderSource(storage, 3, ByteBudget(1 << 20), stricter, max_order_bytes=LIMIT)
    items = later.recover(range(1, 4))
    assert [type(item) for item in items] == [OrderChunk, Part, OrderChunk]
    failed = items[1]
    assert isinstance(failed, Part)
    assert list(failed.numbers) == [2]
    row = failed.batch.failed[0]
    assert row[0] == 2
    assert row[10] == ids[1]
    assert row[8] == f"InvalidOrder: order {ids[1]} no longer passes its check: reference: PO-1 is blocked"


def test_payloads_never_change_and_paired_orders_stay(storage: Storage) -> None:
    """A claim reads payloads before it pairs them and recovery reads them again: they must not change."""
    submit(storage.path, [payload(1), payload(2), payload(3)])
    chunk = source(storage).take(1)
    assert chunk is not None
    commit(storage, [chunk])  # order 1 invoiced, 2 and 3 paired (claimed), none waiting
    submit(storage.path, [payload(4)])
    with sqlite3.connect(storage.path) as connection:
        for order_id in (1, 2, 4):  # invoiced, paired, waiting
            with pytest.raises(sqlite3.IntegrityError, match="payload cannot change"):
                connection.execute("UPDATE orders SET payload = '{}' WHERE id = ?", (order_id,))
        for order_id in (1, 2):
            with pytest.raises(sqlite3.IntegrityError, match="cannot be deleted"):
                connection.execute("DELETE FROM orders WHERE id = ?", (order_id,))
        with pytest.raises(sqlite3.IntegrityError, match="invoice number cannot change"):
            connection.execute("UPDATE orders SET invoice_id = NULL WHERE id = 1")
        connection.execute("DELETE FROM orders WHERE id = 4")  # a waiting order may be withdrawn
    connection.close()
    storage.release(1)  # the daemon's own unpairing of numbers never handed out still works
    assert pairs(storage.path) == {1: 1}


def test_a_claim_rolls_back_when_another_program_deletes_a_waiting_order(storage: Storage) -> None:
    submit(storage.path, [payload(1), payload(2)])
    with sqlite3.connect(storage.path) as connection:
        connection.execute("DELETE FROM orders WHERE id = 2")
    connection.close()
    with pytest.raises(ClaimConflictError, match="1 of 2 orders went away while being claimed"):
        storage.claim_orders([1, 2], [])
    assert pairs(storage.path) == {}
    assert storage.recovery_plan().high_water == 0  # rolled back: no number taken


def test_a_source_reads_again_after_a_waiting_order_is_deleted_mid_claim(storage: Storage) -> None:
    """The deletion lands between the read and the pairing: that claim is dropped, the next one pairs."""
    ids = submit(storage.path, [payload(i) for i in range(5)])
    read = storage.waiting_orders

    def read_then_delete(*args: int) -> list[tuple[int, bytes | None, int]]:
        waiting = read(*args)
        with sqlite3.connect(storage.path) as connection:
            connection.execute("DELETE FROM orders WHERE id = ?", (ids[2],))
        connection.close()
        storage.waiting_orders = read  # type: ignore[method-assign]
        return waiting

    storage.waiting_orders = read_then_delete  # type: ignore[method-assign,assignment]
    orders = source(storage)
    assert orders.take(10) is None
    chunk = orders.take(10)
    assert chunk is not None
    assert list(chunk) == [1, 2, 3, 4]
    assert [request.order_id for request in chunk.requests] == [ids[0], ids[1], ids[3], ids[4]]


def test_a_check_that_breaks_rejects_the_order_and_says_so(storage: Storage) -> None:
    """A plugin's check_order that raises something else than InvalidOrder refuses that order only."""
    ids = submit(storage.path, [payload(1), payload(2)])

    broken = refusing("PO-2", KeyError("tax_id"))
    orders = OrderSource(storage, 0, ByteBudget(1 << 20), broken, max_order_bytes=LIMIT)
    chunk = orders.take(10)
    assert chunk is not None
    assert [request.order_id for request in chunk.requests] == [ids[0]]
    assert storage.rejected_orders()[0][::2] == (ids[1], "check_order failed: KeyError: 'tax_id'")


def test_an_invoice_row_names_its_order_and_only_once(storage: Storage) -> None:
    ids = submit(storage.path, [payload(1), payload(2)])
    chunk = source(storage).take(2)
    assert chunk is not None
    commit(storage, [chunk])
    with sqlite3.connect(storage.path) as connection:
        rows = connection.execute("SELECT id, order_id FROM invoices ORDER BY id").fetchall()
        assert rows == [(1, ids[0]), (2, ids[1])]
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            connection.execute("INSERT INTO invoices (id, status, attempts, order_id) VALUES (9, 'ok', 1, ?)",
                               (ids[0],))
    connection.close()


def test_demo_invoices_store_no_order(storage: Storage) -> None:
    storage.reserve(2)
    storage.save_batch(Batch(ok=[*invoice_values(1, build_invoice(1, demo_order(1)), 1)],
                             failed=[failed_row(2, ValueError("bad"), 3)]), stored_through=2)
    with sqlite3.connect(storage.path) as connection:
        assert connection.execute("SELECT id, order_id FROM invoices").fetchall() == [(1, None), (2, None)]
    connection.close()


def test_the_budget_waits_for_room_and_wakes_when_bytes_come_back() -> None:
    budget = ByteBudget(100)
    budget.take(80)
    assert budget.room() == 20
    assert not budget.wait_room(30, timeout=0)
    woke = threading.Event()

    def waiter() -> None:
        if budget.wait_room(30, timeout=30):
            woke.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    budget.give_back(80)
    thread.join(30)
    assert woke.is_set()
    assert budget.room() == 100


# -- submit ---------------------------------------------------------------------------------------------

def test_submit_creates_the_database_and_inserts_in_one_transaction(tmp_path: Path) -> None:
    database = tmp_path / "new.db"
    assert submit_orders(database, [payload(1), payload(2)]) == (1, 2)
    assert submit_orders(database, [payload(3)]) == (3, 3)
    with sqlite3.connect(database) as connection:
        assert [row[0] for row in connection.execute("SELECT payload FROM orders ORDER BY id")] == [
            payload(1), payload(2), payload(3)]
        assert connection.execute("PRAGMA user_version").fetchone()[0] == 3
    connection.close()


def test_a_bad_line_names_itself_and_nothing_is_read_further() -> None:
    lines = [payload(1).encode(), b"", b"   ", payload(2).encode(), b'{"customer": "x"}']
    with pytest.raises(SubmitError, match=r"^orders.jsonl, line 5: missing field .currency.$") as caught:
        read_orders(io.BytesIO(b"\n".join(lines)), "orders.jsonl", check_order, LIMIT)
    assert caught.value.exit_code == 65
    blanks_skipped = read_orders(io.BytesIO(b"\n".join(lines[:4])), "f", check_order, LIMIT)
    assert blanks_skipped == [payload(1), payload(2)]
    with pytest.raises(SubmitError, match=r"^f, line 1: not UTF-8"):
        read_orders(io.BytesIO(b"\xff{}"), "f", check_order, LIMIT)


def test_a_schema_2_database_gets_orders(tmp_path: Path) -> None:
    """The upgrade keeps every invoice and adds the orders table and invoices.order_id."""
    database = tmp_path / "v2.db"
    with sqlite3.connect(database) as connection:
        connection.executescript(SCHEMA_2)
        connection.executescript("""
            UPDATE sequence SET high_water = 2, stored_through = 2, stored_runs = '';
            INSERT INTO invoices (id, status, attempts) VALUES (1, 'ok', 1), (2, 'ok', 1);""")
    connection.close()
    store = Storage(database)
    store.open()
    try:
        submit(database, [payload(1)])
        chunk = source(store).take(5)
        assert chunk is not None
        assert list(chunk) == [3]
        commit(store, [chunk])
    finally:
        store.close()
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT id, order_id FROM invoices").fetchall() == [(1, None), (2, None),
                                                                                     (3, 1)]
    connection.close()


# -- the property ---------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_order_gets_exactly_one_number_through_random_claims_commits_and_crashes(
        data: st.DataObject) -> None:
    """Submit, claim, commit and crash at random: each valid order ends with one invoice, numbers gap-free."""
    with tempfile.TemporaryDirectory() as directory:
        check_random_orders(Path(directory) / "p.db", data)


def check_random_orders(database: Path, data: st.DataObject) -> None:  # noqa: PLR0915  # one story
    submitted: list[int] = []
    invalid: set[int] = set()
    for _run in range(data.draw(st.integers(1, 4), label="runs")):
        store = Storage(database, synchronous="OFF")
        store.open()
        plan = store.recovery_plan()
        orders = OrderSource(store, plan.high_water, ByteBudget(data.draw(st.integers(200, 5000), label="b")),
                             check_order, max_order_bytes=LIMIT)
        owed: list[OrderChunk] = [item for numbers in plan.missing for item in orders.recover(numbers)
                                  if isinstance(item, OrderChunk)]
        assert sum(len(item) for item in owed) == plan.missing_total
        for _step in range(data.draw(st.integers(0, 10), label="steps")):
            action = data.draw(st.sampled_from(["submit", "take", "commit"]), label="action")
            if action == "submit":
                count = data.draw(st.integers(1, 6), label="count")
                bad = data.draw(st.lists(st.booleans(), min_size=count, max_size=count), label="bad")
                texts = ["{oops" if b else payload(len(submitted) + i) for i, b in enumerate(bad)]
                ids = submit(database, texts)
                submitted += ids
                invalid.update(order_id for order_id, b in zip(ids, bad, strict=True) if b)
            elif action == "take":
                chunk = orders.take(data.draw(st.integers(1, 5), label="limit"))
                if chunk is not None:
                    owed.append(chunk)
            elif owed:
                index = data.draw(st.integers(0, len(owed) - 1), label="which")
                chunk = owed.pop(index)
                cut = data.draw(st.integers(0, len(chunk)), label="cut")
                commit(store, [chunk[:cut]])
                if cut < len(chunk):
                    owed.append(chunk[cut:])
        if data.draw(st.booleans(), label="clean") and not owed:
            store.release(orders.last_issued)
        store.close()  # otherwise a crash: the claim and whatever is owed stay as they are
    # A last run recovers and claims everything: every valid order has exactly one invoice.
    store = Storage(database, synchronous="OFF")
    store.open()
    plan = store.recovery_plan()
    orders = OrderSource(store, plan.high_water, ByteBudget(1 << 30), check_order, max_order_bytes=LIMIT)
    final = [item for numbers in plan.missing for item in orders.recover(numbers)]
    while (chunk := orders.take(1000)) is not None:
        final.append(chunk)
    commit(store, [item for item in final if isinstance(item, OrderChunk)])
    store.close()
    with sqlite3.connect(database) as connection:
        invoices = dict(connection.execute("SELECT order_id, id FROM invoices WHERE order_id IS NOT NULL"))
        numbers = [row[0] for row in connection.execute("SELECT id FROM invoices ORDER BY id")]
        paired = dict(connection.execute("SELECT id, invoice_id FROM orders WHERE invoice_id IS NOT NULL"))
        rejected = {row[0] for row in connection.execute("SELECT id FROM orders WHERE rejected IS NOT NULL")}
    connection.close()
    valid = [order_id for order_id in submitted if order_id not in invalid]
    assert rejected == invalid
    assert sorted(invoices) == valid
    assert invoices == paired
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) == len(valid)
    # One instance: numbers follow submission order.
    assert [invoices[order_id] for order_id in valid] == sorted(invoices.values())


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as `invoicer submit` on an installed system")
def test_a_database_root_creates_belongs_to_its_directory_owner(tmp_path: Path) -> None:
    """Submitting as root into the daemon's directory must not leave it a file it cannot open."""
    directory = tmp_path / "state"
    directory.mkdir()
    os.chown(directory, 65534, 65534)
    submit_orders(directory / "invoices.db", [payload(1)])
    assert (os.stat(directory / "invoices.db").st_uid, os.stat(directory / "invoices.db").st_gid) == (
        65534, 65534)


def test_payloads_stored_as_blobs_with_nuls_or_not_utf8_are_judged_one_by_one(storage: Storage) -> None:
    """A BLOB of UTF-8 JSON is an order; a NUL or bad UTF-8 refuses that order only, never its neighbours."""
    muller = json.dumps({**demo_order(1), "customer": "Bäckerei Müller GmbH"}, ensure_ascii=False)
    with sqlite3.connect(storage.path) as connection:
        rows = [(payload(0),), (muller.encode(),), (payload(2) + "\0junk",), (b"{\xff}",),
                (payload(4).encode(),), (payload(5),)]
        connection.executemany("INSERT INTO orders (payload) VALUES (?)", rows)
    connection.close()
    chunk = source(storage).take(100)
    assert chunk is not None
    assert [request.order_id for request in chunk.requests] == [1, 2, 5, 6]
    assert chunk.requests[1].order["customer"] == "Bäckerei Müller GmbH"
    assert chunk.requests[2].order == json.loads(payload(4))
    reasons = {order_id: reason for order_id, _, reason in storage.rejected_orders()}
    assert reasons[3].startswith("malformed JSON")
    assert reasons[4] == "payload is not UTF-8 text (invalid start byte at byte 1)"
    commit(storage, [chunk])
    plan = storage.recovery_plan()
    assert plan.missing == ()


def test_a_paired_blob_order_is_recovered(storage: Storage) -> None:
    with sqlite3.connect(storage.path) as connection:
        connection.execute("INSERT INTO orders (payload) VALUES (?)", (payload(1).encode(),))
    connection.close()
    assert source(storage).take(1) is not None  # crash before its invoice is stored
    (chunk,) = source(storage).recover(range(1, 2))
    assert isinstance(chunk, OrderChunk)
    assert chunk.requests[0].order == json.loads(payload(1))


def test_an_order_id_is_never_used_twice(storage: Storage) -> None:
    """A waiting order deleted while a claim reads it cannot come back as another order under its id."""
    _first, second = submit(storage.path, [payload(1), payload(2)])
    with sqlite3.connect(storage.path) as connection:
        connection.execute("DELETE FROM orders WHERE id = ?", (second,))
    connection.close()
    (third,) = submit(storage.path, [payload(3)])
    assert third == second + 1


def test_a_claim_reads_the_orders_that_begin_within_the_room(storage: Storage) -> None:
    submit(storage.path, [payload(1)] * 6)
    size = len(payload(1))
    waiting = storage.waiting_orders(100, LIMIT, room=2 * size + 1)
    assert [order_id for order_id, _, _ in waiting] == [1, 2, 3]  # the third begins within the room
    assert all(text == payload(1).encode() for _, text, _ in waiting)


def test_an_order_over_the_size_limit_is_refused_even_when_the_budget_is_full(storage: Storage) -> None:
    budget = ByteBudget(1000)
    budget.take(1000)  # everything in flight
    submit(storage.path, [json.dumps({**demo_order(1), "metadata": {"x": "y" * 3000}})])
    orders = OrderSource(storage, 0, budget, check_order, max_order_bytes=2048)
    budget.used = 999  # one byte of room: the claim runs, and the big order takes none of it
    assert orders.take(10) is None
    assert storage.rejected_orders()[0][2].startswith("order is 3,")


def test_submit_reads_a_line_only_up_to_the_limit_and_skips_a_bom() -> None:
    stream = io.BytesIO(codecs.BOM_UTF8 + payload(1).encode() + b"\n" + b"[" * 5000 + b"\n")
    with pytest.raises(SubmitError, match=r"^f, line 2: order is over the limit of 1,024 bytes$"):
        read_orders(stream, "f", check_order, 1024)
    assert read_orders(io.BytesIO(codecs.BOM_UTF8 + payload(1).encode()), "f", check_order, 1024) == [
        payload(1)]


def test_rejected_on_a_database_from_before_orders_says_so(tmp_path: Path) -> None:
    database = tmp_path / "old.db"
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE sequence (id INTEGER PRIMARY KEY)")
    connection.close()
    old = Storage(database)
    old.open_shared()
    try:
        with pytest.raises(StorageError, match="has no orders table yet"):
            old.rejected_orders()
    finally:
        old.close()


def test_an_order_waiting_for_room_costs_no_claim_transaction(storage: Storage) -> None:
    """The next order does not fit the budget yet: the claim waits for room instead of an empty commit."""
    submit(storage.path, [payload(1)])
    budget = ByteBudget(len(payload(1)) + 10)
    budget.take(20)  # something else in flight: the order does not fit beside it
    orders = OrderSource(storage, 0, budget, check_order, max_order_bytes=LIMIT)
    claims = []
    claim = storage.claim_orders

    def counted(*args: Any) -> tuple[int, int]:
        claims.append(args)
        return claim(*args)

    storage.claim_orders = counted  # type: ignore[method-assign,assignment]
    threading.Timer(0.05, budget.give_back, (20,)).start()  # the commit that makes room
    assert orders.take(10) is None  # woken by the room, not by a poll: nothing claimed yet
    assert claims == []
    chunk = orders.take(10)
    assert chunk is not None
    assert len(claims) == 1
