"""The daemon: owns the lifecycle (DESIGN §3). Start-up, the main loop and the one shutdown sequence."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from invoicer import __version__
from invoicer.config import Config
from invoicer.generator import InvoiceNumberGenerator
from invoicer.notify import Notifier, watchdog_interval
from invoicer.observer import Observer, Snapshot, status_line
from invoicer.pipeline import (
    Chunk,
    ConsumerPool,
    Producer,
    StorageWriter,
    chunk_size,
    queued_numbers,
)
from invoicer.storage import RecoveryPlan, Row, Storage, StorageError

log = logging.getLogger("invoicer")

EX_SOFTWARE = 70          # sysexits.h: an internal failure (a broken loop)
DRAIN_TIMEOUT_S = 90.0    # past this the drain is abandoned; what is left is recovered at the next start
WAIT_STEP_S = 0.05        # how often the main thread re-checks its events while it waits for a thread
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _AbandonDrainError(Exception):
    """The drain cannot finish (a second signal, the deadline, a fatal error): stop at once."""

    def __init__(self, reason: str, exit_code: int) -> None:
        super().__init__(reason)
        self.exit_code = exit_code


class Daemon:
    """Runs the pipeline until a stop signal, then drains it; ``run()`` returns the exit code."""

    def __init__(self, config: Config, processor: Callable[[int], Any],
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._processor = processor
        self._notifier = notifier or Notifier()
        self._storage = Storage(config.database)
        # Signal handlers and failing threads only record here; the main thread acts on it.
        self._events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._state = "starting"

    # -- start-up -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Open, recover, start, wait for a signal or a failure, stop; return the process exit code."""
        log.info("starting invoicer %s", __version__, extra={"pid": os.getpid(), **self.config.summary()})
        try:
            self._storage.open()
            plan = self._storage.recovery_plan()
        except StorageError as exc:
            log.error("%s", exc, extra={"exit_code": exc.exit_code})
            return exc.exit_code
        log.info("recovery: %d invoice numbers to process first", len(plan.missing), extra={
            "recovered": len(plan.missing), "high_water": plan.high_water,
            "stored_through": plan.stored_through, "stored_total": plan.stored_total})
        self._build(plan)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        self._state = "recovering" if plan.missing else "running"
        self._writer.start()
        self._pool.start()
        self._producer.start()
        self._notifier.ready(status_line(self._snapshot(), 0.0))
        self._observer.start()
        log.info("ready", extra={"workers": self.config.workers, "database": str(self.config.database)})
        return self._main_loop()

    def _build(self, plan: RecoveryPlan) -> None:
        config = self.config
        chunk = chunk_size(config.queue_size)
        self._plan = plan
        self._work: queue.Queue[Chunk | None] = queue.Queue(maxsize=max(1, config.queue_size // chunk))
        self._results: queue.Queue[list[Row] | None] = queue.Queue(maxsize=max(8, 2 * config.workers))
        self._generator = InvoiceNumberGenerator(self._storage, plan.high_water)
        self._producer = Producer(self._generator, self._work, plan.missing, chunk, self._on_fatal)
        self._pool = ConsumerPool(self._processor, self._work, self._results, config.workers,
                                  self._on_fatal)
        self._writer = StorageWriter(self._storage, self._results, plan, self._on_fatal)
        self._observer = Observer(self._snapshot, self._notifier, config.status_interval,
                                  watchdog_interval(os.environ, os.getpid()))

    # -- recording (signal handlers and other threads) ------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._events.put(("signal", signum, None))  # SimpleQueue.put is safe in a signal handler

    def _on_fatal(self, where: str, exc: BaseException) -> None:
        self._events.put(("fatal", where, exc))

    def _snapshot(self) -> Snapshot:
        writer = self._writer
        state = self._state
        if state == "recovering" and writer.stored_through >= self._plan.high_water:
            state = self._state = "running"
        return Snapshot(
            state=state, workers=self._pool.workers,
            stored_total=self._plan.stored_total + writer.committed_total,
            committed=writer.committed_total,
            pending=self._producer.queued_total - writer.committed_total,
            queue_depth=queued_numbers(self._work))

    # -- the main thread ------------------------------------------------------------------------------

    def _main_loop(self) -> int:
        while True:
            kind, what, detail = self._events.get()
            if kind == "signal" and what in STOP_SIGNALS:
                return self._shutdown(signal.Signals(what).name)
            if kind == "fatal":
                self._die(f"{what} failed: {detail}", detail)

    def _shutdown(self, reason: str) -> int:
        """Stop producing, drain the queue and the in-flight invoices, flush, report, exit 0."""
        started = time.monotonic()
        deadline = started + DRAIN_TIMEOUT_S
        committed_before = self._writer.committed_total
        self._state = "draining"
        log.info("%s received: draining", reason, extra={"pending": self._snapshot().pending})
        try:
            self._producer.stop()
            self._wait(self._producer.join, deadline)
            self._pool.retire_all(lambda item: self._put(self._work, item, deadline))
            self._wait(self._pool.join, deadline)
            self._writer.stop()
            self._wait(self._writer.join, deadline)
            self._storage.release(self._generator.last_issued)
        except _AbandonDrainError as exc:
            self._abandon(str(exc), exc.exit_code)
        except StorageError as exc:
            self._die(str(exc), exc)
        self._observer.stop()
        self._observer.join()
        self._state = "stopped"
        snapshot = self._snapshot()
        log.info("drained and stopped", extra={
            "drained": self._writer.committed_total - committed_before,
            "seconds": round(time.monotonic() - started, 3), "stored_total": snapshot.stored_total,
            "last_number": self._generator.last_issued, "pending": snapshot.pending})
        self._notifier.status(f"stopped: {snapshot.stored_total:,} stored")
        self._notifier.stopping()
        self._notifier.close()
        self._storage.close()
        return 0

    def _wait(self, step: Callable[[float], bool], deadline: float) -> None:
        """Call ``step(timeout)`` until it returns True, watching for signals, failures, the deadline."""
        while not step(WAIT_STEP_S):
            self._check_events(deadline)

    def _put(self, target: queue.Queue[Any], item: Any, deadline: float) -> bool:
        while True:
            try:
                target.put(item, timeout=WAIT_STEP_S)
                return True
            except queue.Full:
                self._check_events(deadline)

    def _check_events(self, deadline: float) -> None:
        try:
            kind, what, detail = self._events.get_nowait()
        except queue.Empty:
            if time.monotonic() > deadline:
                reason = f"drain did not finish within {DRAIN_TIMEOUT_S:g}s"
                raise _AbandonDrainError(reason, EX_SOFTWARE) from None
            return
        if kind == "signal":
            raise _AbandonDrainError(f"second {signal.Signals(what).name} during the drain", 128 + what)
        if kind == "fatal":
            self._die(f"{what} failed during the drain: {detail}", detail)

    def _abandon(self, reason: str, exit_code: int) -> None:
        snapshot = self._snapshot()
        log.warning("%s: stopping at once; %d unfinished invoice numbers will be recovered at the next "
                    "start", reason, snapshot.pending, extra={"pending": snapshot.pending,
                                                              "exit_code": exit_code})
        self._notifier.status(f"stopped at once: {snapshot.pending:,} left for recovery")
        self._exit_now(exit_code)

    def _die(self, message: str, exc: BaseException) -> None:
        exit_code = exc.exit_code if isinstance(exc, StorageError) else EX_SOFTWARE
        log.critical("%s", message, exc_info=(type(exc), exc, exc.__traceback__),
                     extra={"exit_code": exit_code})
        self._notifier.status(f"failed: {message}")
        self._exit_now(exit_code)

    @staticmethod
    def _exit_now(exit_code: int) -> None:
        # Worker threads may be blocked anywhere (a hung processor); don't wait for them. Whatever was
        # not committed is <= the high-water mark and is recovered at the next start.
        for handler in logging.getLogger("invoicer").handlers:
            handler.flush()
        sys.stdout.flush()
        os._exit(exit_code)
