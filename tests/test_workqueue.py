"""WorkQueue: bounded in invoice numbers, FIFO, sentinels that never wait."""

from __future__ import annotations

import threading

import pytest

from invoicer.workqueue import WorkQueue


def test_fifo_and_depth_in_numbers() -> None:
    """Chunks come out in order; depth counts numbers, not chunks."""
    work = WorkQueue(10)
    assert work.put([1, 2, 3])
    assert work.put(range(4, 6))
    assert work.depth() == 5
    assert list(work.get() or []) == [1, 2, 3]
    assert work.depth() == 2


def test_bound_is_in_numbers() -> None:
    """A chunk that would pass the capacity waits (here: times out) and is not queued."""
    work = WorkQueue(5)
    assert work.put([1, 2, 3, 4])
    assert work.put([5, 6], timeout=0.01) is False
    assert work.depth() == 4
    assert work.put([5])
    assert work.depth() == 5


def test_oversized_chunk_fits_into_an_empty_queue() -> None:
    """A chunk larger than the capacity is accepted when the queue is empty, so nothing deadlocks."""
    work = WorkQueue(2)
    assert work.put([1, 2, 3])
    assert work.depth() == 3


def test_blocked_put_resumes_when_a_consumer_takes() -> None:
    """Back-pressure: a put waiting for room goes through once a get frees it."""
    work = WorkQueue(2)
    work.put([1, 2])
    done = threading.Event()

    def producer() -> None:
        assert work.put([3])
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.05)
    assert list(work.get() or []) == [1, 2]
    assert done.wait(5)
    thread.join()
    assert work.depth() == 1


def test_sentinels_never_wait_and_queue_behind_work() -> None:
    """put_sentinel ignores the bound; a consumer sees the work queued before it first."""
    work = WorkQueue(1)
    work.put([1])
    work.put_sentinel()
    work.put_sentinel()
    assert list(work.get() or []) == [1]
    assert work.get() is None
    assert work.get() is None
    assert work.depth() == 0


def test_capacity_must_be_positive() -> None:
    """A zero capacity is a programming error."""
    with pytest.raises(ValueError, match="capacity"):
        WorkQueue(0)
