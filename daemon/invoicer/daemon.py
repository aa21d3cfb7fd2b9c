"""The daemon: owns the lifecycle (DESIGN §3). Start-up, the main loop and the one shutdown sequence."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from invoicer import __version__, control
from invoicer.config import (
    RELOADABLE,
    Config,
    ConfigError,
    changed_settings,
    environment_file,
    load_config,
    read_environment_file,
    resolve_consumer_cpu,
)
from invoicer.generator import MAX_BLOCK_SIZE, InvoiceNumberGenerator
from invoicer.notify import Notifier, watchdog_interval
from invoicer.observer import Observer, Snapshot, status_line
from invoicer.pipeline import RESULTS_ROOM, ConsumerPool, Part, Producer, StorageWriter, chunk_for, max_chunk
from invoicer.storage import RecoveryPlan, Storage, StorageError
from invoicer.workqueue import WorkQueue

log = logging.getLogger("invoicer")

EX_SOFTWARE = 70          # sysexits.h: an internal failure (a broken loop)
DRAIN_STALL_S = 30.0      # a drain that commits nothing for this long is abandoned (recovered next start)
WAIT_STEP_S = 0.05        # how often the main thread re-checks its events while it waits for a thread
SAME_STOP_S = 0.25        # a stop signal this soon after the first is the same request, not a second one
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


class _AbandonDrainError(Exception):
    """The drain cannot finish (a second signal, a stall): stop at once."""

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
        # What reload starts from: the environment we were started with, less what came from the file.
        self._start_env = dict(os.environ)
        self._environment_file = environment_file(self._start_env)
        self._reload_state = control.state_path(self._start_env, config.database)
        self._reloads = 0
        self._stop_signal_at = 0.0
        self._file_keys: frozenset[str] = frozenset()

    # -- start-up -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Open, recover, start, wait for a signal or a failure, stop; return the process exit code."""
        log.info("starting invoicer %s", __version__, extra={"pid": os.getpid(), **self.config.summary()})
        for signum in HANDLED_SIGNALS:  # early: a stop or reload during start-up is acted on once running
            signal.signal(signum, self._on_signal)
        try:
            self._file_keys = frozenset(read_environment_file(self._environment_file))
        except ConfigError as exc:
            log.warning("%s; reload will not be able to tell its variables from the rest", exc)
        try:
            self._storage.open()
            plan = self._storage.recovery_plan()
        except StorageError as exc:
            log.error("%s", exc, extra={"exit_code": exc.exit_code})
            self._notifier.status(f"failed: {exc}")
            return exc.exit_code
        log.info("recovery: %d invoice numbers to process first", len(plan.missing), extra={
            "recovered": len(plan.missing), "high_water": plan.high_water,
            "stored_through": plan.stored_through, "stored_total": plan.stored_total})
        self._build(plan)
        self._state = "running"
        self._writer.start()
        self._pool.start()
        self._producer.start()
        self._notifier.ready(status_line(self._snapshot(), 0.0))
        self._observer.start()
        log.info("ready", extra={"workers": self.config.workers, "database": str(self.config.database),
                                 "consumer_cpu": self._pool.cpu})
        self._record_reload(ok=True, message="started")
        return self._main_loop()

    def _build(self, plan: RecoveryPlan) -> None:
        config = self.config
        largest = max_chunk(config.queue_size)
        self._plan = plan
        self._work = WorkQueue(config.queue_size)
        self._results: queue.Queue[Part] = queue.Queue(maxsize=2 * config.workers + RESULTS_ROOM)
        self._generator = InvoiceNumberGenerator(self._storage, plan.high_water,
                                                 max_block_size=MAX_BLOCK_SIZE)
        self._pool = ConsumerPool(self._processor, self._work, self._results, config.workers,
                                  self._on_fatal,
                                  cpu=resolve_consumer_cpu(config.consumer_cpu, os.sched_getaffinity(0)))
        self._producer = Producer(self._generator, self._work, plan.missing,
                                  lambda: chunk_for(self._pool.invoice_seconds, largest), self._on_fatal)
        self._writer = StorageWriter(self._storage, self._results, plan, self._on_fatal)
        self._observer = Observer(self._snapshot, self._notifier, config.status_interval,
                                  watchdog_interval(os.environ, os.getpid()))

    # -- recording (signal handlers and other threads) ------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._events.put(("signal", signum, time.monotonic()))  # SimpleQueue.put is signal-safe

    def _on_fatal(self, where: str, exc: BaseException) -> None:
        self._events.put(("fatal", where, exc))

    def _snapshot(self) -> Snapshot:
        writer = self._writer
        state = self._state
        # Recovering until every number owed at start-up is stored (stored_through only grows).
        if state == "running" and self._plan.missing and writer.stored_through < self._plan.high_water:
            state = "recovering"
        return Snapshot(
            state=state, workers=self._pool.workers,
            stored_total=self._plan.stored_total + writer.committed_total,
            committed=writer.committed_total,
            pending=self._pending(),
            queue_depth=self._work.depth(),
            admitted=self._pool.gate.limit)

    def _pending(self) -> int:
        """Numbers handed to the pipeline and not yet committed."""
        return self._producer.queued_total - self._writer.committed_total

    # -- the main thread ------------------------------------------------------------------------------

    def _main_loop(self) -> int:
        while True:
            kind, what, detail = self._events.get()
            if kind == "signal" and what in STOP_SIGNALS:
                self._stop_signal_at = detail
                return self._shutdown(signal.Signals(what).name)
            if kind == "signal" and what == signal.SIGHUP:
                self._reload()
            if kind == "fatal":
                self._die(f"{what} failed: {detail}", detail)

    # -- reload ---------------------------------------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the environment file; apply INVOICER_WORKERS and INVOICER_LOG_LEVEL in place."""
        self._notifier.reloading(time.monotonic_ns() // 1000)
        try:
            new = self._read_config()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            ok, message = False, f"reload refused: {exc}"
        else:
            changed = changed_settings(self.config, new)
            for name in changed:
                if name not in RELOADABLE:
                    log.warning("INVOICER_%s changed in %s; it takes effect at the next restart",
                                name.upper(), self._environment_file, extra={"setting": name})
            if new.workers != self.config.workers:
                self._pool.resize(new.workers)
            logging.getLogger("invoicer").setLevel(new.log_level)
            self.config = dataclasses.replace(self.config, workers=self._pool.workers,
                                              log_level=new.log_level)
            ok, message = True, f"reloaded: {self.config.workers} workers, log level {new.log_level}"
            log.info("reloaded", extra={"workers": self.config.workers, "log_level": new.log_level,
                                        "changed": changed})
        self._notifier.ready(status_line(self._snapshot(), self._observer.rate))
        self._record_reload(ok=ok, message=message)

    def _read_config(self) -> Config:
        # A variable deleted from the file since start falls back to its default, not its old value.
        values = read_environment_file(self._environment_file)
        env = {k: v for k, v in self._start_env.items() if k not in self._file_keys} | values
        return load_config(env)

    def _record_reload(self, *, ok: bool, message: str) -> None:
        record = control.ReloadRecord(os.getpid(), self._reloads, ok, message)
        self._reloads += 1
        try:
            control.write_record(self._reload_state, record)
        except OSError as exc:
            log.warning("cannot write the reload record %s (%s); `invoicer reload` will not be able to "
                        "confirm reloads", self._reload_state, exc)

    def _shutdown(self, reason: str) -> int:
        """Stop producing, drain the queue and the in-flight invoices, flush, report, exit 0."""
        started = time.monotonic()
        committed_before = self._writer.committed_total
        self._state = "draining"
        log.info("%s received: draining", reason, extra={"pending": self._snapshot().pending})
        try:
            self._producer.stop()
            self._wait(self._producer.join)
            self._pool.retire_all()
            self._wait(self._pool.join)
            self._writer.stop()
            self._wait(self._writer.join)
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
        with contextlib.suppress(OSError):  # the record of a process that no longer runs
            self._reload_state.unlink()
        return 0

    def _wait(self, step: Callable[[float], bool]) -> None:
        """Call ``step(timeout)`` until it returns True, watching for signals, failures and a stall.

        The drain's deadline moves with its progress: it is abandoned only once nothing has been
        committed for DRAIN_STALL_S while work is still pending.
        """
        committed = self._writer.committed_total
        deadline = time.monotonic() + DRAIN_STALL_S
        while not step(WAIT_STEP_S):
            self._check_events()
            now = time.monotonic()
            if self._writer.committed_total != committed or self._pending() == 0:
                committed = self._writer.committed_total
                deadline = now + DRAIN_STALL_S
            elif now > deadline:
                raise _AbandonDrainError(f"the drain committed nothing for {DRAIN_STALL_S:g}s", EX_SOFTWARE)

    def _check_events(self) -> None:
        try:
            kind, what, detail = self._events.get_nowait()
        except queue.Empty:
            return
        if kind == "signal" and what in STOP_SIGNALS:
            if detail - self._stop_signal_at < SAME_STOP_S:
                # One request, delivered twice: GNU timeout signals the child and then its process group.
                log.info("%s again within %gs: the same stop request", signal.Signals(what).name, SAME_STOP_S)
                return
            raise _AbandonDrainError(f"second {signal.Signals(what).name} during the drain", 128 + what)
        if kind == "signal":
            log.warning("%s ignored: the daemon is draining", signal.Signals(what).name)
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
