"""The observer with a fake clock: STATUS cadence and text, rate, gated watchdog, drain extension."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import pytest

from invoicer.notify import Notifier
from invoicer.observer import EXTEND_STOP_S, LOG_INTERVAL_S, Observer, Snapshot, status_line


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


def test_watchdog_pings_at_half_interval_while_progressing() -> None:
    """With progress, WATCHDOG=1 goes out every half WATCHDOG_USEC, not more often."""
    observer, pipeline, notifier = make(watchdog=2.0, status_interval=5.0)
    assert observer.tick_interval == 1.0
    for second in range(6):
        pipeline.advance(10, pending=5)
        observer.tick(float(second))
        observer.tick(second + 0.5)
    assert notifier.sent.count("WATCHDOG=1") == 6


def test_watchdog_withheld_when_stuck_with_work_pending(caplog: pytest.LogCaptureFixture) -> None:
    """No commit since the last ping while work is pending: no ping, one warning; progress resumes it."""
    observer, pipeline, notifier = make(watchdog=2.0)
    pipeline.advance(10, pending=64)
    observer.tick(0.0)
    with caplog.at_level(logging.WARNING, logger="invoicer"):
        observer.tick(1.0)
        observer.tick(2.0)
        observer.tick(3.0)
    assert notifier.sent.count("WATCHDOG=1") == 1
    assert len([r for r in caplog.records if "withholding watchdog" in r.getMessage()]) == 1
    pipeline.advance(1)
    observer.tick(4.0)
    assert notifier.sent.count("WATCHDOG=1") == 2


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


def test_drain_extends_the_stop_timeout_only_while_progressing() -> None:
    """Draining with progress sends EXTEND_TIMEOUT_USEC; a stalled drain sends none."""
    observer, pipeline, notifier = make()
    extend = f"EXTEND_TIMEOUT_USEC={int(EXTEND_STOP_S * 1_000_000)}"
    observer.tick(0.0)
    pipeline.advance(5, state="draining", pending=100)
    observer.tick(1.0)
    assert notifier.sent.count(extend) == 1
    observer.tick(2.0)
    observer.tick(3.0)
    assert notifier.sent.count(extend) == 1
    pipeline.advance(5)
    observer.tick(4.0)
    assert notifier.sent.count(extend) == 2


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
