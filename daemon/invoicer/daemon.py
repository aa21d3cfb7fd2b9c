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
    environment_files,
    load_config,
    read_environment_files,
    resolve_consumer_cpu,
    unknown_variables,
)
from invoicer.generator import MAX_BLOCK_SIZE, InvoiceNumberGenerator
from invoicer.intake import ByteBudget, DemoSource, OrderSource, Recovery
from invoicer.metrics import MetricsFile
from invoicer.notify import Notifier, watchdog_interval
from invoicer.observer import Observer, Snapshot, status_line
from invoicer.outage import OutageBreaker
from invoicer.pipeline import RESULTS_ROOM, ConsumerPool, Part, Producer, StorageWriter, chunk_for, max_chunk
from invoicer.processing import order_checker
from invoicer.storage import EX_TEMPFAIL, RecoveryPlan, StorageError, open_storage
from invoicer.workqueue import WorkQueue

log = logging.getLogger("invoicer")

EX_SOFTWARE = 70          # sysexits.h: an internal failure (a broken loop)
# A drain that stays stalled (or paused by an outage) this long is abandoned, its numbers recovered at the
# next start: below the unit's TimeoutStopSec=30s, so the daemon's own exit beats systemd's SIGKILL.
DRAIN_STALL_S = 20.0
SHARED_BLOCK_SECONDS = 0.25  # PostgreSQL's demo blocks: 1/8 to 1 s of work each ...
SHARED_MIN_BLOCK = 16        # ... from 16 numbers up
STALL_S = 10.0            # a commit or a reservation running this long means the storage is stalled
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

    def __init__(self, config: Config, processor: Callable[..., Any],
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._processor = processor
        self._notifier = notifier or Notifier()
        self._storage = open_storage(config)
        # Signal handlers and failing threads only record here; the main thread acts on it.
        self._events: queue.SimpleQueue[tuple[str, Any, Any]] = queue.SimpleQueue()
        self._state = "starting"
        # What reload starts from: the environment we were started with, less what came from the file.
        self._start_env = dict(os.environ)
        self._environment_files = environment_files(self._start_env)
        self._environment_file = " and ".join(map(str, self._environment_files))  # for messages
        self._reload_state = control.state_path(self._start_env, config.database,
                                                os.getpid() if config.postgresql else None)
        self._reloads = 0
        self._stop_signal_at = 0.0
        self._file_keys: frozenset[str] = frozenset()
        self._metrics: MetricsFile | None = None  # built with the pipeline (INVOICER_METRICS_FILE)
        watchdog = watchdog_interval(os.environ, os.getpid())
        self._watchdog = watchdog
        self._stall_s = min(STALL_S, watchdog / 2) if watchdog else STALL_S
        # Written by the observer thread each tick (housekeeping); read by the main thread and STATUS=.
        self._problem = ""
        self._problem_since = 0.0  # when the current problem began (monotonic)
        self._progress = (0, 0.0)  # (committed, when it last changed or was legitimately still)

    # -- start-up -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Open, recover, start, wait for a signal or a failure, stop; return the process exit code."""
        log.info("starting invoicer %s", __version__, extra={"pid": os.getpid(), **self.config.summary()})
        for signum in HANDLED_SIGNALS:  # early: a stop or reload during start-up is acted on once running
            signal.signal(signum, self._on_signal)
        try:
            self._file_keys = frozenset(read_environment_files(self._environment_files))
        except ConfigError as exc:
            log.warning("%s; reload will not be able to tell its variables from the rest", exc)
        try:
            self._storage.open()
            self._storage.open_reader()
            plan = self._storage.recovery_plan()
        except StorageError as exc:
            log.error("%s", exc, extra={"exit_code": exc.exit_code})
            self._notifier.status(f"failed: {exc}")
            return exc.exit_code
        log.info("recovery: %d invoice numbers to process first", plan.missing_total, extra={
            "recovered": plan.missing_total, "ranges": len(plan.missing), "high_water": plan.high_water,
            "stored_through": plan.stored_through, "stored_total": plan.stored_total})
        self._build(plan)
        self._storage.patient = True  # from now on another program's write lock is waited out
        self._state = "running"
        self._progress = (0, time.monotonic())  # "nothing committed for Ns" counts from here, not boot
        self._writer.start()
        self._pool.start()
        self._producer.start()  # it starts the source once the recovered numbers are queued
        self._notifier.ready(status_line(self._snapshot(), 0.0))
        log.info("ready", extra={"workers": self.config.workers, "database": self.config.database_name,
                                 "consumer_cpu": self._pool.cpu})
        self._observer.start()  # after "ready": its first throughput record follows it in the log
        self._record_reload(ok=True, message="started")
        return self._main_loop()

    def _build(self, plan: RecoveryPlan) -> None:
        config = self.config
        self._largest_chunk = max_chunk(config.queue_size)
        self._plan = plan
        self._work = WorkQueue(config.queue_size)
        self._results: queue.Queue[Part] = queue.Queue(maxsize=2 * config.workers + RESULTS_ROOM)
        self._budget = ByteBudget(config.inflight_bytes)
        check = order_checker(self._processor)
        self._source: DemoSource | OrderSource
        if config.source == "demo":
            self._source = DemoSource(
                self._generator(plan),
                Recovery(self._storage, self._budget, check, config.order_max_bytes))
        else:
            self._source = OrderSource(self._storage, plan.high_water, self._budget, check,
                                       max_order_bytes=config.order_max_bytes, on_fatal=self._on_fatal)
        breaker = OutageBreaker(config.workers)
        self._pool = ConsumerPool(self._processor, self._work, self._results, config.workers,
                                  self._on_fatal, timeout=config.invoice_timeout, breaker=breaker,
                                  cpu=resolve_consumer_cpu(config.consumer_cpu, os.sched_getaffinity(0)))
        self._producer = Producer(self._source, self._work, plan.missing,
                                  self._chunk_size, self._on_fatal,
                                  breaker=breaker, results=self._results)
        self._writer = StorageWriter(self._storage, self._results, plan, self._on_fatal,
                                     budget=self._budget)
        self._metrics = MetricsFile(config.metrics_file) if config.metrics_file else None
        self._observer = Observer(self._snapshot, self._notifier, config.status_interval, self._watchdog,
                                  housekeeping=self._housekeeping, on_fatal=self._on_fatal,
                                  drain_stall=DRAIN_STALL_S, metrics=self._metrics)

    def _chunk_size(self) -> int:
        """Numbers per work-queue chunk now (follows the measured invoice time)."""
        return chunk_for(self._pool.invoice_seconds, self._largest_chunk)

    def _generator(self, plan: RecoveryPlan) -> InvoiceNumberGenerator:
        if self._storage.contiguous:
            return InvoiceNumberGenerator(self._storage, plan.high_water, max_block_size=MAX_BLOCK_SIZE)
        # PostgreSQL: a block is what a takeover, or a drain, must finish: keep it short
        return InvoiceNumberGenerator(self._storage, plan.high_water, SHARED_MIN_BLOCK,
                                      max_block_size=MAX_BLOCK_SIZE, block_seconds=SHARED_BLOCK_SECONDS)

    # -- recording (signal handlers and other threads) ------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._events.put(("signal", signum, time.monotonic()))  # SimpleQueue.put is signal-safe

    def _on_fatal(self, where: str, exc: BaseException) -> None:
        self._events.put(("fatal", where, exc))

    def _snapshot(self) -> Snapshot:
        writer = self._writer
        state = self._state
        # Recovering until every number owed at start-up is stored (stored_through only grows), or every
        # number taken over from another PostgreSQL instance.
        owed_at_start = bool(self._plan.missing) and writer.stored_through < self._plan.high_water
        if state == "running" and (owed_at_start or self._storage.recovering()):
            state = "recovering"
        elif state == "running" and self._producer.idle and not self._pending():
            state = "idle"  # no order waiting, nothing in flight
        breaker = self._pool.breaker
        return Snapshot(
            state=state, workers=self._pool.workers,
            stored_total=self._plan.stored_total + writer.committed_total,
            committed=writer.committed_total,
            pending=self._pending(),
            queue_depth=self._work.depth(),
            admitted=self._pool.gate.limit,
            problem=self._problem,
            problem_age=time.monotonic() - self._problem_since if self._problem else 0.0,
            paused=breaker.error if breaker.paused else "",
            abandoned=self._pool.abandoned,
            failed=writer.failed_total,
            oldest_call=self._pool.oldest_call(time.monotonic()),
            recovery_backlog=self._recovery_backlog(state))

    def _recovery_backlog(self, state: str) -> int:
        """Numbers owed at start-up (SQLite) or taken over (PostgreSQL) and not stored yet."""
        if state != "recovering":
            return 0
        owed = max(0, min(self._plan.missing_total, self._plan.high_water - self._writer.stored_through))
        return owed + int(self._storage.recovering())

    def _pending(self) -> int:
        """Numbers handed to the pipeline and not yet committed."""
        return self._producer.queued_total - self._writer.committed_total

    def _housekeeping(self, now: float) -> None:
        """One tick's work besides reporting (the observer thread): deadlines, the gate, health."""
        self._pool.reap(now)
        self._pool.gate.tick(now, time.process_time())
        problem = self._diagnose(now)
        if problem and not self._problem:
            self._problem_since = now
        self._problem = problem

    def _diagnose(self, now: float) -> str:
        """Why the pipeline is not healthy now ("" if it is): what the watchdog and the drain go by."""
        limit = self._stall_s
        if (since := self._writer.busy_since) and now - since > limit:
            return f"storage: a commit has not finished for {now - since:.0f}s"
        if (since := self._producer.busy_since) and now - since > limit:
            return f"storage: reserving invoice numbers has not finished for {now - since:.0f}s"
        if (since := self._source.busy_since) and now - since > limit:
            return f"storage: claiming orders has not finished for {now - since:.0f}s"
        pool = self._pool
        if pool.abandoned > pool.most_workers:
            return (f"{pool.abandoned} hung processor calls abandoned, more than the {pool.most_workers} "
                    "workers")
        committed = self._writer.committed_total
        pending = self._pending()
        # Not committing is legitimate while nothing is pending, intake is paused, or calls are under
        # way (each is bounded by the invoice deadline); otherwise the pipeline is stuck somewhere.
        if committed != self._progress[0] or not pending or pool.breaker.paused or pool.calls():
            self._progress = (committed, now)
        elif now - self._progress[1] > limit:
            quiet = now - self._progress[1]
            return f"{pending:,} invoices pending, none committed or processed for {quiet:.0f}s"
        return ""

    # -- the main thread ------------------------------------------------------------------------------

    def _main_loop(self) -> int:
        while True:
            kind, what, detail = self._next_event()
            if kind == "signal" and what in STOP_SIGNALS:
                self._stop_signal_at = detail
                return self._shutdown(signal.Signals(what).name)
            if kind == "signal" and what == signal.SIGHUP:
                self._reload()
            if kind == "fatal":
                self._die(f"{what} failed: {detail}", detail)

    def _next_event(self) -> tuple[str, Any, Any]:
        # A timeout, not a bare get(): a get() blocked in the lock did not always let the interpreter
        # run the SIGTERM handler that would wake it (1 stop in 10 hung, found by the test suite).
        while True:
            try:
                return self._events.get(timeout=WAIT_STEP_S * 10)
            except queue.Empty:
                continue

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
        values = read_environment_files(self._environment_files)
        for warning in unknown_variables(values):
            log.warning("%s (in %s)", warning, self._environment_file)
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
        """Stop producing, drain the queue and the in-flight invoices, flush, report; 0 if nothing is owed."""
        started = time.monotonic()
        committed_before = self._writer.committed_total
        self._state = "draining"
        # A drain must end: another program's write lock is waited out for the busy timeout only, then
        # the drain fails (exit 75) and the next start recovers what was not committed.
        self._storage.patient = False
        log.info("%s received: draining", reason, extra={"pending": self._snapshot().pending})
        try:
            self._producer.stop()
            self._wait(self._producer.join)
            self._source.stop()  # what it claimed and nobody took is given back by release() below ...
            self._wait(self._source.join)
            # ... or, where blocks stay owned (PostgreSQL), processed now, as long as the drain is healthy,
            # in chunks as the producer makes them (whole, a block went to one worker: 5 invoices/s)
            leftovers = list(self._source.leftovers())

            def queue_leftovers(timeout: float) -> bool:
                while leftovers:
                    chunk = leftovers[0][:self._chunk_size()]
                    if not self._producer.queue_leftover(chunk, timeout):
                        return False
                    leftovers[0] = leftovers[0][len(chunk):]
                    if not leftovers[0]:
                        leftovers.pop(0)
                return True
            self._wait(queue_leftovers)
            self._pool.retire_all()
            self._wait(self._pool.join)
            self._wait(self._pool.close)  # hands over what given-up calls left, while the writer runs
            self._writer.stop()
            self._wait(self._writer.join)
            self._storage.release(self._source.last_issued)
            self._check_events()  # a failure reported as a thread ended is still a failure
        except _AbandonDrainError as exc:
            self._abandon(str(exc), exc.exit_code)
        except StorageError as exc:
            self._die(str(exc), exc)
        self._observer.stop()
        self._observer.join()
        self._state = "stopped"
        snapshot = self._snapshot()
        if snapshot.pending:  # cannot happen while every step above kept its promise: say so loudly
            self._abandon(f"the drain ended with {snapshot.pending} numbers not committed", EX_SOFTWARE)
        log.info("drained and stopped", extra={
            "drained": self._writer.committed_total - committed_before,
            "seconds": round(time.monotonic() - started, 3), "stored_total": snapshot.stored_total,
            "last_number": self._source.last_issued, "pending": snapshot.pending,
            "abandoned": snapshot.abandoned})
        self._notifier.status(f"stopped: {snapshot.stored_total:,} stored")
        self._final_metrics(snapshot)
        self._notifier.stopping()
        self._notifier.close()
        self._storage.close()
        with contextlib.suppress(OSError):  # the record of a process that no longer runs
            self._reload_state.unlink()
        return 0

    def _wait(self, step: Callable[[float], bool]) -> None:
        """Call ``step(timeout)`` until it returns True, acting on signals and failures as they come.

        A drain may wait as long as it is healthy: committing, or waiting on calls younger than their
        deadline. It is abandoned once it has been stalled, or paused by an outage, for DRAIN_STALL_S.
        """
        healthy_at = time.monotonic()
        while True:
            done = step(WAIT_STEP_S)
            self._check_events()
            if done:
                return
            now = time.monotonic()
            snapshot = self._snapshot()
            if not snapshot.problem and not snapshot.paused:
                healthy_at = now
            elif now - healthy_at > DRAIN_STALL_S:
                if snapshot.problem:
                    raise _AbandonDrainError(f"the drain stalled for {DRAIN_STALL_S:g}s: {snapshot.problem}",
                                             EX_SOFTWARE)
                raise _AbandonDrainError(f"the processor's service stayed down for {DRAIN_STALL_S:g}s of "
                                         f"the drain ({snapshot.paused})", EX_TEMPFAIL)

    def _check_events(self) -> None:
        """Act on every event recorded so far (signals, failures) without waiting."""
        while True:
            try:
                kind, what, detail = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "signal" and what in STOP_SIGNALS:
                if detail - self._stop_signal_at < SAME_STOP_S:
                    # One request, delivered twice: GNU timeout signals the child and then its group.
                    log.info("%s again within %gs: the same stop request", signal.Signals(what).name,
                             SAME_STOP_S)
                    continue
                raise _AbandonDrainError(f"second {signal.Signals(what).name} during the drain", 128 + what)
            if kind == "signal":
                log.warning("%s ignored: the daemon is draining", signal.Signals(what).name)
            if kind == "fatal":
                self._die(f"{what} failed during the drain: {detail}", detail)

    def _final_metrics(self, snapshot: Snapshot) -> None:
        """Leave the metrics saying the process ended (however it ends, short of SIGKILL)."""
        if self._metrics is not None:
            with contextlib.suppress(Exception):  # the process is ending: nothing must stop it
                self._metrics.write(dataclasses.replace(snapshot, state="stopped"), 0.0)

    def _abandon(self, reason: str, exit_code: int) -> None:
        snapshot = self._snapshot()
        self._final_metrics(snapshot)
        owed = snapshot.pending + getattr(self._source, "claimed_ahead", 0)
        log.warning("%s: stopping at once; %d unfinished invoice numbers will be recovered at the next "
                    "start", reason, owed, extra={"pending": owed, "exit_code": exit_code})
        self._notifier.status(f"stopped at once: {snapshot.pending:,} left for recovery")
        end_process(exit_code)

    def _die(self, message: str, exc: BaseException) -> None:
        exit_code = exc.exit_code if isinstance(exc, StorageError) else EX_SOFTWARE
        if self._metrics is not None:
            self._final_metrics(self._snapshot())
        log.critical("%s", message, exc_info=(type(exc), exc, exc.__traceback__),
                     extra={"exit_code": exit_code})
        self._notifier.status(f"failed: {message}")
        end_process(exit_code)


def end_process(exit_code: int) -> None:
    """Flush the logs and exit now, without waiting for threads.

    Worker threads may be blocked anywhere (a hung processor call never returns), and the interpreter's
    own exit would join every ThreadPoolExecutor thread, a given-up one included. Whatever was not
    committed is <= the high-water mark and is recovered at the next start.
    """
    for handler in logging.getLogger("invoicer").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
