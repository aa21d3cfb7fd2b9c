"""Producer: one thread putting invoice numbers on the bounded work queue, recovered ones first."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from invoicer.generator import InvoiceNumberGenerator
from invoicer.outage import OutageBreaker
from invoicer.pipeline import POLL_S, FatalHandler
from invoicer.workqueue import Chunk, WorkQueue


class Producer:
    """One thread: recovered numbers first, then new ones, onto the bounded work queue (back-pressure).

    While the processor's service is down (``breaker.paused``) it takes no new numbers.
    """

    def __init__(self, generator: InvoiceNumberGenerator, work: WorkQueue, recovered: Sequence[Chunk],
                 chunk: Callable[[], int], on_fatal: FatalHandler, *, breaker: OutageBreaker) -> None:
        self._generator = generator
        self._work = work
        self._recovered = recovered
        self._chunk = chunk  # asked before each chunk: the size follows the measured invoice time
        self._on_fatal = on_fatal
        self._breaker = breaker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-producer", daemon=True)
        # Written by the producer thread only; others just read them.
        self.queued_total = 0    # numbers put on the queue
        self.busy_since = 0.0    # monotonic time the current take of numbers began (0: not taking)

    def start(self) -> None:
        """Start producing."""
        self._thread.start()

    def stop(self) -> None:
        """Stop taking new numbers; a chunk it could not queue is given back, never dropped.

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
            for missing in self._recovered:
                position = 0
                while position < len(missing):
                    chunk = missing[position:position + self._chunk()]
                    self._put(chunk, until_stopped=False)
                    position += len(chunk)
            while not self._stop.is_set():
                if self._breaker.paused:
                    self._breaker.wait_resumed(POLL_S)
                    continue
                self.busy_since = time.monotonic()  # a reservation can stall on the disk
                numbers = self._generator.take(self._chunk())
                self.busy_since = 0.0
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
