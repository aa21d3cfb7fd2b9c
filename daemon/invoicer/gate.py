"""ConcurrencyGate: how many consumers may process at once, following how CPU-bound the invoices are.

Consumers are threads, and only one of them runs Python at a time (the GIL). When invoices wait on
something outside Python (an API, a disk), many consumers overlap their waits and throughput grows with
the worker count. When invoices are pure Python work, extra consumers only take turns on the GIL: every
5 ms a waiting thread forces a switch, the storage writer queues behind a crowd to win the GIL back after
each SQLite call, and throughput *falls* as workers are added (docs/performance.md).

The gate admits ``limit`` consumers, the rest wait on a condition (no CPU, no GIL). An admitted consumer
keeps its place from chunk to chunk (handing it over after every chunk would wake a waiter each time,
only for it to find the place retaken: a GIL round trip per chunk) and gives it up only when the limit
falls below the number admitted. Each consumer reports, per chunk, its thread CPU time and its wall time.
Their ratio is the share of its time an invoice spends running Python; ``1 / share`` consumers keep one
core busy. The limit is ``ceil(HEADROOM / share)``, clamped to 1..workers (all of them below
OPEN_BELOW_SHARE), from the median of the last SAMPLES sampled chunks: a chunk a GIL switch interrupted
looks like waiting (its wall time grows, its CPU time does not), but chunks are short (at most about
CHUNK_TARGET_S of work, usually far less than the 5 ms switch interval), so most of them run
uninterrupted and the median stays honest. Invoices that sleep or wait get a share near 0 and the gate
stays fully open. Work that holds the GIL for long stretches (more than the switch interval per chunk)
is misread as waiting and the gate opens: the behaviour without a gate.

Two things the share cannot see are handled apart. A call that runs long (a hung or slow external
call) holds no place: the pool lends the gate one place per such call (``lend``). And work that burns CPU
in C with the GIL released (hashlib, zlib, a renderer) shows a share near 1 like pure Python, but runs on
several cores at once: every PROBE_EVERY_S the gate tries one more core's worth of consumers for a
while (``tick``), and keeps it if the process then really used about one core more.
"""

from __future__ import annotations

import collections
import math
import os
import threading

SAMPLES = 16        # chunks in the moving window the limit follows
# Consumers per core of Python work: more only take turns on the GIL (docs/performance.md, "Figures
# behind the constants"); the probe below finds work that runs outside the GIL.
HEADROOM = 1.0
# Below this share the gate stays open: invoices that wait 90 % of their time need 10+ consumers anyway,
# and with many waiting workers (128 at 5 ms) GIL waits stretch chunks unevenly, so a partial limit
# there would follow noise.
OPEN_BELOW_SHARE = 0.1
UPDATE_EVERY = 4    # reports between two recomputations of the limit
PROBE_EVERY_S = 10.0  # how often to try one more core's worth of consumers
PROBE_S = 1.0         # ... for this long (at least one observer tick)
PROBE_GAIN = 0.5      # cores beyond cores - 1 the process must use in a probe to keep it


def limit_for(share: float, workers: int, cores: int = 1) -> int:
    """How many of ``workers`` consumers to admit when an invoice uses a CPU ``share`` of its time.

    ``cores``: how many cores the work has been seen to use at once (1 for work that holds the GIL).
    """
    if share < OPEN_BELOW_SHARE:
        return workers
    return max(1, min(workers, math.ceil(cores * HEADROOM / share)))


class ConcurrencyGate:
    """A semaphore whose size follows the measured CPU share of the work (see the module docstring)."""

    def __init__(self, workers: int, *, cpus: int | None = None) -> None:
        # Rule: _cond's lock guards _workers, _active and _limit, and is taken to change them; reads
        # without it are hints, confirmed under it. _shares and _reports are written without it: a
        # deque append is atomic under the GIL, and a lost count only delays an update. Consumers report
        # once per chunk and must not queue on a lock to do so (128 workers at 5 ms, with this lock and
        # the CPU clock taken on every chunk: 15,600/s against 19,400/s without a gate).
        self._cond = threading.Condition(threading.Lock())
        self._workers = workers
        self._active = 0
        self._shares: collections.deque[float] = collections.deque(maxlen=SAMPLES)
        self._reports = 0
        self._limit = workers  # open until the first measurements say otherwise
        self._lent = 0         # places lent to consumers in long calls
        # Cores' worth of consumers admitted; only tick() (the observer thread) changes it.
        self.cores = 1
        self._max_cores = cpus or len(os.sched_getaffinity(0))  # the CPUs this process may use
        self._probe: tuple[float, float] | None = None  # (started, the process's CPU seconds then)
        self._next_probe = PROBE_EVERY_S
        self._last: tuple[float, float] | None = None   # (now, CPU seconds) at the previous tick

    @property
    def limit(self) -> int:
        """How many consumers may process at once now (without the places lent to long calls)."""
        with self._cond:
            return self._limit

    def lend(self, places: int) -> None:
        """Let ``places`` more consumers in, one for each call that runs long (the pool's reaper)."""
        with self._cond:
            more = places - self._lent
            self._lent = places
            if more > 0:
                self._cond.notify(more)

    def tick(self, now: float, cpu_seconds: float) -> None:
        """Probe for work that runs outside the GIL; ``cpu_seconds`` is the process's CPU time so far."""
        last, self._last = self._last, (now, cpu_seconds)
        if last is None or now <= last[0]:
            return
        used = (cpu_seconds - last[1]) / (now - last[0])  # cores the whole process used since then
        with self._cond:
            if self._probe is not None:
                started, cpu_then = self._probe
                if now - started < PROBE_S:
                    return
                self._probe = None
                # GIL-bound work keeps the process near one core (plus the writer's SQLite time),
                # however many consumers run; work in C with the GIL released uses one core per consumer.
                if (cpu_seconds - cpu_then) / (now - started) < self.cores - 1 + PROBE_GAIN:
                    self.cores -= 1  # one more core's worth of consumers did not use one more core
                    self._next_probe = now + PROBE_EVERY_S
                else:
                    self._next_probe = now  # it did: try another at once
                self._update()
            elif self.cores > 1 and used < self.cores - 1 + PROBE_GAIN and now >= self._next_probe:
                self.cores -= 1  # the work no longer runs on that many cores
                self._next_probe = now + PROBE_EVERY_S
                self._update()
            elif (now >= self._next_probe and self.cores < self._max_cores
                  and self._limit < self._workers):
                self._probe = (now, cpu_seconds)
                self.cores += 1
                self._update()

    def acquire(self) -> None:
        """Wait for a free place and take it."""
        with self._cond:
            while self._active >= self._limit + self._lent:
                self._cond.wait()
            self._active += 1

    def reenter(self) -> None:
        """Take a place back at once, past the limit if need be: the caller left mid-chunk to wait.

        The limit is restored as consumers report (the first to report over it steps out).
        """
        with self._cond:
            self._active += 1

    def report(self, cpu_seconds: float, wall_seconds: float) -> bool:
        """Record a chunk the caller processed; True if the caller must give its place up (acquire again)."""
        if wall_seconds > 0:
            self._shares.append(min(1.0, cpu_seconds / wall_seconds))
        self._reports += 1
        if self._reports % UPDATE_EVERY == 0:
            with self._cond:
                self._update()
        if self._active > self._limit + self._lent:  # rarely true: only after the limit fell
            with self._cond:
                if self._active > self._limit + self._lent:
                    self._active -= 1
                    return True
        return False

    def release(self) -> None:
        """Give the caller's place up for good (the consumer ends)."""
        with self._cond:
            self._active -= 1
            self._cond.notify()

    def resize(self, workers: int) -> None:
        """Follow a new worker count (reload)."""
        with self._cond:
            self._workers = workers
            self._update()

    def _update(self) -> None:
        before = self._limit
        shares = sorted(tuple(self._shares))  # tuple() copies in one step under the GIL
        if len(shares) < SAMPLES // 2:
            self._limit = self._workers
        else:
            self._limit = limit_for(shares[len(shares) // 2], self._workers, self.cores)
        if self._limit > before:
            self._cond.notify(self._limit - before)
