"""InvoiceNumberGenerator: hands out 1, 2, 3, ... without gaps, reserving numbers durably in blocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

DEFAULT_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 65536   # the daemon lets blocks grow to this when numbers go fast
BLOCK_SECONDS = 1.0      # ... aiming at a reservation about this often


class Reserver(Protocol):
    """The part of Storage the generator needs."""

    def reserve(self, count: int) -> tuple[int, int]: ...


class InvoiceNumberGenerator:
    """Hands out consecutive invoice numbers; none is handed out before its block is durably reserved.

    A number handed out but never stored is not lost: it is <= the durable high-water mark, so the next
    start-up's recovery processes it.
    """

    def __init__(self, storage: Reserver, high_water: int, block_size: int = DEFAULT_BLOCK_SIZE, *,
                 max_block_size: int | None = None, clock: Callable[[], float] = time.monotonic,
                 block_seconds: float = BLOCK_SECONDS) -> None:
        """Reserve ``block_size`` numbers at a time; with ``max_block_size``, let the block follow the rate.

        A reservation is a durable transaction (an fsync) that the producer waits for while the
        consumers empty the work queue, so blocks grow with the rate (docs/performance.md). Adaptive
        blocks double while one lasts less than BLOCK_SECONDS / 2 and halve (not below
        ``block_size``) while one lasts more than 4 x BLOCK_SECONDS, so about a second of work is
        reserved ahead, which is also the most that a crash leaves for the next start-up to recover.
        """
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self._storage = storage
        self._min_block = block_size
        self._max_block = max(block_size, max_block_size or block_size)
        self._clock = clock
        self._block_seconds = block_seconds
        self._reserved_at: float | None = None
        self._block_size = block_size
        # Rule: _lock guards _next and _reserved_last. Any thread handing out or returning numbers takes
        # it; storage.reserve() runs under it so two callers never reserve for the same gap.
        self._lock = threading.Lock()
        self._next = high_water + 1
        self._reserved_last = high_water

    def take(self, limit: int) -> range:
        """Hand out up to ``limit`` consecutive numbers (fewer at a block boundary, never none)."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        with self._lock:
            if self._next > self._reserved_last:
                self._adapt_block()
                first, last = self._storage.reserve(self._block_size)
                if not getattr(self._storage, "contiguous", True):  # blocks of instances interleave
                    self._next = first
                elif first != self._reserved_last + 1:
                    # One instance per database: a block that does not follow ours means someone else
                    # raised the mark, and handing out from it could leave a gap.
                    raise RuntimeError(f"reserved block {first}..{last} does not follow "
                                       f"{self._reserved_last}; is another writer using the database?")
                self._reserved_last = last
            numbers = range(self._next, min(self._next + limit, self._reserved_last + 1))
            self._next = numbers.stop
            return numbers

    def rest(self) -> range:
        """Take every number left in the block reserved last (a drain on PostgreSQL finishes its blocks)."""
        with self._lock:
            numbers = range(self._next, self._reserved_last + 1)
            self._next = numbers.stop
            return numbers

    @property
    def block_size(self) -> int:
        """How many numbers the next reservation takes."""
        return self._block_size

    def _adapt_block(self) -> None:
        now = self._clock()
        if self._reserved_at is not None:
            lasted = now - self._reserved_at
            if lasted < self._block_seconds / 2:
                self._block_size = min(self._max_block, self._block_size * 2)
            elif lasted > self._block_seconds * 4:
                self._block_size = max(self._min_block, self._block_size // 2)
        self._reserved_at = now

    def give_back(self, numbers: range) -> bool:
        """Return the most recently taken ``numbers`` unused; False (no change) if they are not the tail."""
        with self._lock:
            if len(numbers) == 0 or numbers.stop != self._next:
                return False
            self._next = numbers.start
            return True

    @property
    def last_issued(self) -> int:
        """The highest number handed out so far (or the high-water mark it started from)."""
        with self._lock:
            return self._next - 1
