"""OutageBreaker: tells a processor outage (its service is down) from poison invoices, and pauses for it.

A failure streak across several *different* invoices with no success in between means the processor's
service is down, not that those invoices are bad. Then the consumers stop spending attempts (which
would store every invoice in flight as failed): they wait, and one call at a time probes the service
with capped exponential backoff, in turn (a ticket queue), until a call succeeds and every consumer
resumes. An invoice that fails while others succeed never builds a streak of different invoices: it is
poison, and is stored as failed after its attempts, as before.

Only first attempts build the streak: retries of poison invoices come due together (every consumer
sleeps the same backoff) and would fail in a row while the invoices around them succeed. The streak
needed grows with the worker count (more invoices in flight at once), from OUTAGE_INVOICES to
MAX_OUTAGE_INVOICES.

One invoice can be the failing probe at most MAX_PROBES times; after that it counts as poison too.
Without that bound, one worker behind a run of bad orders would probe with the same bad order forever.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("invoicer")

OUTAGE_INVOICES = 5     # different invoices failing in a row that make an outage, at least ...
MAX_OUTAGE_INVOICES = 20  # ... and at most (one per worker in between)
FIRST_BACKOFF_S = 0.25  # the first probe after this long, doubling ...
MAX_BACKOFF_S = 5.0     # ... up to this: service back means throughput back within seconds
MAX_PROBES = 3          # failed probes one invoice may make before it counts as poison


def describe(exc: BaseException) -> str:
    """One line naming an error, as STATUS= and the logs show it."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class OutageBreaker:
    """Counts failures across invoices; while ``paused``, admits one probe call at a time."""

    def __init__(self, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.threshold = OUTAGE_INVOICES
        self.resize(workers)
        # Rule: _cond's lock guards every attribute below; ``paused`` and ``streak`` may be read without
        # it as hints (the consumers' fast path), and are confirmed under it.
        self._cond = threading.Condition(threading.Lock())
        self.paused = False
        self.streak = 0                  # failures since the last success
        self.error = ""                  # the latest failure while paused, for STATUS=
        self._failing: set[int] = set()  # different invoices in the streak (at most the threshold)
        self._paused_at = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._next_probe = 0.0
        self._probing = False
        self._tickets: collections.deque[int] = collections.deque()
        self._counter = itertools.count()

    def admit(self) -> bool:
        """Wait while paused until it is the caller's turn to probe; True if the call is a probe."""
        with self._cond:
            if not self.paused:
                return False
            ticket = next(self._counter)
            self._tickets.append(ticket)
            try:
                while self.paused:
                    wait = self._next_probe - self._clock()
                    if not self._probing and self._tickets[0] == ticket and wait <= 0:
                        self._probing = True
                        return True
                    self._cond.wait(wait if wait > 0 and self._tickets[0] == ticket else None)
                return False
            finally:
                self._tickets.remove(ticket)
                self._cond.notify_all()  # the next ticket may be first now

    def success(self) -> None:
        """Record a successful call: the streak ends, and a pause with it."""
        with self._cond:
            self.streak = 0
            self._failing.clear()
            if self.paused:
                paused_for = self._clock() - self._paused_at
                self.paused = self._probing = False
                self.error = ""
                self._cond.notify_all()
                log.warning("processor calls succeed again: intake resumed after %.1fs", paused_for,
                            extra={"event": "resumed", "paused_seconds": round(paused_for, 3)})

    def resize(self, workers: int) -> None:
        """Follow the worker count: the streak that makes an outage is one invoice per worker, bounded."""
        self.threshold = max(OUTAGE_INVOICES, min(MAX_OUTAGE_INVOICES, workers))

    def failure(self, number: int, exc: BaseException, *, probe: bool = False, first: bool = True) -> bool:
        """Record a failed call; True if an outage is on, so the failure must not count as an attempt.

        ``first``: the invoice's first attempt (only those build a streak).
        """
        with self._cond:
            self.streak += 1
            if first and len(self._failing) < self.threshold:
                self._failing.add(number)
            if self.paused:
                self.error = describe(exc)
                if probe:
                    self._probing = False
                    self._next_probe = self._clock() + self._backoff
                    self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
                    self._cond.notify_all()
                return True
            if len(self._failing) >= self.threshold:
                self.paused = True
                self.error = describe(exc)
                self._paused_at = self._clock()
                self._backoff = FIRST_BACKOFF_S
                self._next_probe = self._paused_at + self._backoff
                self._backoff *= 2
                log.warning("processor calls fail across %d different invoices: an outage, not bad "
                            "invoices; intake paused, probing with backoff: %s", self.threshold,
                            self.error, extra={"event": "paused", "error": self.error})
                return True
            return False

    def wait_resumed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a pause to end; True if not paused (the producer's wait)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.paused, timeout)
