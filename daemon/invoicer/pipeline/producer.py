"""Producer: one thread putting work on the bounded work queue, recovered numbers first."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from invoicer.intake import IDLE_POLL_S
from invoicer.outage import OutageBreaker
from invoicer.pipeline import POLL_S, FatalHandler, Part
from invoicer.workqueue import Chunk, WorkQueue

TAKEOVER_POLL_S = 1.0  # how often to look for numbers other instances left (PostgreSQL)


class Source(Protocol):
    """Where the producer takes work from (invoicer.intake: OrderSource, DemoSource)."""

    idle: bool

    def take(self, limit: int) -> Chunk | None: ...
    def give_back(self, chunk: Any) -> None: ...
    def recover(self, numbers: range) -> Sequence[Chunk | Part]: ...
    def take_over(self) -> Sequence[range]: ...
    def leftovers(self) -> Sequence[Chunk]: ...
    def admit(self, chunk: object, timeout: float) -> bool: ...
    def start(self) -> None: ...
    @property
    def last_issued(self) -> int: ...


class Producer:
    """One thread: recovered numbers first, then new work, onto the bounded work queue (back-pressure).

    While the processor's service is down (``breaker.paused``) it takes no new work. With no order
    waiting it looks again every IDLE_POLL_S (``idle``).
    """

    def __init__(self, source: Source, work: WorkQueue, recovered: Sequence[range],
                 chunk: Callable[[], int], on_fatal: FatalHandler, *, breaker: OutageBreaker,
                 results: queue.Queue[Part] | None = None) -> None:
        self._source = source
        self._work = work
        self._recovered = recovered
        self._chunk = chunk  # asked before each chunk: the size follows the measured invoice time
        self._on_fatal = on_fatal
        self._breaker = breaker
        self._results = results  # recovered orders that no longer pass their check go straight here
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-producer", daemon=True)
        # Written by the producer thread only; others just read them.
        self.queued_total = 0    # numbers handed to the pipeline
        self.busy_since = 0.0    # monotonic time the current take of work began (0: not taking)

    @property
    def idle(self) -> bool:
        """No order was waiting at the last look."""
        return self._source.idle

    def start(self) -> None:
        """Start producing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop taking new work; a chunk it could not queue is given back, never dropped.

        The recovered backlog (what was in flight at the last stop) is still queued, so a clean stop
        owes nothing.
        """
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._recover_all(self._recovered)
            # Only now: a source claiming ahead could otherwise fill the byte budget with new orders
            # while recovered ones wait for room behind them.
            if not self._stop.is_set():
                self._source.start()
            look_at = 0.0
            while not self._stop.is_set():
                if (now := time.monotonic()) >= look_at:  # others' unstored numbers before new work
                    look_at = now + TAKEOVER_POLL_S
                    self._take_over()
                if self._breaker.paused:
                    self._breaker.wait_resumed(POLL_S)
                    continue
                self.busy_since = time.monotonic()  # a claim or a reservation can stall on the disk
                chunk = self._source.take(self._chunk())
                self.busy_since = 0.0
                if chunk is None:  # no order waiting, or the byte budget is spent: look again soon
                    self._stop.wait(IDLE_POLL_S)
                    continue
                if not self._put(chunk):
                    self._source.give_back(chunk)
                    return
        except BaseException as exc:  # a broken producer must end the process loudly
            self._on_fatal("producer", exc)

    def _recover_all(self, recovered: Sequence[range]) -> None:
        """Queue the work for ``recovered`` numbers, a chunk at a time (each read with its orders)."""
        for missing in recovered:
            position = 0
            while position < len(missing):
                numbers = missing[position:position + self._chunk()]
                self.busy_since = time.monotonic()
                work = self._source.recover(numbers)
                self.busy_since = 0.0
                for item in work:
                    self._recover(item)
                position += len(numbers)

    def _take_over(self) -> None:
        self.busy_since = time.monotonic()
        missing = self._source.take_over()
        self.busy_since = 0.0
        self._recover_all(missing)

    def queue_leftover(self, chunk: Chunk, timeout: float) -> bool:
        """Queue a chunk a drain must still process (the source's leftovers), once the thread has ended.

        False if the queue had no room within ``timeout`` (the caller tries again, watching the drain).
        """
        if not self._work.put(chunk, timeout=timeout):
            return False
        self.queued_total += len(chunk)
        return True

    def _recover(self, item: Chunk | Part) -> None:
        if isinstance(item, Part):  # failed rows: straight to the writer
            assert self._results is not None
            self._results.put(item)
            self.queued_total += len(item.numbers)
            return
        while not self._source.admit(item, POLL_S):
            pass
        self._put(item, until_stopped=False)

    def _put(self, chunk: Chunk, *, until_stopped: bool = True) -> bool:
        while not self._work.put(chunk, timeout=POLL_S):
            if until_stopped and self._stop.is_set():
                return False
        self.queued_total += len(chunk)
        return True
