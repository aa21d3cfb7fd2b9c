"""ConcurrencyGate: the admitted-consumer limit follows the CPU share of the work."""

from __future__ import annotations

import threading

import pytest

from invoicer.gate import HEADROOM, SAMPLES, ConcurrencyGate, limit_for


@pytest.mark.parametrize(("share", "workers", "expected"), [
    (1.0, 16, 1),         # pure Python work: one consumer keeps the GIL busy
    (1.0, 1, 1),
    (0.5, 16, 2),         # half the time waiting: 1 / 0.5
    (0.3, 16, 4),         # ceil(3.33)
    (0.01, 16, 16),       # mostly waiting (an API, a disk): every worker
    (0.0, 64, 64),
    (0.002, 1024, 1024),  # 5 ms waits, 10 us of Python: open
    (0.05, 1024, 1024),   # below OPEN_BELOW_SHARE: open
    (0.1, 1024, 10),
])
def test_limit_for(share: float, workers: int, expected: int) -> None:
    """ceil(HEADROOM / share), clamped to 1..workers."""
    assert HEADROOM == 1.0
    assert limit_for(share, workers) == expected


def report_many(gate: ConcurrencyGate, cpu: float, wall: float, times: int = SAMPLES) -> list[bool]:
    """Report ``times`` chunks of ``cpu`` CPU seconds over ``wall`` wall seconds."""
    return [gate.report(cpu, wall) for _ in range(times)]


def test_open_until_measured_then_closes_for_cpu_bound_work() -> None:
    """All workers are admitted at first; CPU-bound chunks shrink the limit and surplus holders step out."""
    gate = ConcurrencyGate(8)
    for _ in range(8):
        gate.acquire()  # eight consumers hold places, none waits
    assert gate.limit == 8
    steps_out = report_many(gate, 0.001, 0.001)
    assert gate.limit == 1
    assert steps_out.count(True) == 7  # seven of the eight give their places up, one per report
    assert steps_out[-1] is False      # and then the one left keeps its place


def test_waiting_work_keeps_the_gate_open() -> None:
    """Chunks that mostly wait (share 0.001) admit every worker."""
    gate = ConcurrencyGate(64)
    gate.acquire()
    assert report_many(gate, 0.00002, 0.02) == [False] * SAMPLES
    assert gate.limit == 64


def test_median_ignores_a_minority_of_interrupted_chunks() -> None:
    """A few chunks a GIL switch stretched (low share) do not open the gate."""
    gate = ConcurrencyGate(16)
    gate.acquire()
    report_many(gate, 0.001, 0.001, SAMPLES - 5)
    report_many(gate, 0.001, 0.05, 5)
    assert gate.limit == 1


def waiting_consumer(gate: ConcurrencyGate) -> tuple[threading.Thread, threading.Event]:
    """Start a thread that acquires a place; the event is set once it has one."""
    admitted = threading.Event()

    def consumer() -> None:
        gate.acquire()
        admitted.set()

    thread = threading.Thread(target=consumer)
    thread.start()
    return thread, admitted


def test_a_waiter_is_admitted_when_the_work_turns_waiting() -> None:
    """A consumer waiting at the gate gets in as soon as the measured share says more are useful."""
    gate = ConcurrencyGate(4)
    gate.acquire()
    report_many(gate, 0.001, 0.001)
    assert gate.limit == 1
    thread, admitted = waiting_consumer(gate)
    assert not admitted.wait(0.05)  # the gate is full: it waits
    report_many(gate, 0.0001, 0.01)  # now the chunks mostly wait
    assert admitted.wait(10)
    thread.join(10)
    assert gate.limit == 4


def test_release_hands_the_place_to_a_waiter() -> None:
    """A consumer that ends (retirement) lets one waiting consumer in."""
    gate = ConcurrencyGate(3)
    gate.acquire()
    report_many(gate, 0.001, 0.001)
    assert gate.limit == 1
    thread, admitted = waiting_consumer(gate)
    assert not admitted.wait(0.05)
    gate.release()
    assert admitted.wait(10)
    thread.join(10)


def test_resize_follows_the_worker_count() -> None:
    """A reload to fewer workers lowers the ceiling; to more raises it again."""
    gate = ConcurrencyGate(16)
    gate.acquire()
    report_many(gate, 0.00001, 0.01)
    assert gate.limit == 16
    gate.resize(4)
    assert gate.limit == 4
    gate.resize(32)
    assert gate.limit == 32


def cpu_bound(workers: int) -> ConcurrencyGate:
    """A gate whose measurements say: every chunk runs on the CPU the whole time."""
    gate = ConcurrencyGate(workers, cpus=4)
    report_many(gate, 0.001, 0.001)
    return gate


def test_places_are_lent_to_long_calls() -> None:
    """lend(n) lets n more consumers in past the limit, and taking it back lets the surplus step out."""
    gate = cpu_bound(4)
    assert gate.limit == 1
    gate.acquire()
    waiter = threading.Thread(target=gate.acquire)
    waiter.start()
    waiter.join(0.05)
    assert waiter.is_alive()  # the one place is held (by a hung call, say)
    gate.lend(1)
    waiter.join(5)
    assert not waiter.is_alive()
    gate.lend(0)
    assert gate.report(0.0, 0.0) is True  # two hold places, one is allowed: the reporter steps out


def test_work_outside_the_gil_earns_more_cores() -> None:
    """A probe that makes the process use a core more keeps it and tries another; the limit follows."""
    gate = cpu_bound(8)
    assert (gate.cores, gate.limit) == (1, 1)
    gate.tick(100.0, 0.0)
    gate.tick(101.0, 1.0)      # one core used: probe with two
    assert (gate.cores, gate.limit) == (2, 2)
    gate.tick(102.0, 3.0)      # two cores used during the probe: kept
    assert (gate.cores, gate.limit) == (2, 2)
    gate.tick(103.0, 5.0)      # and at once the next probe
    assert gate.cores == 3
    gate.tick(104.0, 7.1)      # 2.1 cores with three: that one is undone
    assert (gate.cores, gate.limit) == (2, 2)


def test_a_probe_that_gains_nothing_is_undone() -> None:
    """GIL-bound work uses no more CPU with more consumers: the probe is undone and retried much later."""
    gate = cpu_bound(8)
    gate.tick(100.0, 0.0)
    gate.tick(101.0, 1.2)
    assert gate.cores == 2
    gate.tick(102.0, 2.5)      # 1.3 cores: no gain
    assert (gate.cores, gate.limit) == (1, 1)
    gate.tick(103.0, 3.8)      # too soon for another probe
    assert gate.cores == 1
    gate.tick(112.0, 15.5)
    assert gate.cores == 2     # PROBE_EVERY_S later it tries again


def test_cores_fall_back_when_the_work_changes() -> None:
    """Once the work stops using the cores it was given, the gate gives one back."""
    gate = cpu_bound(8)
    gate.tick(100.0, 0.0)
    gate.tick(101.0, 1.0)
    gate.tick(102.0, 3.0)
    gate.tick(103.0, 5.0)      # a probe with three begins
    gate.tick(104.0, 7.0)      # undone
    assert gate.cores == 2
    gate.tick(115.0, 18.0)     # one core only now, long after
    assert gate.cores == 1


def test_no_probe_while_the_gate_is_open() -> None:
    """Waiting work admits every worker already: nothing to probe."""
    gate = ConcurrencyGate(8)
    report_many(gate, 0.00001, 0.01)
    gate.tick(100.0, 0.0)
    gate.tick(101.0, 0.1)
    assert (gate.cores, gate.limit) == (1, 8)
