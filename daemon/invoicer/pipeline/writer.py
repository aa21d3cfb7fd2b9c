"""StorageWriter: one thread committing the consumers' rows in batches through the storage's ledger."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Any

from invoicer.intake import ByteBudget
from invoicer.pipeline import POLL_S, WAKE_UP, WRITER_BATCH, FatalHandler, Part
from invoicer.storage import Batch, RecoveryPlan, Row, StoredRuns

__all__ = ["StorageWriter", "StoredRuns"]


class StorageWriter:
    """One thread: collects rows from the consumers and commits them in batches (group commit).

    Each commit goes through the backend's ledger, which stores its own bookkeeping in the same
    transaction (SQLite: ``stored_through`` and the runs above it; PostgreSQL: the blocks' fences).
    """

    def __init__(self, storage: Any, results: queue.Queue[Part], plan: RecoveryPlan,
                 on_fatal: FatalHandler, batch_size: int = WRITER_BATCH, *,
                 budget: ByteBudget | None = None) -> None:
        self._storage = storage
        self._budget = budget  # given back the payload bytes of what it committed
        self._results = results
        self._on_fatal = on_fatal
        self._batch_size = batch_size
        self._ledger = storage.ledger(plan)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-writer", daemon=True)
        # Written by the writer thread only, after each commit; others just read them.
        self.committed_total = 0  # rows committed in this run
        self.failed_total = 0     # ... of them failed invoices
        self.busy_since = 0.0     # monotonic time the current commit began (0: not committing)

    @property
    def stored_through(self) -> int:
        """Every number up to this one is stored (and committed)."""
        return int(self._ledger.stored_through)

    @property
    def gaps(self) -> int:
        """Runs stored above stored_through: gaps left by work in flight (bounded by it)."""
        return int(self._ledger.gaps)

    def start(self) -> None:
        """Start writing."""
        self._thread.start()

    def stop(self) -> None:
        """Ask the writer to commit what is queued and end; call it once the consumers have ended."""
        self._stop.set()
        with contextlib.suppress(queue.Full):  # an empty batch wakes it now rather than at its next poll
            self._results.put_nowait(WAKE_UP)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            while True:
                try:
                    parts = [self._results.get(timeout=POLL_S)]
                except queue.Empty:
                    if self._stop.is_set():
                        return  # the consumers have ended, so nothing more can arrive
                    continue
                count = len(parts[0].numbers)
                while count < self._batch_size:  # whatever else is waiting joins this commit
                    try:
                        parts.append(self._results.get_nowait())
                    except queue.Empty:
                        break
                    count += len(parts[-1].numbers)
                if count:
                    self._commit(parts)
                elif self._stop.is_set() and self._results.empty():
                    return
        except BaseException as exc:  # storage failure: end loudly; uncommitted rows are recovered
            self._on_fatal("writer", exc)

    def _commit(self, parts: list[Part]) -> None:
        ok: list[object] = []
        failed: list[Row] = []
        weight = 0
        for part in parts:
            ok += part.batch.ok
            failed += part.batch.failed
            weight += part.weight
        batch = Batch(ok, failed)
        self.busy_since = time.monotonic()
        self._ledger.commit(batch, [part.numbers for part in parts])
        self.busy_since = 0.0
        self.committed_total += len(batch)
        self.failed_total += len(failed)
        if weight and self._budget is not None:
            self._budget.give_back(weight)
