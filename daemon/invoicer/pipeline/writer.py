"""StorageWriter: one thread committing the consumers' rows in batches, and keeping stored_through."""

from __future__ import annotations

import contextlib
import queue
import threading
import time

from invoicer.intake import ByteBudget, OrderChunk
from invoicer.pipeline import POLL_S, WAKE_UP, WRITER_BATCH, FatalHandler, Part
from invoicer.storage import Batch, RecoveryPlan, Row, Run, Storage
from invoicer.workqueue import Chunk


class StoredRuns:
    """``through`` (every number up to it is stored) and the runs of stored numbers above it.

    Runs that touch merge as they arrive, so this holds one entry per gap left by work still in flight,
    however long a hung call holds ``through`` back. Saved with every commit, so recovery reads these
    few runs instead of the rows.
    """

    def __init__(self, through: int, runs: tuple[Run, ...] = ()) -> None:
        self.through = through
        self._last_of: dict[int, int] = {}   # first -> last
        self._first_of: dict[int, int] = {}  # last -> first
        for first, last in runs:
            self.add(first, last)

    def add(self, first: int, last: int) -> None:
        """Record that ``first..last`` are stored."""
        first = max(first, self.through + 1)
        if last < first:
            return
        if (left := self._first_of.pop(first - 1, None)) is not None:
            del self._last_of[left]
            first = left
        if (right := self._last_of.pop(last + 1, None)) is not None:
            del self._first_of[right]
            last = right
        if first == self.through + 1:
            self.through = last
        else:
            self._last_of[first] = last
            self._first_of[last] = first

    def add_numbers(self, numbers: Chunk) -> None:
        """Record a part's numbers: one run for a range, else one per stretch of consecutive numbers."""
        if not numbers:
            return
        if type(numbers) is OrderChunk:
            numbers = numbers.numbers
        if isinstance(numbers, range) and numbers.step == 1:
            self.add(numbers.start, numbers.stop - 1)
            return
        first = previous = numbers[0]
        for number in numbers[1:]:
            if number != previous + 1:
                self.add(first, previous)
                first = number
            previous = number
        self.add(first, previous)

    def runs(self) -> tuple[Run, ...]:
        """Return the runs above ``through``, in order."""
        return tuple(sorted(self._last_of.items()))

    def __len__(self) -> int:
        return len(self._last_of)


class StorageWriter:
    """One thread: collects rows from the consumers and commits them in batches (group commit).

    It also keeps ``stored_through`` - the highest number below which everything is stored - and the
    runs stored above it, and saves both with each batch, which is what keeps recovery from reading the
    table.
    """

    def __init__(self, storage: Storage, results: queue.Queue[Part], plan: RecoveryPlan,
                 on_fatal: FatalHandler, batch_size: int = WRITER_BATCH, *,
                 budget: ByteBudget | None = None) -> None:
        self._storage = storage
        self._budget = budget  # given back the payload bytes of what it committed
        self._results = results
        self._on_fatal = on_fatal
        self._batch_size = batch_size
        self._stored = StoredRuns(plan.stored_through, plan.runs)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="invoicer-writer", daemon=True)
        # Written by the writer thread only, after each commit; others just read them.
        self.committed_total = 0  # rows committed in this run
        self.busy_since = 0.0     # monotonic time the current commit began (0: not committing)

    @property
    def stored_through(self) -> int:
        """Every number up to this one is stored (and committed)."""
        return self._stored.through

    @property
    def gaps(self) -> int:
        """Runs stored above stored_through: gaps left by work in flight (bounded by it)."""
        return len(self._stored)

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
        stored = StoredRuns(self._stored.through, self._stored.runs())  # moves on only after the commit
        ok: list[object] = []
        failed: list[Row] = []
        weight = 0
        for part in parts:
            stored.add_numbers(part.numbers)
            ok += part.batch.ok
            failed += part.batch.failed
            weight += part.weight
        batch = Batch(ok, failed)
        self.busy_since = time.monotonic()
        self._storage.save_batch(batch, stored.through, stored.runs())
        self.busy_since = 0.0
        self._stored = stored
        self.committed_total += len(batch)
        if weight and self._budget is not None:
            self._budget.give_back(weight)
