"""Observer: samples committed counters, reports STATUS=, gates watchdog pings, logs throughput."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from invoicer.notify import Notifier

log = logging.getLogger("invoicer")

RATE_WINDOW_S = 5.0     # the rate shown is the average over this window
LOG_INTERVAL_S = 10.0   # a JSON throughput record this often
EXTEND_STOP_S = 5.0     # each progressing drain tick asks systemd for this much more stop time


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One sample of the pipeline, taken by the observer each tick."""

    state: str          # starting, recovering, running, draining, stopped
    workers: int
    stored_total: int   # committed rows in the table
    committed: int      # rows committed by this run (only ever grows)
    pending: int        # numbers handed to the pipeline and not yet committed
    queue_depth: int    # numbers waiting in the work queue
    admitted: int = 0   # consumers the concurrency gate lets process at once (0: not known)


def status_line(snapshot: Snapshot, rate: float) -> str:
    """Format the one ASCII line for STATUS=, e.g. ``running: 8 workers, 1,234 invoices/s, ...``."""
    parts = [f"{snapshot.workers} workers", f"{rate:,.0f} invoices/s", f"{snapshot.stored_total:,} stored",
             f"queue {snapshot.queue_depth:,}"]
    if 0 < snapshot.admitted < snapshot.workers:
        parts.append(f"{snapshot.admitted} at once")
    if snapshot.state == "draining":
        parts.insert(0, f"{snapshot.pending:,} left")
    return f"{snapshot.state}: {', '.join(parts)}"


class Observer:
    """One thread; ``tick(now)`` does one sample-notify-ping-log pass so tests can drive it directly."""

    def __init__(self, sample: Callable[[], Snapshot], notifier: Notifier, status_interval: float,
                 watchdog_timeout: float | None) -> None:
        self._sample = sample
        self._notifier = notifier
        self._status_interval = status_interval
        self._ping_interval = watchdog_timeout / 2 if watchdog_timeout else None
        self.tick_interval = min(status_interval, self._ping_interval or status_interval)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._next_status = 0.0
        self._next_ping = 0.0
        self._next_log = 0.0
        self._committed_at_ping = -1
        self._committed_at_tick = -1
        self._stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-observer", daemon=True)
        self.rate = 0.0

    def start(self) -> None:
        """Start ticking."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the observer to stop after its current tick."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self.tick(time.monotonic())
            if self._stop.wait(self.tick_interval):
                return

    def tick(self, now: float) -> Snapshot:
        """Sample once, then send STATUS=, ping the watchdog and log throughput if each is due."""
        snapshot = self._sample()
        self.rate = self._update_rate(now, snapshot.committed)
        if now >= self._next_status:
            self._notifier.status(status_line(snapshot, self.rate))
            self._next_status = now + self._status_interval
        if self._ping_interval is not None and now >= self._next_ping:
            self._watchdog(snapshot)
            self._next_ping = now + self._ping_interval
        if snapshot.state == "draining" and snapshot.committed > self._committed_at_tick:
            self._notifier.extend_timeout(EXTEND_STOP_S)
        self._committed_at_tick = snapshot.committed
        if now >= self._next_log:
            log.info("throughput", extra={
                "rate": round(self.rate, 1), "stored_total": snapshot.stored_total,
                "queue_depth": snapshot.queue_depth, "workers": snapshot.workers,
                "pending": snapshot.pending, "state": snapshot.state, "admitted": snapshot.admitted})
            self._next_log = now + LOG_INTERVAL_S
        return snapshot

    def _update_rate(self, now: float, committed: int) -> float:
        window = self._window
        window.append((now, committed))
        while len(window) > 2 and now - window[1][0] >= RATE_WINDOW_S:
            window.popleft()
        first_time, first_committed = window[0]
        elapsed = now - first_time
        return (committed - first_committed) / elapsed if elapsed > 0 else 0.0

    def _watchdog(self, snapshot: Snapshot) -> None:
        # Ping only while healthy: something was committed since the last ping, or nothing is pending
        # (idle for an innocent reason). Stuck with work pending, we stay silent and systemd restarts us.
        progressed = snapshot.committed > self._committed_at_ping
        self._committed_at_ping = snapshot.committed
        if progressed or snapshot.pending == 0:
            self._notifier.watchdog()
            if self._stalled:
                log.info("pipeline progressing again; watchdog pings resumed")
            self._stalled = False
        elif not self._stalled:
            self._stalled = True
            log.warning("no invoice committed for %.1fs with %d pending; withholding watchdog pings",
                        self._ping_interval or 0.0, snapshot.pending,
                        extra={"pending": snapshot.pending, "state": snapshot.state})
