"""OutageBreaker: tells a processor outage (its service is down) from poison invoices, and pauses for it.

Failures of several *different* invoices with no success after them mean the processor's service is
down, not that those invoices are bad. Then the consumers stop spending attempts (which would store
every invoice in flight as failed): they wait, and one call at a time probes the service with capped
exponential backoff, in turn (a ticket queue), until a call succeeds and every consumer resumes.

Only errors of the kind an outage raises count: ``OSError`` (refused or reset connections, timeouts,
unreachable networks), ``invoicer.processing.ServiceUnavailableError`` that a processor raises for "try
later" answers, and calls given up at their deadline. Any other error (a ValueError for a bad order, a
processor bug) is about the invoice: poison, stored as failed after its attempts, however many invoices
fail in a row; and when it answers a probe, the service is evidently up again.

"After" is by the calls' start times: a call that started before an invoice failed and succeeds later
says nothing about the service now (it is a straggler from before the outage), while a call that
started later and succeeds clears every invoice that failed before it: those are poison, and their
further failures no longer count. So an invoice that fails while others succeed is stored as failed
after its attempts, as before, even when the retries of many such invoices come due together. The
number of different invoices that makes an outage grows with the worker count (more invoices are in
flight at once), from OUTAGE_INVOICES to MAX_OUTAGE_INVOICES.

An invoice that fails MAX_PROBES probes goes round: to the back of the queue, untouched, so that others
probe next. None is stored as failed for an outage, however long it lasts; the pause ends with the
first call that succeeds, or that the service answers with an error about the invoice.
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
MAX_BACKOFF_S = 2.0     # ... up to this: the service back means throughput back within 2 s
MAX_PROBES = 3          # failed probes one invoice may make before it counts as poison


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is the kind of error a service outage raises (see the module docstring)."""
    return isinstance(exc, OSError)


def describe(exc: BaseException) -> str:
    """One line naming an error, as STATUS= and the logs show it."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


class OutageBreaker:
    """Tracks failing invoices; while ``paused``, admits one probe call at a time."""

    def __init__(self, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.threshold = OUTAGE_INVOICES
        self.resize(workers)
        # Rule: _cond's lock guards every attribute below; ``paused`` and ``tracking`` may be read
        # without it as hints (the consumers' fast path), and are confirmed under it.
        self._cond = threading.Condition(threading.Lock())
        self.paused = False
        self.tracking = False            # anything in _suspects or _cleared: a success has work to do
        self.error = ""                  # the latest failure while paused, for STATUS=
        self._suspects: dict[int, float] = {}  # failing invoice -> start of its first failed call
        self._last_success = 0.0         # start of the latest call that succeeded (kept across pauses)
        self._cleared: set[int] = set()  # failing invoices a later call's success showed to be poison
        self._paused_at = 0.0
        self._backoff = FIRST_BACKOFF_S
        self._next_probe = 0.0
        self._probing = False
        self._tickets: collections.deque[int] = collections.deque()
        self._counter = itertools.count()

    def resize(self, workers: int) -> None:
        """Follow the worker count: an outage takes one failing invoice per worker, within bounds."""
        self.threshold = max(OUTAGE_INVOICES, min(MAX_OUTAGE_INVOICES, workers))

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

    def success(self, number: int, started: float) -> None:
        """Record that the call for ``number`` begun at ``started`` succeeded."""
        with self._cond:
            self._last_success = max(self._last_success, started)
            self._cleared.discard(number)
            self._suspects.pop(number, None)
            for suspect, failed in list(self._suspects.items()):
                if failed < started:  # it failed before this call began: poison, not an outage
                    del self._suspects[suspect]
                    self._cleared.add(suspect)
            if self.paused and started >= self._paused_at:
                self._resume()
            self.tracking = bool(self._suspects or self._cleared)

    def finished(self, number: int) -> None:
        """Forget ``number``: it was stored as failed (or given up)."""
        with self._cond:
            self._cleared.discard(number)
            self.tracking = bool(self._suspects or self._cleared)

    def failure(self, number: int, exc: BaseException, *, started: float, probe: bool = False,
                in_flight: int | None = None) -> bool:
        """Record that a call for ``number`` failed; True if an outage is on (the attempt must not count).

        ``in_flight``: how many invoices the consumers hold now. When fewer than the threshold are in
        flight (large orders under a small byte budget, one worker), all of them failing is enough, but
        never fewer than two different invoices.
        """
        with self._cond:
            if not is_outage(exc):  # about this invoice, not the service
                if self.paused and probe:  # and the service did answer the probe
                    self._resume()
                return False
            if self.paused:
                self.error = describe(exc)
                if probe:
                    self._probing = False
                    self._next_probe = self._clock() + self._backoff
                    self._backoff = min(MAX_BACKOFF_S, self._backoff * 2)
                    self._cond.notify_all()
                return True
            if number not in self._cleared and started >= self._last_success:  # else: from before a success
                self._suspects.setdefault(number, started)
            self.tracking = True
            threshold = self.threshold if in_flight is None else max(2, min(self.threshold, in_flight))
            if len(self._suspects) < threshold:
                return False
            self.paused = True
            self.error = describe(exc)
            self._paused_at = self._clock()
            self._backoff = FIRST_BACKOFF_S
            self._next_probe = self._paused_at + self._backoff
            self._backoff *= 2
            log.warning("processor calls fail for %d different invoices and none succeeds: an outage, "
                        "not bad invoices; intake paused, probing with backoff: %s", len(self._suspects),
                        self.error, extra={"event": "paused", "error": self.error})
            return True

    def _resume(self) -> None:
        paused_for = self._clock() - self._paused_at
        self.paused = self._probing = False
        self.error = ""
        self._suspects.clear()  # they failed for the outage: each gets its attempts again
        self._cleared.clear()
        self._cond.notify_all()
        log.warning("processor calls succeed again: intake resumed after %.1fs", paused_for,
                    extra={"event": "resumed", "paused_seconds": round(paused_for, 3)})

    def wait_resumed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for a pause to end; True if not paused (the producer's wait)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.paused, timeout)
