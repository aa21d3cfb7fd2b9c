"""The observer with a fake clock: STATUS cadence and text, rate, gated watchdog, drain extension."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from invoicer.notify import Notifier
from invoicer.observer import EXTEND_MARGIN_S, LOG_INTERVAL_S, MAX_TICK_S, Observer, Snapshot, status_line


class RecordingNotifier(Notifier):
    """Collects what would be sent (the socket path itself is covered by test_notify)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    def send(self, *assignments: str) -> None:
        """Record instead of sending."""
        self.sent.extend(assignments)


@dataclasses.dataclass
class FakePipeline:
    """A pipeline whose counters the test moves by hand."""

    snapshot: Snapshot = dataclasses.field(default_factory=lambda: Snapshot(
        state="running", workers=8, stored_total=0, committed=0, pending=0, queue_depth=0))

    def advance(self, committed: int = 0, **changes: Any) -> None:
        """Commit ``committed`` more rows and apply other changes."""
        snap = self.snapshot
        self.snapshot = dataclasses.replace(snap, committed=snap.committed + committed,
                                            stored_total=snap.stored_total + committed, **changes)


def make(watchdog: float | None = None, status_interval: float = 1.0
         ) -> tuple[Observer, FakePipeline, RecordingNotifier]:
    """An observer wired to a fake pipeline and a recording notifier."""
    pipeline = FakePipeline()
    notifier = RecordingNotifier()
    return Observer(lambda: pipeline.snapshot, notifier, status_interval, watchdog), pipeline, notifier


def test_status_line_format() -> None:
    """STATUS carries state, worker count, rate, stored total and queue depth, ASCII only."""
    snap = Snapshot("running", 8, 1234567, 10, 3, 512)
    line = status_line(snap, 1234.4)
    assert line == "running: 8 workers, 1,234 invoices/s, 1,234,567 stored, queue 512"
    assert line.isascii()
    draining = status_line(dataclasses.replace(snap, state="draining", pending=812), 99.0)
    assert draining.startswith("draining: 812 left, 8 workers")
    gated = status_line(dataclasses.replace(snap, admitted=2), 1.0)
    assert gated.endswith("queue 512, 2 at once")  # the concurrency gate admits fewer than all workers
    assert status_line(dataclasses.replace(snap, admitted=8), 1.0).endswith("queue 512")


@pytest.mark.parametrize(("changes", "expected"), [
    ({"paused": "ConnectionError: refused"},
     "paused: ConnectionError: refused; 8 workers, 0 invoices/s, 1,234,567 stored, queue 512"),
    ({"problem": "storage: a commit has not finished for 12s"},
     "running, stalled: storage: a commit has not finished for 12s; 8 workers, 0 invoices/s, "
     "1,234,567 stored, queue 512"),
    ({"abandoned": 3},
     "running: 8 workers, 0 invoices/s, 1,234,567 stored, queue 512, 3 hung calls abandoned"),
    ({"state": "draining", "pending": 5, "paused": "TimeoutError"},
     "draining, paused: TimeoutError; 5 left, 8 workers, 0 invoices/s, 1,234,567 stored, queue 512"),
], ids=["paused", "stalled", "abandoned", "draining-paused"])
def test_status_line_says_what_is_wrong(changes: dict[str, Any], expected: str) -> None:
    """A pause names its error, a stall its cause, and abandoned calls are counted, on the one line."""
    assert status_line(dataclasses.replace(Snapshot("running", 8, 1234567, 10, 3, 512), **changes),
                       0.0) == expected


def test_status_sent_once_per_interval() -> None:
    """Ticks more often than the interval send STATUS only when the interval has passed."""
    observer, _pipeline, notifier = make(status_interval=1.0)
    for now in (100.0, 100.3, 100.6, 101.0, 101.5, 102.1):
        observer.tick(now)
    assert sum(a.startswith("STATUS=") for a in notifier.sent) == 3


def test_rate_is_committed_rows_per_second() -> None:
    """The rate is committed rows over elapsed time across the window."""
    observer, pipeline, _notifier = make()
    observer.tick(10.0)
    pipeline.advance(500)
    observer.tick(11.0)
    assert observer.rate == pytest.approx(500.0)
    pipeline.advance(1500)
    observer.tick(12.0)
    assert observer.rate == pytest.approx(1000.0)


def test_watchdog_decided_on_every_tick_while_healthy() -> None:
    """Healthy, WATCHDOG=1 goes out on every tick, and ticks come at least every half WATCHDOG_USEC."""
    observer, pipeline, notifier = make(watchdog=2.0, status_interval=5.0)
    assert observer.tick_interval == 1.0
    for second in range(6):
        pipeline.advance(10, pending=5)
        observer.tick(float(second))
        observer.tick(second + 0.5)
    assert notifier.sent.count("WATCHDOG=1") == 12


def test_watchdog_withheld_while_the_pipeline_has_a_problem(caplog: pytest.LogCaptureFixture) -> None:
    """A problem withholds pings from the next tick on, with one warning naming it; health resumes them."""
    observer, pipeline, notifier = make(watchdog=2.0)
    pipeline.advance(10, pending=64)
    observer.tick(0.0)
    pipeline.advance(problem="storage: a commit has not finished for 12s")
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        observer.tick(1.0)
        observer.tick(2.0)
        observer.tick(3.0)
    assert notifier.sent.count("WATCHDOG=1") == 1
    warnings = [r.getMessage() for r in caplog.records if "withholding watchdog" in r.getMessage()]
    assert warnings == ["pipeline stalled: storage: a commit has not finished for 12s; "
                        "withholding watchdog pings"]
    pipeline.advance(1, problem="")
    observer.tick(4.0)
    assert notifier.sent.count("WATCHDOG=1") == 2


def test_watchdog_pings_while_paused_by_an_outage() -> None:
    """Paused intake is a legitimate standstill: pings go on, STATUS says paused and names the error."""
    observer, pipeline, notifier = make(watchdog=2.0)
    pipeline.advance(0, pending=32, paused="ConnectionError: refused")
    for second in range(3):
        observer.tick(float(second))
    assert notifier.sent.count("WATCHDOG=1") == 3
    assert notifier.sent[0].startswith("STATUS=paused: ConnectionError: refused; 8 workers")


def test_housekeeping_runs_before_every_sample() -> None:
    """Each tick first does the housekeeping (deadlines, health) with its time, then samples."""
    pipeline = FakePipeline()
    calls: list[float] = []

    def housekeeping(now: float) -> None:
        calls.append(now)
        pipeline.advance(problem=f"seen at {now:g}")

    observer = Observer(lambda: pipeline.snapshot, RecordingNotifier(), 1.0, None, housekeeping=housekeeping)
    assert observer.tick(3.0).problem == "seen at 3"
    assert calls == [3.0]


def test_an_observer_that_fails_reports_it() -> None:
    """An exception in a tick ends the observer thread through the fatal handler, not silently."""
    failures: list[tuple[str, BaseException]] = []

    def broken() -> Snapshot:
        raise RuntimeError("broken sample")

    observer = Observer(broken, RecordingNotifier(), 0.01, None,
                        on_fatal=lambda where, exc: failures.append((where, exc)))
    observer.start()
    assert observer.join(5)
    assert [(where, str(exc)) for where, exc in failures] == [("observer", "broken sample")]


def test_watchdog_pings_when_idle_for_an_innocent_reason() -> None:
    """Nothing pending (nothing to do): pings continue without commits."""
    observer, _pipeline, notifier = make(watchdog=2.0)
    for second in range(4):
        observer.tick(float(second))
    assert notifier.sent.count("WATCHDOG=1") == 4


def test_no_watchdog_without_watchdog_usec() -> None:
    """Without a watchdog timeout no WATCHDOG=1 is ever sent."""
    observer, pipeline, notifier = make(watchdog=None)
    for second in range(3):
        pipeline.advance(5)
        observer.tick(float(second))
    assert "WATCHDOG=1" not in notifier.sent


def test_drain_extends_the_stop_timeout_only_while_healthy() -> None:
    """Draining and healthy, each tick asks for the next tick plus a margin; a stalled drain asks nothing."""
    observer, pipeline, notifier = make(status_interval=3600.0)
    assert observer.tick_interval == MAX_TICK_S
    extend = f"EXTEND_TIMEOUT_USEC={int((observer.tick_interval + EXTEND_MARGIN_S) * 1_000_000)}"
    observer.tick(0.0)
    pipeline.advance(5, state="draining", pending=100)
    observer.tick(1.0)
    observer.tick(2.0)  # nothing committed, calls under way: still healthy
    assert notifier.sent.count(extend) == 2
    pipeline.advance(problem="storage: a commit has not finished for 11s")
    observer.tick(3.0)
    assert notifier.sent.count(extend) == 2


def test_a_stalled_drain_is_extended_until_it_ends_itself() -> None:
    """Stalled, the drain keeps its extensions until the daemon's own stall limit, then gets none."""
    pipeline = FakePipeline()
    notifier = RecordingNotifier()
    observer = Observer(lambda: pipeline.snapshot, notifier, 1.0, None, drain_stall=20.0)
    extend = f"EXTEND_TIMEOUT_USEC={int((observer.tick_interval + EXTEND_MARGIN_S) * 1_000_000)}"
    pipeline.advance(state="draining", pending=5, problem="storage: stalled", problem_age=19.0)
    observer.tick(0.0)
    assert notifier.sent.count(extend) == 1
    pipeline.advance(problem_age=20.5)
    observer.tick(1.0)
    assert notifier.sent.count(extend) == 1


def test_throughput_record_every_log_interval(caplog: pytest.LogCaptureFixture) -> None:
    """A 'throughput' record with rate, stored_total, queue_depth and workers goes out every ~10 s."""
    observer, pipeline, _notifier = make()
    with caplog.at_level(logging.INFO, logger="invoicer"):
        for second in range(int(LOG_INTERVAL_S * 2) + 1):
            pipeline.advance(100, queue_depth=7)
            observer.tick(float(second))
    records = [r for r in caplog.records if r.getMessage() == "throughput"]
    assert len(records) == 3
    last = records[-1].__dict__
    assert (last["stored_total"], last["queue_depth"], last["workers"]) == (2100, 7, 8)
    assert last["rate"] == pytest.approx(100.0)
