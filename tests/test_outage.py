"""OutageBreaker with a fake clock: outage versus poison, stragglers, probes in turn, backoff, resumption."""

from __future__ import annotations

import threading

import pytest

from invoicer.outage import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    MAX_OUTAGE_INVOICES,
    OUTAGE_INVOICES,
    OutageBreaker,
    describe,
)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def paused_breaker(clock: FakeClock) -> OutageBreaker:
    """A breaker that has just paused for an outage."""
    breaker = OutageBreaker(clock=clock)
    for number in range(OUTAGE_INVOICES):
        breaker.failure(number, ConnectionError("down"), started=clock.now)
    assert breaker.paused
    return breaker


def test_failures_across_different_invoices_pause() -> None:
    """OUTAGE_INVOICES different invoices failing with no success after them is an outage."""
    breaker = OutageBreaker(clock=FakeClock())
    results = [breaker.failure(n, ConnectionError("refused"), started=100.0)
               for n in range(1, OUTAGE_INVOICES + 1)]
    assert results == [False] * (OUTAGE_INVOICES - 1) + [True]
    assert breaker.paused
    assert breaker.error == "ConnectionError: refused"
    assert breaker.failure(99, ConnectionError("still"), started=100.0)  # in flight: not an attempt
    assert breaker.error == "ConnectionError: still"


@pytest.mark.parametrize(("workers", "threshold"),
                         [(1, OUTAGE_INVOICES), (8, 8), (64, MAX_OUTAGE_INVOICES)])
def test_the_outage_follows_the_worker_count(workers: int, threshold: int) -> None:
    """An outage takes one failing invoice per worker, within OUTAGE_INVOICES..MAX_OUTAGE_INVOICES."""
    breaker = OutageBreaker(workers, clock=FakeClock())
    outcomes = [breaker.failure(n, OSError("down"), started=100.0) for n in range(threshold)]
    assert outcomes[-2:] == [False, True]


def test_one_invoice_failing_again_and_again_is_poison() -> None:
    """However often one invoice fails, it is one invoice: no pause, its attempts count."""
    breaker = OutageBreaker(clock=FakeClock())
    assert not any(breaker.failure(7, ValueError("bad"), started=100.0 + n) for n in range(50))
    assert not breaker.paused


def test_retries_of_invoices_cleared_by_a_later_success_never_pause() -> None:
    """Invoices that failed before a later-started call succeeded are poison: their retries do not count."""
    breaker = OutageBreaker(clock=FakeClock())
    for number in range(1, 9):  # eight poison invoices fail first, each followed by a success
        assert not breaker.failure(number, ConnectionError("reset"), started=float(number))
        breaker.success(100 + number, started=number + 0.5)
    for number in range(1, 9):  # their retries come due together and fail back to back
        assert not breaker.failure(number, ConnectionError("reset"), started=50.0)
    assert not breaker.paused


def test_errors_about_the_invoice_never_pause() -> None:
    """A ValueError (a bad order, a bug) for any number of different invoices is poison, not an outage."""
    breaker = OutageBreaker(clock=FakeClock())
    assert not any(breaker.failure(n, ValueError("bad order"), started=100.0) for n in range(1, 500))
    assert not breaker.paused


def test_an_answer_about_the_invoice_to_a_probe_ends_the_pause() -> None:
    """The service answered the probe (with an error about that invoice): it is up, intake resumes."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    clock.now += FIRST_BACKOFF_S
    assert breaker.admit() is True
    assert breaker.failure(3, ValueError("bad order"), started=clock.now, probe=True) is False
    assert not breaker.paused


def test_failures_of_calls_begun_before_a_success_do_not_pause_again() -> None:
    """After a probe's success, calls that hung since before it and now fail are not a new outage."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    clock.now += FIRST_BACKOFF_S
    assert breaker.admit() is True
    breaker.success(1, started=clock.now)
    assert not any(breaker.failure(n, TimeoutError("read timed out"), started=clock.now - 5)
                   for n in range(10, 10 + OUTAGE_INVOICES))
    assert not breaker.paused


def test_a_straggler_success_does_not_hide_an_outage() -> None:
    """A call that started before the failures and succeeds after them clears nothing."""
    breaker = OutageBreaker(clock=FakeClock())
    for number in range(1, OUTAGE_INVOICES):
        breaker.failure(number, ConnectionError("down"), started=10.0)
    breaker.success(99, started=9.0)
    assert breaker.failure(OUTAGE_INVOICES, ConnectionError("down"), started=10.0)


def test_probes_wait_their_backoff_and_a_success_resumes() -> None:
    """Paused, a probe is admitted once its backoff has passed; its failure doubles it; a success resumes."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    clock.now += FIRST_BACKOFF_S
    assert breaker.admit() is True  # due: this call probes
    breaker.failure(1, ConnectionError("down"), started=clock.now, probe=True)
    clock.now += 2 * FIRST_BACKOFF_S
    assert breaker.admit() is True
    breaker.success(1, started=clock.now)
    assert not breaker.paused
    assert breaker.error == ""
    assert breaker.admit() is False  # not paused: no waiting, not a probe


def test_a_straggler_success_does_not_resume() -> None:
    """Only a call begun after the pause (a probe) can end it."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    breaker.success(42, started=clock.now - 1)
    assert breaker.paused


def test_backoff_is_capped() -> None:
    """However long the outage, probes come at least every MAX_BACKOFF_S."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    for _ in range(20):
        clock.now += MAX_BACKOFF_S
        assert breaker.admit() is True
        breaker.failure(1, ConnectionError("down"), started=clock.now, probe=True)


def test_only_one_probe_at_a_time_and_others_resume_with_it() -> None:
    """While one call probes, the other callers wait; the probe's success lets them all go, not as probes."""
    clock = FakeClock()
    breaker = paused_breaker(clock)
    clock.now += FIRST_BACKOFF_S
    assert breaker.admit() is True
    admitted: list[bool] = []
    waiting = [threading.Thread(target=lambda: admitted.append(breaker.admit())) for _ in range(3)]
    for thread in waiting:
        thread.start()
    for thread in waiting:
        thread.join(0.05)
        assert thread.is_alive()  # held back while the probe runs
    breaker.success(1, started=clock.now)
    for thread in waiting:
        thread.join(5)
    assert admitted == [False, False, False]


def test_the_producer_waits_for_the_pause_to_end() -> None:
    """wait_resumed() returns False while paused (after its timeout) and True once resumed."""
    clock = FakeClock()
    breaker = OutageBreaker(clock=clock)
    assert breaker.wait_resumed(0)
    breaker = paused_breaker(clock)
    assert not breaker.wait_resumed(0.01)
    breaker.success(1, started=clock.now)
    assert breaker.wait_resumed(0)


@pytest.mark.parametrize(("exc", "text"), [
    (ConnectionError("refused"), "ConnectionError: refused"),
    (TimeoutError(), "TimeoutError"),
    (ValueError("two\nlines"), "ValueError: two lines"),
], ids=["message", "no-message", "newline"])
def test_errors_are_described_on_one_line(exc: BaseException, text: str) -> None:
    """An error becomes one line with its type, as STATUS= needs."""
    assert describe(exc) == text
