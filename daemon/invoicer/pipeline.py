"""The moving parts: the producer, the consumer pool and the storage writer.

Each owns its thread(s): built without side effects, ``start()`` starts, ``stop()`` asks to stop,
``join(timeout)`` waits. Invoice numbers travel through the bounded work queue in small chunks so the
per-invoice cost of queueing stays far below the cost of processing one invoice.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import heapq
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from invoicer.config import MAX_WORKERS
from invoicer.gate import ConcurrencyGate
from invoicer.generator import InvoiceNumberGenerator
from invoicer.processing import Invoice
from invoicer.storage import Batch, OkValues, RecoveryPlan, Row, Storage
from invoicer.workqueue import Chunk, WorkQueue

log = logging.getLogger("invoicer")

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05          # doubled after each failed attempt
MAX_CHUNK = 64                  # invoice numbers per work-queue item, at most
# ... and about this much processing: slow invoices travel one by one. Every chunk costs a wake-up of
# the producer and a part for the writer; at 128 workers, 5 ms an invoice, 50 ms chunks (10 numbers)
# ran at 1.09 x the throughput of 20 ms ones (4 numbers; paired rounds), 100 ms ones gained nothing more.
CHUNK_TARGET_S = 0.05
WRITER_BATCH = 2048             # rows per transaction at most
POLL_S = 0.1                    # how often a blocked put re-checks its stop event
# Parts the results queue holds beyond two per worker: room for two full writer batches. While the
# writer waits for the GIL between its SQLite calls, consumers must not block on a full results queue,
# or the one core that runs Python idles.
RESULTS_ROOM = 2 * WRITER_BATCH // MAX_CHUNK
CPU_SAMPLE_EVERY = 4            # chunks per CPU-share sample for the concurrency gate
HANDOFF_S = 0.1                 # a consumer hands finished rows to the writer at least this often (twice
                                # a chunk's planned time), so slow invoices still commit (and feed the
                                # watchdog) one by one

FatalHandler = Callable[[str, BaseException], None]


def max_chunk(queue_size: int) -> int:
    """Return the largest chunk for a queue of ``queue_size`` numbers: it still holds several chunks."""
    return max(1, min(MAX_CHUNK, queue_size // 8))


def chunk_for(invoice_seconds: float, largest: int) -> int:
    """Numbers per chunk so that one chunk is about CHUNK_TARGET_S of processing (1..largest).

    Small chunks keep the drain and the commit latency short when invoices are slow; large ones keep
    the queueing cost per invoice small when they are fast.
    """
    if invoice_seconds <= 0:
        return largest
    return max(1, min(largest, int(CHUNK_TARGET_S / invoice_seconds)))


class Producer:
    """One thread: recovered numbers first, then new ones, onto the bounded work queue (back-pressure)."""

    def __init__(self, generator: InvoiceNumberGenerator, work: WorkQueue, recovered: Sequence[int],
                 chunk: Callable[[], int], on_fatal: FatalHandler) -> None:
        self._generator = generator
        self._work = work
        self._recovered = recovered
        self._chunk = chunk  # asked before each chunk: the size follows the measured invoice time
        self._on_fatal = on_fatal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-producer", daemon=True)
        self.queued_total = 0            # numbers put on the queue; written by the producer thread only

    def start(self) -> None:
        """Start producing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop taking new numbers; a chunk it could not queue is given back, never dropped.

        The recovered backlog (at most one reserved block plus what was in flight) is still queued, so a
        clean stop owes nothing.
        """
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            position = 0
            while position < len(self._recovered):
                chunk = self._recovered[position:position + self._chunk()]
                self._put(chunk, until_stopped=False)
                position += len(chunk)
            while not self._stop.is_set():
                numbers = self._generator.take(self._chunk())
                if not self._put(numbers):
                    self._generator.give_back(numbers)
                    return
        except BaseException as exc:  # a broken producer must end the process loudly
            self._on_fatal("producer", exc)

    def _put(self, chunk: Chunk, *, until_stopped: bool = True) -> bool:
        while not self._work.put(chunk, timeout=POLL_S):
            if until_stopped and self._stop.is_set():
                return False
        self.queued_total += len(chunk)
        return True


def invoice_values(invoice_id: int, invoice: Any, attempts: int) -> OkValues:
    """Check what a processor returned; return its OK_WIDTH stored values. ValueError if it is unusable."""
    if not isinstance(invoice, Invoice):
        raise ValueError(f"processor returned {type(invoice).__name__}, expected Invoice")
    customer, currency, document = invoice.customer, invoice.currency, invoice.document
    subtotal, tax, total = invoice.subtotal, invoice.tax, invoice.total
    # One combined test on the hot path; the loop below only runs to name what is wrong.
    if not (invoice.id == invoice_id and type(customer) is str and type(currency) is str
            and type(document) is str and type(subtotal) is Decimal and type(tax) is Decimal
            and type(total) is Decimal):
        _explain_bad_invoice(invoice_id, invoice)
    return invoice_id, customer, currency, str(subtotal), str(tax), str(total), document, attempts


def invoice_row(invoice_id: int, invoice: Any, attempts: int) -> Row:
    """Check what a processor returned and turn it into a table row; ValueError if it is not usable."""
    number, customer, currency, subtotal, tax, total, document, _ = invoice_values(
        invoice_id, invoice, attempts)
    return number, "ok", customer, currency, subtotal, tax, total, document, None, attempts


def _explain_bad_invoice(invoice_id: int, invoice: Invoice) -> None:
    if invoice.id != invoice_id:
        raise ValueError(f"processor returned invoice {invoice.id!r} for number {invoice_id}")
    for name in ("customer", "currency", "document"):
        if not isinstance(getattr(invoice, name), str):
            raise ValueError(f"processor returned an Invoice whose {name} is not a str")
    for name in ("subtotal", "tax", "total"):
        if not isinstance(getattr(invoice, name), Decimal):
            raise ValueError(f"processor returned an Invoice whose {name} is not a Decimal")


def failed_row(invoice_id: int, exc: BaseException, attempts: int) -> Row:
    """Build the row that records an invoice which kept failing, so the numbering stays gap-free."""
    return (invoice_id, "failed", None, None, None, None, None, None,
            f"{type(exc).__name__}: {exc}"[:2000], attempts)


def process_with_retries(processor: Callable[[int], Any], invoice_id: int, worker: int | str) -> Row:
    """Call the processor, retrying with backoff; an invoice that keeps failing becomes a failed row."""
    try:
        return invoice_row(invoice_id, processor(invoice_id), 1)
    except Exception as exc:  # one bad invoice never kills the pool
        return retry(processor, invoice_id, worker, exc)


def retry(processor: Callable[[int], Any], invoice_id: int, worker: int | str, exc: Exception) -> Row:
    """Go on after a first attempt failed with ``exc``: retry with backoff, up to MAX_ATTEMPTS in all."""
    attempt = 1
    while True:
        context = {"invoice": invoice_id, "worker": worker, "attempt": attempt}
        if attempt >= MAX_ATTEMPTS:
            log.error("invoice %d failed %d times; stored as failed", invoice_id, attempt,
                      exc_info=exc, extra=context)
            return failed_row(invoice_id, exc, attempt)
        log.warning("invoice %d failed (attempt %d of %d); retrying", invoice_id, attempt, MAX_ATTEMPTS,
                    exc_info=exc, extra=context)
        time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
        attempt += 1
        try:
            return invoice_row(invoice_id, processor(invoice_id), attempt)
        except Exception as error:  # one bad invoice never kills the pool
            exc = error


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """What a consumer hands the writer: ``numbers``, a slice of its chunk in order, and their rows.

    Every number gets a row in ``batch``: processed invoices as flat values, failed ones as full rows.
    """

    numbers: Chunk
    batch: Batch


WAKE_UP = Part(range(0), Batch())  # the empty part StorageWriter.stop() sends


class ConsumerPool:
    """``workers`` consumers in a ThreadPoolExecutor: process each number, hand rows to the writer."""

    def __init__(self, processor: Callable[[int], Any], work: WorkQueue,
                 results: queue.Queue[Part], workers: int, on_fatal: FatalHandler,
                 *, cpu: int | None = None) -> None:
        self._processor = processor
        self._work = work
        self._results = results
        self._on_fatal = on_fatal
        # The executor's ceiling is the configuration's; it starts threads only as loops are submitted.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=MAX_WORKERS, thread_name_prefix="invoicer-consumer")
        # Rule: _lock guards _futures and workers (the loops not yet asked to retire); only the main
        # thread changes them, others may read.
        self._lock = threading.Lock()
        self._futures: list[concurrent.futures.Future[None]] = []
        self.workers = workers
        # Seconds one invoice takes, a moving average; written by consumers (a float store is atomic
        # under the GIL), read by the producer to size chunks.
        self.invoice_seconds = 0.0
        self.gate = ConcurrencyGate(workers)  # how many loops process at once (CPU-bound work: few)
        # The CPU every consumer thread is pinned to (None: not pinned). Only one of them runs Python at
        # a time, and handing the GIL to a thread on the same CPU is a plain context switch rather than
        # a wake-up on another CPU; the writer (whose SQLite work runs outside the GIL) and the producer
        # keep the other CPUs. Set to None by the first loop that finds the CPU unusable.
        self.cpu = cpu
        self._pin_lock = threading.Lock()  # Rule: guards the change of cpu to None, and its warning

    def start(self) -> None:
        """Start ``workers`` consumer loops."""
        with self._lock:
            for _ in range(self.workers):
                self._futures.append(self._executor.submit(self._consume, len(self._futures)))

    def resize(self, workers: int) -> None:
        """Grow by starting loops, or shrink by queueing one retirement sentinel per surplus loop.

        A retiring loop finishes the chunk it holds first, and the sentinel queues behind the work
        already waiting, so no number is dropped or handed to two loops.
        """
        with self._lock:
            for _ in range(self.workers, workers):
                self._futures.append(self._executor.submit(self._consume, len(self._futures)))
            surplus = self.workers - workers
            self.workers = workers
        self.gate.resize(workers)
        for _ in range(surplus):
            self._work.put_sentinel()

    def retire_all(self) -> None:
        """Queue one retirement sentinel per running loop (after the producer stopped)."""
        with self._lock:
            count = self.workers
        for _ in range(count):
            self._work.put_sentinel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every consumer loop to end; True once they all have."""
        with self._lock:
            futures = list(self._futures)
        _done, pending = concurrent.futures.wait(futures, timeout)
        if pending:
            return False
        self._executor.shutdown(wait=True)
        return True

    def _consume(self, worker: int) -> None:
        gate = self.gate
        chunks = 0
        try:
            self._pin()
            gate.acquire()
            try:
                while (chunk := self._work.get()) is not None:
                    chunks += 1
                    # The thread CPU clock is a system call: sample one chunk in CPU_SAMPLE_EVERY.
                    sampled = chunks % CPU_SAMPLE_EVERY == 0
                    cpu_started = time.thread_time() if sampled else 0.0
                    started = time.monotonic()
                    self._process_chunk(chunk, worker)
                    wall = time.monotonic() - started
                    self.invoice_seconds += (wall / len(chunk) - self.invoice_seconds) * 0.2
                    cpu = time.thread_time() - cpu_started if sampled else 0.0
                    if gate.report(cpu, wall if sampled else 0.0):  # the limit fell: queue up again
                        gate.acquire()
            finally:
                gate.release()
        except BaseException as exc:  # a broken loop (not a broken invoice) ends the process loudly
            self._on_fatal(f"consumer {worker}", exc)

    def _pin(self) -> None:
        cpu = self.cpu
        if cpu is None:
            return
        try:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread only
        except OSError as exc:  # e.g. the cgroup's cpuset lost that CPU after start-up
            with self._pin_lock:
                first, self.cpu = self.cpu is not None, None
            if first:
                log.warning("consumer threads are not pinned: CPU %d cannot be used (%s)", cpu,
                            exc.strerror, extra={"cpu": cpu})

    def _process_chunk(self, chunk: Chunk, worker: int) -> None:
        processor = self._processor
        ok: list[object] = []
        failed: list[Row] = []
        start = done = 0
        handed_at = time.monotonic()
        for number in chunk:
            try:
                ok += invoice_values(number, processor(number), 1)
            except Exception as exc:  # one bad invoice never kills the pool
                retried = Batch.of([retry(processor, number, worker, exc)])
                ok += retried.ok
                failed += retried.failed
            done += 1
            if (now := time.monotonic()) - handed_at >= HANDOFF_S:
                self._results.put(Part(chunk[start:done], Batch(ok, failed)))
                ok, failed, start, handed_at = [], [], done, now
        if done > start:
            self._results.put(Part(chunk[start:done], Batch(ok, failed)))


class StorageWriter:
    """One thread: collects rows from the consumers and commits them in batches (group commit).

    It also keeps ``stored_through`` - the highest number below which everything is stored - and saves
    it with each batch, which is what keeps recovery from scanning the whole table.
    """

    def __init__(self, storage: Storage, results: queue.Queue[Part], plan: RecoveryPlan,
                 on_fatal: FatalHandler, batch_size: int = WRITER_BATCH) -> None:
        self._storage = storage
        self._results = results
        self._on_fatal = on_fatal
        self._batch_size = batch_size
        # A heap of (first, last) runs of stored numbers above stored_through.
        self._stored_above = [(number, number) for number in plan.stored_above]
        heapq.heapify(self._stored_above)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-writer", daemon=True)
        # Written by the writer thread only, after each commit; others just read them.
        self.stored_through = plan.stored_through
        self.committed_total = 0  # rows committed in this run

    def start(self) -> None:
        """Start writing."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the writer to commit what is queued and end; call it once the consumers have ended."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # an empty batch wakes it now rather than at its next poll
            self._results.put_nowait(WAKE_UP)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                try:
                    parts = [self._results.get(timeout=POLL_S)]
                except queue.Empty:
                    if self._stop.is_set():
                        return  # the consumers have ended, so nothing more can arrive
                    continue
                count = len(parts[0].numbers)
                while count < self._batch_size:  # whatever else is waiting joins this commit
                    try:
                        parts.append(self._results.get_nowait())
                    except queue.Empty:
                        break
                    count += len(parts[-1].numbers)
                if count:
                    self._commit(parts)
                elif self._stop.is_set() and self._results.empty():
                    return
        except BaseException as exc:  # storage failure: end loudly; uncommitted rows are recovered
            self._on_fatal("writer", exc)

    def _commit(self, parts: list[Part]) -> None:
        heap = self._stored_above
        ok: list[object] = []
        failed: list[Row] = []
        for part in parts:
            numbers = part.numbers
            if not numbers:
                continue  # the WAKE_UP part stop() sends
            first, last = numbers[0], numbers[-1]
            # A part of a new chunk is a range: one run, one heap entry. Recovered numbers come as tuples.
            if ((isinstance(numbers, range) and numbers.step == 1)
                    or list(numbers) == list(range(first, last + 1))):
                heapq.heappush(heap, (first, last))
            else:
                for number in numbers:
                    heapq.heappush(heap, (number, number))
            ok += part.batch.ok
            failed += part.batch.failed
        through = self.stored_through
        while heap and heap[0][0] <= through + 1:
            through = max(through, heapq.heappop(heap)[1])
        batch = Batch(ok, failed)
        self._storage.save_batch(batch, through)
        self.stored_through = through
        self.committed_total += len(batch)
