"""Storage: where invoices, orders and the numbering marks live, behind one small interface.

Two backends, one module each: :mod:`invoicer.storage.sqlite` (a file path: the embedded default, one
instance per database) and :mod:`invoicer.storage.postgresql` (a ``postgresql://`` URI: any number of
instances sharing one gap-free sequence). :func:`open_storage` picks one from ``INVOICER_DATABASE``.

What the pipeline uses (both backends have it):

* ``open()``, ``open_reader()``, ``recovery_plan()``, ``close()``, ``patient``: the life cycle;
* ``reserve(count)``: a block of new numbers (the demo source), ``claiming(...)``: orders paired with new
  numbers (the orders source), ``paired_orders(first, last)``: what recovery reprocesses;
* ``ledger(plan)``: what the writer commits through; ``Ledger.commit(batch, numbers)`` stores a
  :class:`Batch` and the backend's own bookkeeping (SQLite's marks, PostgreSQL's blocks) in one
  transaction;
* ``release(last_issued)``, ``take_over()``: a clean stop's leftovers, and other instances' (PostgreSQL).

This module holds what both share: the batch of rows a commit carries, the errors, the recovery plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, cast

# A processed invoice is stored from OK_WIDTH values, a failed one as a full Row of COLUMNS values.
OK_WIDTH = 9   # id, customer, currency, subtotal, tax, total, document, attempts, order id (0: none)
COLUMNS = 11   # a full Row, for failed invoices

# What a processed invoice stores besides its literals: id, customer, currency, subtotal, tax, total,
# document, attempts (OK_SELECT's order).
OkValues = tuple[int, str, str, str, str, str, str, int, int]
# first..last, a run of consecutive invoice numbers.
Run = tuple[int, int]
# An invoice row, in the table's column order.
Row = tuple[int, str, str | None, str | None, str | None, str | None, str | None, str | None,
            str | None, int, int | None]


@dataclasses.dataclass(frozen=True)
class Batch:
    """The rows of one transaction: processed invoices as flat values, failed ones as full rows.

    ``ok`` holds OK_WIDTH values per processed invoice (id, customer, currency, subtotal, tax, total,
    document, attempts, order id or 0), one flat sequence for the whole batch, which is what the
    statement binds; the consumers build it as they go, so no per-row tuple is made and taken apart.
    """

    ok: Sequence[object] = ()
    failed: Sequence[Row] = ()

    @classmethod
    def of(cls, rows: Iterable[Row]) -> Batch:
        """Sort full rows into a batch (for callers that have rows, not the consumers' flat values)."""
        ok: list[object] = []
        failed: list[Row] = []
        for row in rows:
            if row[1] == "ok" and row[8] is None:
                ok += (row[0], *row[2:8], row[9], row[10] or 0)
            else:
                failed.append(row)
        return cls(ok, failed)

    def rows(self) -> list[Row]:
        """Return the batch as full rows: the processed invoices, then the failed ones."""
        ok = self.ok
        processed = [(ok[i], "ok", *ok[i + 1:i + 7], None, ok[i + 7], ok[i + 8] or None)
                     for i in range(0, len(ok), OK_WIDTH)]
        return [*cast("list[Row]", processed), *self.failed]

    def __len__(self) -> int:
        return len(self.ok) // OK_WIDTH + len(self.failed)



EX_IOERR = 74      # sysexits.h: an input/output error (unreadable, unwritable, corrupt, full)
EX_TEMPFAIL = 75   # sysexits.h: try again later (another instance, or another program's lock)



class ClaimConflictError(Exception):
    """Orders being claimed changed meanwhile; the claim was rolled back and can be tried again."""


class StorageError(Exception):
    """The database cannot be used; the message names the path and the problem."""

    def __init__(self, message: str, exit_code: int = EX_IOERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class RecoveryPlan:
    """What start-up found: the marks, the runs stored above ``stored_through``, the missing numbers."""

    high_water: int
    stored_through: int
    runs: tuple[Run, ...]
    missing: tuple[range, ...]

    @property
    def stored_total(self) -> int:
        """Rows stored: all of 1..stored_through plus those stored above it."""
        return self.stored_through + sum(last - first + 1 for first, last in self.runs)

    @property
    def missing_total(self) -> int:
        """How many numbers start-up must process first."""
        return sum(len(missing) for missing in self.missing)


def missing_ranges(through: int, high_water: int, runs: Sequence[Run]) -> list[range]:
    """Return the numbers in ``(through, high_water]`` outside ``runs`` (sorted, disjoint), as ranges."""
    missing = []
    expected = through + 1
    for first, last in runs:
        if first > expected:
            missing.append(range(expected, min(first, high_water + 1)))
        expected = max(expected, last + 1)
    if expected <= high_water:
        missing.append(range(expected, high_water + 1))
    return [numbers for numbers in missing if numbers]



def format_runs(runs: Sequence[Run]) -> str:
    """Write runs as the column holds them: ``first-last`` pairs, comma-separated."""
    return ",".join(f"{first}-{last}" for first, last in runs)


def parse_runs(text: str) -> list[Run]:
    """Read the runs column back (a damaged one is a damaged database)."""
    runs = []
    for pair in filter(None, text.split(",")):
        first, _, last = pair.partition("-")
        runs.append((int(first), int(last)))
    return sorted(runs)


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

    def add_numbers(self, numbers: Sequence[int]) -> None:
        """Record a part's numbers: one run for a range, else one per stretch of consecutive numbers."""
        if not numbers:
            return
        numbers = getattr(numbers, "numbers", numbers)  # an OrderChunk's range
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

    def copy(self) -> StoredRuns:
        """Return a copy to add to before a commit (the original moves on only once it is committed)."""
        return StoredRuns(self.through, self.runs())

    def __len__(self) -> int:
        return len(self._last_of)


def is_postgresql(database: str) -> bool:
    """Say whether ``INVOICER_DATABASE`` names a PostgreSQL database (a libpq URI), not a SQLite file."""
    return database.startswith(("postgresql://", "postgres://"))


def open_storage(config: Any) -> Any:
    """Return the backend ``config`` names, not yet opened: PostgreSQL for a URI, else SQLite."""
    if config.postgresql:
        from invoicer.storage.postgresql import PostgresStorage  # noqa: PLC0415  # psycopg is optional

        return PostgresStorage(config.postgresql, lease_timeout=config.lease_timeout)
    return Storage(config.database)


from invoicer.storage.sqlite import (  # noqa: E402  # it builds on the shared types above
    BUSY_TIMEOUT_S,
    SCHEMA_VERSION,
    Storage,
    describe_error,
    submit_orders,
)

__all__ = [
    "BUSY_TIMEOUT_S", "COLUMNS", "EX_IOERR", "EX_TEMPFAIL", "OK_WIDTH", "SCHEMA_VERSION", "Batch",
    "ClaimConflictError", "OkValues", "RecoveryPlan", "Row", "Run", "Storage", "StorageError",
    "StoredRuns", "describe_error", "format_runs", "is_postgresql", "missing_ranges", "open_storage",
    "parse_runs", "submit_orders",
]
