"""ConsumerPool: INVOICER_WORKERS consumer loops in a ThreadPoolExecutor, every call under a deadline.

Python cannot kill a thread. A processor call that runs past INVOICER_INVOICE_TIMEOUT is *given up*
instead: ``reap()`` (the observer calls it every tick) marks the loop abandoned, stores the invoice as
failed with an error saying it timed out, hands the writer what the loop had finished, puts the rest of
its chunk back at the front of the work queue, and starts a fresh loop so the pool keeps its size. The
abandoned thread is left to its call; whatever it returns later is discarded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from invoicer.config import MAX_WORKERS
from invoicer.gate import ConcurrencyGate
from invoicer.intake import OrderChunk
from invoicer.outage import MAX_PROBES, OutageBreaker
from invoicer.pipeline import (
    CPU_SAMPLE_EVERY,
    HANDOFF_S,
    FatalHandler,
    Part,
    failed_row,
    invoice_values,
    retry_backoff,
)
from invoicer.processing import InvoiceRequest, demo_request
from invoicer.storage import Batch, Row
from invoicer.workqueue import Chunk, WorkQueue

log = logging.getLogger("invoicer")

# A call running this long holds no place in the concurrency gate: it waits, whatever its CPU share.
LONG_CALL_S = 1.0

# What became of one invoice (ConsumerPool._invoice).
DONE = "done"              # its row is in the loop's results
GIVEN_UP = "given up"      # the reaper took the loop's work over: the loop must end
GOES_ROUND = "goes round"  # an outage outlasted its probes: back to the queue, untouched


class InvoiceTimeoutError(TimeoutError):
    """A processor call ran past its deadline and was given up."""


def request_at(chunk: Chunk, index: int) -> InvoiceRequest:
    """Return the request for a chunk's ``index``: its order's, or the demo source's for a bare number."""
    if type(chunk) is OrderChunk:
        return chunk.requests[index]
    return demo_request(chunk[index])


class _Slot:
    """What one consumer loop is doing, shared with the reaper.

    Rule: ``lock`` guards ``abandoned`` and the loop's unsent results (``ok``, ``failed``, ``start``): the
    consumer takes it to record each outcome, the reaper to give the loop up, so exactly one of them
    hands those results on. ``call_started``, ``chunk``, ``index``, ``attempt`` and ``probe`` are written
    by the consumer alone (plain stores, atomic under the GIL); the reaper reads them and confirms
    ``call_started`` under the lock.
    """

    __slots__ = ("abandoned", "attempt", "busy", "call_started", "chunk", "failed", "future", "index",
                 "lock", "ok", "probe", "start", "worker")

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.lock = threading.Lock()
        self.abandoned = False
        self.call_started = 0.0  # monotonic start of the processor call under way (0: none)
        self.chunk: Chunk = ()
        self.index = 0           # the chunk position being processed
        self.start = 0           # the first chunk position not yet handed to the writer
        self.attempt = 1
        self.probe = False       # the call under way probes a paused service
        self.busy = False        # holds an invoice (in a call, or waiting to try it again)
        self.ok: list[object] = []
        self.failed: list[Row] = []
        self.future: concurrent.futures.Future[None] | None = None


class ConsumerPool:
    """``workers`` consumers in a ThreadPoolExecutor: process each number, hand rows to the writer."""

    def __init__(self, processor: Callable[[InvoiceRequest], Any], work: WorkQueue,
                 results: queue.Queue[Part], workers: int, on_fatal: FatalHandler,
                 *, timeout: float = 60.0, breaker: OutageBreaker | None = None,
                 cpu: int | None = None) -> None:
        self._processor = processor
        self._work = work
        self._results = results
        self._on_fatal = on_fatal
        self._timeout = timeout
        self.breaker = breaker or OutageBreaker(workers)
        # Room for the configured maximum plus as many abandoned threads (beyond that the process is
        # sick and the watchdog ends it); threads start only as loops are submitted.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2 * MAX_WORKERS + 1, thread_name_prefix="invoicer-consumer")
        # Rule: _lock guards _slots, _next_worker, workers, abandoned, _owed, _closed and _deferred. The main
        # thread starts, resizes and joins; the reaper (observer thread) abandons and replaces loops;
        # a loop removes its own slot when it ends.
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._next_worker = 0
        self._closed = False
        self._deferred: list[Part] = []   # parts of given-up calls the full results queue refused
        self._owed = 0                    # loops given up and not replaced (too many calls hung)
        self.workers = workers
        self.most_workers = workers       # the largest pool since start: what "too many hung" compares to
        self.abandoned = 0                # given-up calls whose threads still run
        self.timed_out_total = 0
        # Seconds one invoice takes, a moving average; written by consumers (a float store is atomic
        # under the GIL), read by the producer to size chunks.
        self.invoice_seconds = 0.0
        self.gate = ConcurrencyGate(workers)  # how many loops process at once (CPU-bound work: few)
        # The CPU every consumer thread is pinned to (INVOICER_CONSUMER_CPU; None: not pinned). Set to
        # None by the first loop that finds the CPU unusable.
        self.cpu = cpu
        self._pin_lock = threading.Lock()  # Rule: guards the change of cpu to None, and its warning

    # -- the main thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start ``workers`` consumer loops."""
        with self._lock:
            for _ in range(self.workers):
                self._start_loop()

    def resize(self, workers: int) -> None:
        """Grow by starting loops, or shrink by queueing one retirement sentinel per surplus loop.

        A retiring loop finishes the chunk it holds first, and the sentinel queues behind the work
        already waiting, so no number is dropped or handed to two loops.
        """
        with self._lock:
            for _ in range(self.workers, workers):
                self._start_loop()
            surplus = self.workers - workers
            self.workers = workers
            self.most_workers = max(self.most_workers, workers)
        self.gate.resize(workers)
        self.breaker.resize(workers)
        for _ in range(surplus):
            self._work.put_sentinel()

    def retire_all(self) -> None:
        """Queue one retirement sentinel per running loop (after the producer stopped)."""
        with self._lock:
            count = self.workers
        for _ in range(count):
            self._work.put_sentinel()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every loop not given up to end; True once they all have (abandoned ones never count)."""
        with self._lock:
            futures = [slot.future for slot in self._slots.values() if slot.future is not None]
        _done, pending = concurrent.futures.wait(futures, timeout)
        if pending:
            return False
        with self._lock:  # a loop given up meanwhile was replaced: wait for its replacement too
            return all(slot.future is None or slot.future.done() for slot in self._slots.values())

    def close(self, timeout: float) -> bool:
        """After join(): stop reaping and hand the writer what given-up calls left; True once all is.

        Waits at most ``timeout`` (the caller watches signals and stalls in between, as the drain does).
        """
        with self._lock:
            self._closed = True
            while self._deferred:
                try:
                    self._results.put(self._deferred[0], timeout=timeout)
                except queue.Full:
                    return False
                self._deferred.pop(0)
            return True

    # -- the reaper (the observer thread, once a tick) ------------------------------------------------

    def reap(self, now: float) -> None:
        """Give up every call past its deadline; lend the gate a place for every long call."""
        long_calls = 0
        with self._lock:
            if self._closed:
                return
            self._flush_deferred()
            overdue: list[tuple[_Slot, float]] = []
            for slot in list(self._slots.values()):
                started = slot.call_started
                if not started or slot.abandoned:
                    continue
                if now - started >= self._timeout:
                    if self._abandon(slot, started):
                        overdue.append((slot, started))
                elif now - started >= LONG_CALL_S:
                    long_calls += 1
            # Every overdue call counts before any is judged: calls that all hang at once are an outage.
            in_flight = self._in_flight() + len(overdue)
            for slot, started in overdue:
                hung = InvoiceTimeoutError(f"processor call did not return within {self._timeout:g}s")
                self.breaker.failure(slot.chunk[slot.index], hung, started=started, probe=slot.probe,
                                     in_flight=in_flight)
            for slot, started in overdue:
                self._give_up(slot, started, now)
        self.gate.lend(long_calls)

    def _in_flight(self) -> int:
        """How many invoices the loops hold now (asked on a failure only)."""
        return sum(1 for slot in list(self._slots.values()) if slot.busy and not slot.abandoned)

    def oldest_call(self, now: float) -> float:
        """Seconds the oldest processor call under way has been running (0: none)."""
        starts = [slot.call_started for slot in list(self._slots.values())
                  if slot.call_started and not slot.abandoned]
        return now - min(starts) if starts else 0.0

    def calls(self) -> int:
        """How many processor calls are under way (given-up ones not counted)."""
        return sum(1 for slot in list(self._slots.values()) if slot.call_started and not slot.abandoned)

    def _abandon(self, slot: _Slot, started: float) -> bool:
        """Take the loop's work over from it, unless its call returned meanwhile; call with _lock held."""
        with slot.lock:
            if slot.call_started != started or slot.abandoned:
                return False
            slot.abandoned = True
        del self._slots[slot.worker]
        self.abandoned += 1
        self.gate.release()  # the place the abandoned loop held
        return True

    def _give_up(self, slot: _Slot, started: float, now: float) -> None:
        """Hand on what an abandoned loop held, and replace it; call with _lock held."""
        chunk, index, start = slot.chunk, slot.index, slot.start
        number = chunk[index]
        self.timed_out_total += 1
        if self.breaker.paused:  # an outage: the number goes round again (not a failed row)
            self._hand(Part(chunk[start:index], Batch(slot.ok, slot.failed)))
            self._work.put_back(chunk[index:])
            log.warning("invoice %d: processor call did not return within %gs during an outage; given "
                        "up, it will be tried again", number, self._timeout,
                        extra={"invoice": number, "worker": slot.worker, "abandoned": self.abandoned})
        else:
            error = InvoiceTimeoutError(f"processor call did not return within {self._timeout:g}s "
                                        f"(running for {now - started:.1f}s); given up")
            row = failed_row(number, error, slot.attempt, request_at(chunk, index).order_id)
            self._hand(Part(chunk[start:index + 1], Batch(slot.ok, [*slot.failed, row])))
            if index + 1 < len(chunk):
                self._work.put_front(chunk[index + 1:])
            self.breaker.finished(number)
            log.error("invoice %d: %s; stored as failed", number, error,
                      extra={"invoice": number, "worker": slot.worker, "abandoned": self.abandoned})
        # A fresh loop takes the given-up one's place (and its retirement sentinel, if one is queued).
        # With more calls hung than the pool ever had workers the process is sick: more threads would
        # only pile up, so the place is owed until a hung call returns, and the watchdog ends it.
        if self.abandoned > self.most_workers:
            self._owed += 1
        else:
            self._start_loop()

    def _hand(self, part: Part) -> None:
        if not part.numbers:
            return
        try:
            self._results.put_nowait(part)
        except queue.Full:  # the writer is behind (a stalled disk?): hand it over on a later tick
            self._deferred.append(part)

    def _flush_deferred(self) -> None:
        while self._deferred:
            try:
                self._results.put_nowait(self._deferred[0])
            except queue.Full:
                return
            self._deferred.pop(0)

    def _start_loop(self) -> None:
        """Start one consumer loop; call with ``_lock`` held."""
        slot = _Slot(self._next_worker)
        self._next_worker += 1
        self._slots[slot.worker] = slot
        slot.future = self._executor.submit(self._consume, slot)

    # -- the consumer loops -------------------------------------------------------------------------

    def _consume(self, slot: _Slot) -> None:
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
                    if not self._process_chunk(chunk, slot):
                        return  # given up: the reaper took the chunk over and released the place
                    wall = time.monotonic() - started
                    self.invoice_seconds += (wall / len(chunk) - self.invoice_seconds) * 0.2
                    # Let go of the orders before waiting for the next chunk: a loop that kept its last
                    # one held up to a worker's worth of large orders past their commit (RSS 300 MiB
                    # with 64 workers and 0.5 MB orders, whatever INVOICER_INFLIGHT_BYTES said).
                    chunk = ()
                    cpu = time.thread_time() - cpu_started if sampled else 0.0
                    if gate.report(cpu, wall if sampled else 0.0):  # the limit fell: queue up again
                        gate.acquire()
            finally:
                if not slot.abandoned:
                    gate.release()
        except BaseException as exc:  # a broken loop (not a broken invoice) ends the process loudly
            self._on_fatal(f"consumer {slot.worker}", exc)
        finally:
            with self._lock:
                if slot.abandoned:
                    self.abandoned -= 1  # the stuck call came back at last; its result was discarded
                    if self._owed and not self._closed:
                        self._owed -= 1
                        self._start_loop()
                elif self._slots.get(slot.worker) is slot:
                    del self._slots[slot.worker]

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

    def _process_chunk(self, chunk: Chunk, slot: _Slot) -> bool:
        """Process every number of ``chunk``, handing rows over as they age; False if given up."""
        slot.chunk, slot.start, slot.ok, slot.failed = chunk, 0, [], []
        handed_at = time.monotonic()
        requests = chunk.requests if type(chunk) is OrderChunk else None
        for index in range(len(chunk)):
            slot.index = index
            slot.busy = True
            outcome = self._invoice(requests[index] if requests else demo_request(chunk[index]), slot)
            slot.busy = False
            if outcome is GIVEN_UP:
                return False
            if outcome is GOES_ROUND:  # an outage outlasted this invoice's probes: let others probe
                self._hand_over(slot, index)
                self._work.put_back(chunk[index:])
                slot.chunk = ()
                return True
            if time.monotonic() - handed_at >= HANDOFF_S:
                self._hand_over(slot, index + 1)
                handed_at = time.monotonic()
        if len(chunk) > slot.start:
            self._hand_over(slot, len(chunk))
        slot.chunk = ()
        return True

    def _hand_over(self, slot: _Slot, done: int) -> None:
        with slot.lock:
            part = Part(slot.chunk[slot.start:done], Batch(slot.ok, slot.failed))
            slot.ok, slot.failed, slot.start = [], [], done
        if part.numbers:
            self._results.put(part)

    def _invoice(self, request: InvoiceRequest, slot: _Slot) -> str:
        """Process one invoice into the slot's results: DONE, GIVEN_UP (by the reaper) or GOES_ROUND."""
        breaker = self.breaker
        number = request.number
        order_id = request.order_id or 0
        attempt = 1
        probes = 0
        while True:
            slot.probe = self._admit(slot) if breaker.paused else False
            slot.attempt = attempt
            slot.call_started = started = time.monotonic()
            try:
                values = invoice_values(number, self._processor(request), attempt, order_id)
            except Exception as exc:  # one bad invoice never kills the pool
                error = exc
            else:
                with slot.lock:
                    slot.call_started = 0.0
                    if slot.abandoned:
                        return GIVEN_UP
                    slot.ok += values
                if breaker.tracking or breaker.paused:
                    breaker.success(number, started)
                return DONE
            with slot.lock:
                slot.call_started = 0.0
                if slot.abandoned:
                    return GIVEN_UP
            probes += slot.probe
            if breaker.failure(number, error, started=started, probe=slot.probe, in_flight=self._in_flight()):
                # An outage: wait for the service, spend no attempt. After MAX_PROBES failed probes the
                # invoice goes round (to the back of the queue), so that another one probes next: a
                # poison invoice cannot keep a paused daemon paused, and none is stored as failed.
                if probes >= MAX_PROBES:
                    return GOES_ROUND
                continue
            backoff = retry_backoff(number, error, attempt, slot.worker)
            if backoff is None:
                breaker.finished(number)
                with slot.lock:
                    slot.failed.append(failed_row(number, error, attempt, order_id))
                return DONE
            self._pause(backoff)
            attempt += 1

    def _admit(self, slot: _Slot) -> bool:
        """Wait for the paused service's turn to probe, holding no gate place (nor finished rows)."""
        self._hand_over(slot, slot.index)  # what is done commits now, not after the outage
        self.gate.release()
        try:
            return self.breaker.admit()
        finally:
            self.gate.reenter()

    def _pause(self, seconds: float) -> None:
        """Sleep a retry's backoff, holding no gate place meanwhile (others may process)."""
        self.gate.release()
        try:
            time.sleep(seconds)
        finally:
            self.gate.reenter()
