"""Producer and consumer pool on real queues: order, back-pressure, bad invoices, give-back."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest

from invoicer import pipeline
from invoicer.gate import SAMPLES
from invoicer.generator import InvoiceNumberGenerator
from invoicer.intake import DemoSource, OrderChunk
from invoicer.orders import demo_order
from invoicer.outage import OutageBreaker
from invoicer.pipeline import ConsumerPool, Part, Producer, chunk_for, consumers, invoice_row, max_chunk
from invoicer.pipeline.consumers import LONG_CALL_S
from invoicer.processing import Invoice, InvoiceRequest, build_invoice, sample_invoice
from invoicer.storage import Batch, Row
from invoicer.workqueue import WorkQueue
from tests.test_generator import CountingReserver


def test_largest_chunk_keeps_several_in_the_queue() -> None:
    """Chunks are at most MAX_CHUNK and never larger than an eighth of the queue (but at least 1)."""
    assert max_chunk(1) == 1
    assert max_chunk(80) == 10
    assert max_chunk(10**6) == pipeline.MAX_CHUNK


@pytest.mark.parametrize(("seconds", "expected"), [
    (0.0, 1), (0.00001, 64), (0.001, 50), (0.005, 10), (0.1, 1), (30.0, 1)])
def test_chunk_follows_the_invoice_time(seconds: float, expected: int) -> None:
    """A chunk is about CHUNK_TARGET_S of work: 64 fast invoices, or one slow (or not yet timed) one."""
    assert chunk_for(seconds, 64) == expected


def test_producer_sends_recovered_numbers_first_then_new_ones() -> None:
    """Recovered numbers go on the queue before any new number, each exactly once."""
    work = WorkQueue(100)
    generator = InvoiceNumberGenerator(CountingReserver(10), 10, block_size=4)
    producer = Producer(DemoSource(generator), work, [range(3, 4), range(7, 8), range(9, 10)], lambda: 2,
                        lambda *_: None, breaker=OutageBreaker())
    producer.start()
    seen: list[int] = []
    while len(seen) < 12:
        item = work.get()
        assert item is not None
        seen.extend(item)
    producer.stop()
    assert producer.join(5)
    assert seen[:3] == [3, 7, 9]
    assert seen[3:12] == list(range(11, 20))


def test_producer_blocks_on_a_full_queue_and_gives_back_on_stop() -> None:
    """Back-pressure: a full queue blocks the producer; stopping gives the unqueued chunk back."""
    work = WorkQueue(10)
    generator = InvoiceNumberGenerator(CountingReserver(), 0, block_size=100)
    took: list[int] = []

    def chunk() -> int:  # the producer asks before each chunk; the third ask means two are queued
        took.append(5)
        if len(took) == 3:
            producer.stop()
        return 5

    producer = Producer(DemoSource(generator), work, [], chunk, lambda *_: None, breaker=OutageBreaker())
    producer.start()
    assert producer.join(5)
    assert work.depth() == 10
    assert producer.queued_total == 10
    assert generator.last_issued == 10  # the blocked third chunk (11..15) was given back


def build(request: InvoiceRequest) -> Invoice:
    """The built-in processor's invoice for the request's order, without the wait."""
    return build_invoice(request.number, request.order)


def run_pool(processor: Callable[[InvoiceRequest], Any], numbers: Sequence[int], workers: int = 3
             ) -> dict[int, Row]:
    """Push ``numbers`` through a real ConsumerPool and return the rows it produced, by number."""
    work = WorkQueue(len(numbers))
    results: queue.Queue[Part] = queue.Queue()
    fatal: list[BaseException] = []
    pool = ConsumerPool(processor, work, results, workers, lambda _w, exc: fatal.append(exc))
    pool.start()
    for start in range(0, len(numbers), 4):
        assert work.put(numbers[start:start + 4])
    pool.retire_all()
    assert pool.join(30)
    assert fatal == []
    out: dict[int, Row] = {}
    while not results.empty():
        part = results.get_nowait()
        part_rows = part.batch.rows()
        assert sorted(row[0] for row in part_rows) == list(part.numbers)  # one row per number of the part
        for row in part_rows:
            assert row[0] not in out
            out[row[0]] = row
    return out


def test_pool_processes_every_number_once() -> None:
    """Every queued number comes back as exactly one 'ok' row: a bare number's demo invoice, no order."""
    rows = run_pool(build, list(range(1, 101)))
    assert sorted(rows) == list(range(1, 101))
    assert {row[1] for row in rows.values()} == {"ok"}
    assert all(rows[n] == invoice_row(n, sample_invoice(n), 1) for n in rows)


def order_chunk(numbers: range) -> OrderChunk:
    """A chunk of claimed orders: order ``100 + n`` for number ``n``, each with its own customer."""
    requests = [InvoiceRequest(n, 100 + n, dict(demo_order(n), customer=f"Customer {n}")) for n in numbers]
    return OrderChunk(numbers, requests, [10] * len(numbers))


def test_a_chunk_of_orders_reaches_the_processor_as_its_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each number of an order chunk is processed with its own request; every row carries its order id."""
    monkeypatch.setattr(pipeline, "RETRY_BACKOFF_S", 0.0)
    chunk = order_chunk(range(1, 9))
    seen: dict[int, InvoiceRequest] = {}

    def poison_five(request: InvoiceRequest) -> object:
        seen[request.number] = request
        if request.number == 5:
            raise ValueError("bad order")
        return build(request)

    rows = run_pool(poison_five, chunk)
    assert all(seen[n] is request for n, request in zip(chunk, chunk.requests, strict=True))
    for n in (1, 2, 3, 4, 6, 7, 8):
        assert rows[n] == invoice_row(n, build_invoice(n, chunk.requests[n - 1].order), 1, 100 + n)
        assert rows[n][2] == f"Customer {n}"
    assert (rows[5][1], rows[5][8], rows[5][10]) == ("failed", "ValueError: bad order", 105)


def test_failing_invoice_is_retried_then_stored_as_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invoice that always raises is tried MAX_ATTEMPTS times, then becomes a 'failed' row."""
    monkeypatch.setattr(pipeline, "RETRY_BACKOFF_S", 0.0)
    calls: dict[int, int] = {}
    lock = threading.Lock()

    def poison_three(request: InvoiceRequest) -> object:
        with lock:
            calls[request.number] = calls.get(request.number, 0) + 1
        if request.number == 3:
            raise ConnectionError("tax authority unreachable")
        return build(request)

    rows = run_pool(poison_three, [1, 2, 3, 4])
    assert calls[3] == pipeline.MAX_ATTEMPTS
    assert rows[3][1] == "failed"
    assert rows[3][8] == "ConnectionError: tax authority unreachable"
    assert rows[3][9] == pipeline.MAX_ATTEMPTS
    assert [rows[n][1] for n in (1, 2, 4)] == ["ok", "ok", "ok"]


def test_transient_failure_succeeds_on_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """An invoice that fails once and then works is stored 'ok' with attempts = 2."""
    monkeypatch.setattr(pipeline, "RETRY_BACKOFF_S", 0.0)
    failed_once: set[int] = set()

    def flaky(request: InvoiceRequest) -> object:
        if request.number not in failed_once:
            failed_once.add(request.number)
            raise TimeoutError("slow")
        return build(request)

    rows = run_pool(flaky, [5], workers=1)
    assert rows[5][1] == "ok"
    assert rows[5][9] == 2


GARBAGE = [
    ("not-an-invoice", {"id": 1}),
    ("wrong-id", sample_invoice(2)),
    ("customer-not-str", dataclasses.replace(sample_invoice(1), customer=42)),  # type: ignore[arg-type]
    ("total-not-decimal", dataclasses.replace(sample_invoice(1), total=1.5)),  # type: ignore[arg-type]
    ("none", None),
]


@pytest.mark.parametrize("garbage", [g for _, g in GARBAGE], ids=[name for name, _ in GARBAGE])
def test_garbage_from_a_processor_is_refused(garbage: object) -> None:
    """invoice_row refuses anything but a well-typed Invoice for the requested number."""
    with pytest.raises(ValueError, match="processor returned"):
        invoice_row(1, garbage, 1)


def test_valid_invoice_becomes_a_row() -> None:
    """A good Invoice turns into an 'ok' row with exact decimal text, and its order's id (None: demo)."""
    row = invoice_row(7, sample_invoice(7), 1)
    assert row[:2] == (7, "ok")
    assert Decimal(row[6] or "") == sample_invoice(7).total
    assert (len(row), row[10], invoice_row(7, sample_invoice(7), 1, 70)[10]) == (11, None, 70)


def test_slow_invoices_reach_the_writer_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished row is handed to the writer while the rest of its chunk is still being processed."""
    monkeypatch.setattr(consumers, "HANDOFF_S", 0.0)
    release = threading.Event()

    def blocks_on_two(request: InvoiceRequest) -> object:
        if request.number == 2:
            release.wait(30)
        return build(request)

    work = WorkQueue(10)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(blocks_on_two, work, results, 1, lambda *_: None)
    pool.start()
    work.put([1, 2])
    first = results.get(timeout=10)
    assert (list(first.numbers), [row[0] for row in first.batch.rows()]) == ([1], [1])
    assert not release.is_set()
    release.set()
    second = results.get(timeout=10)
    assert (list(second.numbers), [row[0] for row in second.batch.rows()]) == ([2], [2])
    work.put_sentinel()
    assert pool.join(10)


@pytest.mark.parametrize("pinned", [True, False])
def test_consumers_run_on_the_cpu_they_are_pinned_to(pinned: bool) -> None:
    """Every consumer thread runs on the pool's CPU; other threads keep the process's CPUs."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed) if pinned else None
    seen: list[set[int]] = []

    def records_affinity(request: InvoiceRequest) -> object:
        seen.append(os.sched_getaffinity(0))
        return build(request)

    work = WorkQueue(100)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(records_affinity, work, results, 4, lambda *_: None, cpu=cpu)
    pool.start()
    for start in range(1, 41, 4):
        work.put(range(start, start + 4))
    pool.retire_all()
    assert pool.join(30)
    assert len(seen) == 40
    assert all(cpus == ({cpu} if pinned else allowed) for cpus in seen)
    assert os.sched_getaffinity(0) == allowed  # the main thread is not pinned with them


def test_a_cpu_taken_away_leaves_consumers_unpinned(caplog: pytest.LogCaptureFixture) -> None:
    """A CPU the pool cannot use (here: one that does not exist) is logged once; every number is processed."""
    absent = max(os.sched_getaffinity(0)) + 1
    work = WorkQueue(100)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(build, work, results, 3, lambda *_: None, cpu=absent)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        pool.start()
        work.put(range(1, 31))
        pool.retire_all()
        assert pool.join(30)
    assert pool.cpu is None
    warnings = [r.getMessage() for r in caplog.records if "not pinned" in r.getMessage()]
    assert len(warnings) == 1
    assert f"CPU {absent} cannot be used" in warnings[0]
    assert sum(len(results.get_nowait().numbers) for _ in range(results.qsize())) == 30


def test_resize_grows_and_shrinks_without_losing_numbers() -> None:
    """Growing starts loops, shrinking retires them after queued work; every number still comes back."""
    work = WorkQueue(1000)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(build, work, results, 2, lambda *_: None)
    pool.start()
    for start in range(1, 301, 10):
        work.put(list(range(start, start + 10)))
    pool.resize(5)
    assert pool.workers == 5
    for start in range(301, 601, 10):
        work.put(list(range(start, start + 10)))
    pool.resize(1)
    assert pool.workers == 1
    for start in range(601, 901, 10):
        work.put(list(range(start, start + 10)))
    pool.retire_all()
    assert pool.join(30)
    seen: list[int] = []
    while not results.empty():
        seen.extend(row[0] for row in results.get_nowait().batch.rows())
    assert sorted(seen) == list(range(1, 901))


def hung_pool(hang: set[int], workers: int, *, timeout: float = 5.0
              ) -> tuple[ConsumerPool, WorkQueue, queue.Queue[Part], threading.Event, list[int]]:
    """A pool whose processor blocks on the numbers in ``hang`` until the returned event is set."""
    release = threading.Event()
    entered: list[int] = []

    def processor(request: InvoiceRequest) -> object:
        if request.number in hang:
            entered.append(request.number)
            release.wait(60)
        return build(request)

    work = WorkQueue(100)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(processor, work, results, workers, lambda *_: None, timeout=timeout)
    pool.start()
    return pool, work, results, release, entered


def wait_entered(entered: list[int], count: int) -> None:
    """Block until ``count`` hung calls have begun (the calls record themselves)."""
    deadline = time.monotonic() + 10
    while len(entered) < count:  # the processor's own list: polled, as the pool offers no event for it
        assert time.monotonic() < deadline, entered
        time.sleep(0.005)


def collect(results: queue.Queue[Part], count: int) -> dict[int, Row]:
    """Take parts until ``count`` rows arrived; return them by number (each number once)."""
    rows: dict[int, Row] = {}
    while len(rows) < count:
        for row in results.get(timeout=10).batch.rows():
            assert row[0] not in rows
            rows[row[0]] = row
    return rows


def test_a_call_past_its_deadline_is_given_up_and_the_rest_goes_on() -> None:
    """A hung call is stored failed (timed out), the rest of its chunk processed, the pool keeps its size."""
    pool, work, results, release, entered = hung_pool({3}, workers=1, timeout=5.0)
    work.put(range(1, 9))
    wait_entered(entered, 1)
    pool.reap(time.monotonic() + 4.9)  # not yet past the deadline: nothing happens
    assert pool.abandoned == 0
    pool.reap(time.monotonic() + 5.1)
    rows = collect(results, 8)
    assert sorted(rows) == list(range(1, 9))
    assert rows[3][1] == "failed"
    assert "did not return within 5s" in (rows[3][8] or "")
    assert all(rows[n][1] == "ok" for n in (1, 2, 4, 5, 6, 7, 8))
    assert (pool.abandoned, pool.workers, pool.timed_out_total) == (1, 1, 1)
    release.set()  # the stuck call returns at last: its result is discarded, no second row
    work.put_sentinel()
    assert pool.join(10)
    deadline = time.monotonic() + 10
    while pool.abandoned:  # the released thread's own bookkeeping: polled, it signals nothing
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert results.empty()


def test_a_call_given_up_in_a_chunk_of_orders_keeps_its_order_id() -> None:
    """A hung call on a claimed order is stored failed with that order's id; the others with theirs."""
    pool, work, results, release, entered = hung_pool({3}, workers=1, timeout=5.0)
    work.put(order_chunk(range(1, 6)))
    wait_entered(entered, 1)
    pool.reap(time.monotonic() + 5.1)
    rows = collect(results, 5)
    assert (rows[3][1], rows[3][10]) == ("failed", 103)
    assert "did not return within 5s" in (rows[3][8] or "")
    assert [(rows[n][1], rows[n][10]) for n in (1, 2, 4, 5)] == [("ok", 100 + n) for n in (1, 2, 4, 5)]
    release.set()
    work.put_sentinel()
    assert pool.join(10)


def test_hung_calls_do_not_hold_gate_places() -> None:
    """With the gate admitting one consumer, long calls are lent places, so the other work still flows."""
    pool, work, results, release, entered = hung_pool({1, 2}, workers=4, timeout=60.0)
    for _ in range(SAMPLES):  # CPU-bound measurements: the gate admits one consumer at a time
        pool.gate.report(1.0, 1.0)
    assert pool.gate.limit == 1
    work.put([1])
    wait_entered(entered, 1)
    work.put([2])
    work.put(range(3, 11))
    pool.reap(time.monotonic() + LONG_CALL_S)  # call 1 runs long: a place is lent
    wait_entered(entered, 2)
    pool.reap(time.monotonic() + LONG_CALL_S)  # both run long: two places lent
    assert sorted(collect(results, 8)) == list(range(3, 11))
    release.set()
    pool.retire_all()
    assert pool.join(10)
    assert sorted(collect(results, 2)) == [1, 2]


def test_more_hung_calls_than_workers_make_a_sick_pool() -> None:
    """Beyond `workers` abandoned calls no fresh loop is started; one comes back when a call returns."""
    pool, work, results, release, entered = hung_pool({1, 2, 3}, workers=2, timeout=1.0)
    work.put([1])
    work.put([2])
    wait_entered(entered, 2)
    pool.reap(time.monotonic() + 2)
    work.put([3])
    wait_entered(entered, 3)
    pool.reap(time.monotonic() + 2)
    assert pool.abandoned == 3
    assert pool.calls() == 0  # nobody is left to call: the pool is sick
    assert pool.breaker.paused  # every invoice in flight hung: an outage, so none is stored as failed
    work.put(range(4, 7))
    release.set()
    rows = collect(results, 6)
    assert [rows[n][1] for n in range(1, 7)] == ["ok"] * 6  # the given-up ones went round
    pool.retire_all()
    assert pool.join(10)


def test_with_one_worker_a_second_hung_invoice_makes_an_outage() -> None:
    """One invoice in flight: the first hung call is stored as failed, the second pauses intake instead."""
    pool, work, results, release, entered = hung_pool({1, 2}, workers=1, timeout=1.0)
    work.put([1])
    wait_entered(entered, 1)
    pool.reap(time.monotonic() + 2)
    assert not pool.breaker.paused  # one invoice hung: it could be a bad one
    work.put([2])
    wait_entered(entered, 2)
    pool.reap(time.monotonic() + 2)
    assert pool.breaker.paused  # a second one, while it is all that is in flight: the service hangs
    release.set()
    work.put([3])
    rows = collect(results, 3)
    assert [rows[n][1] for n in (1, 2, 3)] == ["failed", "ok", "ok"]  # 2 went round, not failed
    pool.retire_all()
    assert pool.join(10)


def test_a_retry_backoff_holds_no_gate_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a poison invoice sleeps between attempts, another consumer takes the one gate place."""
    monkeypatch.setattr(pipeline, "RETRY_BACKOFF_S", 0.2)

    def poison_one(request: InvoiceRequest) -> object:
        if request.number == 1:
            raise ValueError("bad order")
        return build(request)

    work = WorkQueue(100)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(poison_one, work, results, 2, lambda *_: None)
    for _ in range(SAMPLES):
        pool.gate.report(1.0, 1.0)
    assert pool.gate.limit == 1
    pool.start()
    work.put([1])
    work.put(range(2, 11))
    arrived = [row[0] for _ in range(2) for row in results.get(timeout=10).batch.rows()]
    assert arrived == [*range(2, 11), 1]  # the others went on during the backoff; 1 failed last
    pool.retire_all()
    assert pool.join(10)


def test_calls_that_all_hang_at_once_are_an_outage_not_failed_invoices() -> None:
    """Hung calls given up together (one per worker) pause intake: their numbers go round, none fails."""
    pool, work, results, release, entered = hung_pool({1, 2, 3, 4, 5}, workers=5, timeout=1.0)
    for number in range(1, 6):
        work.put([number])
    wait_entered(entered, 5)
    pool.reap(time.monotonic() + 1.5)
    assert pool.breaker.paused
    assert results.empty()
    release.set()  # the service answers again: the next probe succeeds and everything resumes
    rows = collect(results, 5)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    assert all(row[1] == "ok" for row in rows.values())
    assert not pool.breaker.paused
    pool.retire_all()
    assert pool.join(10)


def test_a_smaller_pool_still_counts_hung_calls_against_its_largest_size() -> None:
    """Shrinking by reload does not turn calls hung earlier into 'more hung than workers'."""
    pool = ConsumerPool(build, WorkQueue(10), queue.Queue(), 8, lambda *_: None)
    pool.start()
    pool.resize(2)
    assert (pool.workers, pool.most_workers) == (2, 8)
    pool.retire_all()
    assert pool.join(10)


def test_closing_does_not_block_on_a_full_results_queue() -> None:
    """close() hands over what given-up calls left within its timeout, or says it could not yet."""
    pool, work, _results, release, entered = hung_pool({1}, workers=1, timeout=1.0)
    full: queue.Queue[Part] = queue.Queue(maxsize=1)
    full.put(Part(range(0), Batch()))
    pool._results = full  # the writer has stopped taking parts (a stalled disk)
    work.put([1])
    wait_entered(entered, 1)
    pool.reap(time.monotonic() + 2)
    work.put_sentinel()
    assert pool.join(10)
    assert pool.close(0.05) is False
    full.get_nowait()
    assert pool.close(0.05) is True
    release.set()


def test_finished_rows_are_handed_over_before_an_outage_wait() -> None:
    """A consumer that must wait for a paused service first hands the writer what it has finished."""
    down = threading.Event()

    def service(request: InvoiceRequest) -> object:
        if request.number >= 4 and down.is_set():
            raise ConnectionError("refused")
        return build(request)

    work = WorkQueue(100)
    results: queue.Queue[Part] = queue.Queue()
    pool = ConsumerPool(service, work, results, 5, lambda *_: None)
    down.set()
    pool.start()
    # One consumer takes the chunk: 1-3 succeed; 4 fails its attempts (one invoice in flight: it could be
    # a bad order), and 5, the second different invoice failing while it is all that is in flight, makes
    # it an outage.
    work.put(range(1, 10))
    rows = collect(results, 4)  # handed over while the service is still down
    assert [rows[n][1] for n in range(1, 5)] == ["ok"] * 3 + ["failed"]
    assert pool.breaker.paused
    down.clear()
    rows = collect(results, 5)
    assert [rows[n][1] for n in range(5, 10)] == ["ok"] * 5
    pool.retire_all()
    assert pool.join(10)
