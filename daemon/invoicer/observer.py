"""Observer: each tick, housekeeping, then STATUS=, the watchdog decision and the throughput log."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from invoicer.notify import Notifier

log = logging.getLogger("invoicer")

RATE_WINDOW_S = 5.0     # the rate shown is the average over this window
LOG_INTERVAL_S = 10.0   # a JSON throughput record this often
MAX_TICK_S = 1.0        # ticks at least this often: deadlines, health and stop extensions follow them
EXTEND_MARGIN_S = 5.0   # what a drain's EXTEND_TIMEOUT_USEC= asks beyond the next tick


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
    problem: str = ""   # why the pipeline is not healthy ("": it is)
    problem_age: float = 0.0  # seconds the problem has lasted
    paused: str = ""    # the error that paused intake ("": not paused)
    abandoned: int = 0  # given-up processor calls whose threads still run
    failed: int = 0     # rows committed as failed by this run
    oldest_call: float = 0.0      # seconds the oldest processor call under way has been running
    recovery_backlog: int = 0     # numbers owed at start-up and not yet stored


def status_line(snapshot: Snapshot, rate: float) -> str:
    """Format the one ASCII line for STATUS=, e.g. ``running: 8 workers, 1,234 invoices/s, ...``."""
    parts = [f"{snapshot.workers} workers", f"{rate:,.0f} invoices/s", f"{snapshot.stored_total:,} stored",
             f"queue {snapshot.queue_depth:,}"]
    if 0 < snapshot.admitted < snapshot.workers:
        parts.append(f"{snapshot.admitted} at once")
    if snapshot.abandoned:
        parts.append(f"{snapshot.abandoned} hung calls abandoned")
    if snapshot.state == "draining":
        parts.insert(0, f"{snapshot.pending:,} left")
    head = snapshot.state
    if snapshot.problem:
        head = f"{snapshot.state}, stalled: {snapshot.problem};"
    elif snapshot.paused:
        head = f"paused: {snapshot.paused};" if snapshot.state != "draining" else (
            f"draining, paused: {snapshot.paused};")
    else:
        head += ":"
    return f"{head} {', '.join(parts)}"


class Observer:
    """One thread; ``tick(now)`` does one housekeeping-sample-notify-ping-log pass (tests call it)."""

    def __init__(self, sample: Callable[[], Snapshot], notifier: Notifier, status_interval: float,
                 watchdog_timeout: float | None, *,
                 housekeeping: Callable[[float], None] = lambda now: None,
                 on_fatal: Callable[[str, BaseException], None] | None = None,
                 drain_stall: float = 0.0, metrics: Any = None) -> None:
        self._sample = sample
        self._metrics = metrics  # a MetricsFile (INVOICER_METRICS_FILE), rewritten with each STATUS=
        self._housekeeping = housekeeping
        self._on_fatal = on_fatal
        self._notifier = notifier
        self._status_interval = status_interval
        # A stalled drain ends itself after this long; until then its stop timeout is still extended,
        # so that the daemon's own exit (and log line) comes before systemd's SIGKILL.
        self._drain_stall = drain_stall
        self._watchdog = watchdog_timeout is not None
        # Health is decided on every tick, so ticks come often enough to ping at half the timeout.
        self.tick_interval = min(status_interval, MAX_TICK_S, (watchdog_timeout or MAX_TICK_S * 2) / 2)
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._next_status = 0.0
        self._next_log = 0.0
        self._withheld = False
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
        try:
            while True:
                self.tick(time.monotonic())
                if self._stop.wait(self.tick_interval):
                    return
        except BaseException as exc:  # without the observer nobody reaps, reports or pings: end loudly
            if self._on_fatal is None:
                raise
            self._on_fatal("observer", exc)

    def tick(self, now: float) -> Snapshot:
        """Do housekeeping, sample once, then send STATUS=, ping the watchdog and log as each is due."""
        self._housekeeping(now)
        snapshot = self._sample()
        self.rate = self._update_rate(now, snapshot.committed)
        if now >= self._next_status:
            self._notifier.status(status_line(snapshot, self.rate))
            if self._metrics is not None:
                self._metrics.write(snapshot, self.rate)
            self._next_status = now + self._status_interval
        healthy = not snapshot.problem
        if self._watchdog:
            self._ping(snapshot, healthy=healthy)
        if snapshot.state == "draining" and (healthy or snapshot.problem_age < self._drain_stall):
            self._notifier.extend_timeout(self.tick_interval + EXTEND_MARGIN_S)
        if now >= self._next_log:
            log.info("throughput", extra={
                "rate": round(self.rate, 1), "stored_total": snapshot.stored_total,
                "queue_depth": snapshot.queue_depth, "workers": snapshot.workers,
                "pending": snapshot.pending, "state": snapshot.state, "admitted": snapshot.admitted,
                "paused": snapshot.paused, "problem": snapshot.problem, "abandoned": snapshot.abandoned})
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

    def _ping(self, snapshot: Snapshot, *, healthy: bool) -> None:
        # Ping only while healthy; a frozen pipeline stays silent and systemd restarts it.
        if healthy:
            self._notifier.watchdog()
            if self._withheld:
                log.info("pipeline healthy again; watchdog pings resumed")
            self._withheld = False
        elif not self._withheld:
            self._withheld = True
            log.warning("pipeline stalled: %s; withholding watchdog pings", snapshot.problem,
                        extra={"problem": snapshot.problem, "pending": snapshot.pending,
                               "state": snapshot.state})
