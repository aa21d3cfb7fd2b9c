"""WorkQueue: the bounded queue between the producer and the consumers, bounded in invoice numbers.

Numbers travel in chunks (fewer queue operations per invoice), but the bound an operator sets with
INVOICER_QUEUE_SIZE is a count of numbers, and so is the depth STATUS= shows. ``queue.Queue`` bounds
items, not numbers, hence this small class in the style of ``Lib/queue.py``.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

Chunk = Sequence[int]


class WorkQueue:
    """FIFO of number chunks holding at most ``capacity`` numbers; ``None`` items retire consumers.

    A chunk larger than the free room waits until the queue is empty, so any chunk fits eventually.
    Retirement sentinels carry no numbers and never wait.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        # Rule: _mutex guards _items and _numbers; both conditions share it. Producer, consumers and the
        # main thread (sentinels, depth) take it, only for the queue operation itself.
        self._mutex = threading.Lock()
        self._not_empty = threading.Condition(self._mutex)
        self._not_full = threading.Condition(self._mutex)
        self._items: collections.deque[Chunk | None] = collections.deque()
        self._numbers = 0

    def put(self, chunk: Chunk, timeout: float | None = None) -> bool:
        """Append ``chunk`` once there is room; False if ``timeout`` passed first (nothing queued)."""
        size = len(chunk)
        with self._not_full:
            if not self._not_full.wait_for(
                    lambda: self._numbers == 0 or self._numbers + size <= self.capacity, timeout):
                return False
            self._items.append(chunk)
            self._numbers += size
            self._not_empty.notify()
            return True

    def put_front(self, chunk: Chunk) -> None:
        """Put ``chunk`` back at the head, whatever the room: numbers already taken out, now returned."""
        with self._mutex:
            self._items.appendleft(chunk)
            self._numbers += len(chunk)
            self._not_empty.notify()

    def put_back(self, chunk: Chunk) -> None:
        """Put ``chunk`` behind the queued work, whatever the room: numbers taken out, to go round again.

        It goes before any retirement sentinel, so that a loop still takes it before the pool retires.
        """
        with self._mutex:
            items = self._items
            self._items.insert(next((i for i, item in enumerate(items) if item is None), len(items)), chunk)
            self._numbers += len(chunk)
            self._not_empty.notify()

    def put_sentinel(self) -> None:
        """Append a retirement sentinel: the consumer that takes it ends, after the work queued before it."""
        with self._mutex:
            self._items.append(None)
            self._not_empty.notify()

    def get(self) -> Chunk | None:
        """Take the oldest item, waiting for one."""
        with self._not_empty:
            self._not_empty.wait_for(lambda: bool(self._items))
            item = self._items.popleft()
            if item is not None:
                self._numbers -= len(item)
                self._not_full.notify()
            return item

    def depth(self) -> int:
        """How many invoice numbers wait in the queue."""
        with self._mutex:
            return self._numbers
