"""InvoiceNumberGenerator: consecutive numbers, durable blocks first, give-back of the unused tail."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoicer.generator import InvoiceNumberGenerator
from invoicer.storage import Storage


class CountingReserver:
    """An in-memory high-water mark that records each reservation (the durable one is in test_storage)."""

    def __init__(self, high_water: int = 0) -> None:
        self.high_water = high_water
        self.reservations: list[tuple[int, int]] = []

    def reserve(self, count: int) -> tuple[int, int]:
        """Raise the mark by ``count``."""
        first = self.high_water + 1
        self.high_water += count
        self.reservations.append((first, self.high_water))
        return first, self.high_water


def test_numbers_are_consecutive_from_one() -> None:
    """A fresh generator hands out 1, 2, 3, ... across block boundaries."""
    generator = InvoiceNumberGenerator(CountingReserver(), 0, block_size=5)
    taken = [n for _ in range(7) for n in generator.take(3)]
    assert taken == list(range(1, len(taken) + 1))
    assert generator.last_issued == taken[-1]


def test_nothing_is_handed_out_beyond_the_reserved_mark() -> None:
    """Every number handed out is <= the high-water mark that was reserved before it."""
    reserver = CountingReserver()
    generator = InvoiceNumberGenerator(reserver, 0, block_size=4)
    for _ in range(10):
        numbers = generator.take(3)
        assert numbers.stop - 1 <= reserver.high_water


def test_continues_after_the_high_water_mark() -> None:
    """After a restart numbering continues above the durable mark, never reusing a number."""
    generator = InvoiceNumberGenerator(CountingReserver(100), 100, block_size=10)
    assert list(generator.take(2)) == [101, 102]


def test_give_back_only_the_tail() -> None:
    """Giving back the last chunk rewinds; giving back an older chunk changes nothing."""
    generator = InvoiceNumberGenerator(CountingReserver(), 0, block_size=100)
    first = generator.take(5)
    second = generator.take(5)
    assert generator.give_back(first) is False
    assert generator.give_back(second) is True
    assert list(generator.take(5)) == list(second)


def test_a_foreign_block_is_refused() -> None:
    """A reservation that does not follow the previous block (someone else moved the mark) is an error."""
    reserver = CountingReserver()
    generator = InvoiceNumberGenerator(reserver, 0, block_size=2)
    generator.take(2)
    reserver.high_water += 10
    with pytest.raises(RuntimeError, match="does not follow"):
        generator.take(1)


def test_threads_never_share_a_number() -> None:
    """Concurrent take() calls hand out every number exactly once."""
    generator = InvoiceNumberGenerator(CountingReserver(), 0, block_size=7)
    results: list[list[int]] = [[] for _ in range(8)]

    def take_many(slot: int) -> None:
        for _ in range(500):
            results[slot].extend(generator.take(3))

    threads = [threading.Thread(target=take_many, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = sorted(n for chunk in results for n in chunk)
    assert everything == list(range(1, len(everything) + 1))


@settings(max_examples=60, deadline=None)
@given(block=st.integers(1, 50), takes=st.lists(st.integers(1, 20), min_size=1, max_size=40),
       crash_after=st.integers(0, 40))
def test_durable_mark_covers_every_number_across_crashes(tmp_path_factory: pytest.TempPathFactory,
                                                          block: int, takes: list[int],
                                                          crash_after: int) -> None:
    """With a real database, a crash at any point leaves every number ever handed out <= the mark."""
    database = Path(tmp_path_factory.mktemp("gen")) / "g.db"
    handed_out: list[int] = []
    for _run in range(2):
        storage = Storage(database, synchronous="OFF")
        storage.open()
        plan = storage.recovery_plan()
        assert all(n <= plan.high_water for n in handed_out)
        assert plan.missing == ((range(1, plan.high_water + 1),) if plan.high_water else ())  # none stored
        generator = InvoiceNumberGenerator(storage, plan.high_water, block_size=block)
        for step, limit in enumerate(takes):
            if step == crash_after:
                break
            handed_out.extend(generator.take(limit))
        storage.close()  # a crash: no release of the unused reservation
    assert len(handed_out) == len(set(handed_out))


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_blocks_grow_while_numbers_go_fast_and_shrink_when_slow() -> None:
    """Blocks double while one lasts < 0.5 s (up to the maximum) and halve while one lasts > 4 s."""
    clock = FakeClock()
    reserver = CountingReserver()
    generator = InvoiceNumberGenerator(reserver, 0, block_size=4, max_block_size=16, clock=clock)
    for _ in range(5):
        generator.take(1000)  # one whole block per call
        clock.now += 0.1
    for _ in range(3):
        clock.now += 10
        generator.take(1000)
    assert [last - first + 1 for first, last in reserver.reservations] == [4, 8, 16, 16, 16, 8, 4, 4]
    assert generator.last_issued == reserver.high_water == 76  # consecutive, nothing skipped


def test_fixed_block_without_a_maximum() -> None:
    """Without max_block_size the block never changes, however fast numbers go."""
    clock = FakeClock()
    generator = InvoiceNumberGenerator(CountingReserver(), 0, block_size=4, clock=clock)
    for _ in range(20):
        generator.take(4)
    assert generator.block_size == 4
