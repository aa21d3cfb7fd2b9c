"""INVOICER_METRICS_FILE: the node exporter's textfile format, read back with prometheus_client's parser."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from invoicer.config import ConfigError, load_config
from invoicer.metrics import MetricsFile, render
from invoicer.observer import Snapshot
from tests.conftest import Daemon

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of the exposition text, by name and labels (the parser refuses malformed text)."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(parsed: Samples, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted({"daemon": "invoicer", **labels}.items())))]


def test_a_drain_stopped_at_once_still_leaves_the_metrics_saying_stopped(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    metrics = tmp_path / "invoicer.prom"
    daemon = start_daemon(tmp_path / "invoices.db", INVOICER_METRICS_FILE=str(metrics), INVOICER_WORKERS="4",
                          INVOICER_PROCESSING_DELAY_MS="200")
    daemon.wait_ready()
    daemon.wait_stored(20)
    daemon.signal(signal.SIGTERM)
    assert daemon.notify is not None
    for _ in range(4):  # four ticks of 0.1 s: past the 0.25 s in which a second signal is the same request
        daemon.notify.wait_for(lambda m: m.startswith("STATUS=draining"), 10, daemon.process.pid)
    daemon.signal(signal.SIGTERM)  # a second one: stop at once
    code, _ = daemon.wait()
    assert code == 128 + signal.SIGTERM
    assert value(samples(metrics.read_text()), "invoicer_state", state="stopped") == 1


def test_a_snapshot_renders_as_the_textfile_format() -> None:
    snapshot = Snapshot(state="draining", workers=8, stored_total=1200, committed=900, pending=40,
                        queue_depth=12, failed=3, oldest_call=1.25, recovery_backlog=0, problem="")
    parsed = samples(render(snapshot, 123.4567, "invoicer"))
    assert value(parsed, "invoicer_committed_total") == 900
    assert value(parsed, "invoicer_failed_total") == 3
    assert value(parsed, "invoicer_stored") == 1200
    assert value(parsed, "invoicer_rate") == 123.457
    assert value(parsed, "invoicer_queue_depth") == 12
    assert value(parsed, "invoicer_in_flight") == 40
    assert value(parsed, "invoicer_workers") == 8
    assert value(parsed, "invoicer_oldest_in_flight_seconds") == 1.25
    assert value(parsed, "invoicer_recovery_backlog") == 0
    assert value(parsed, "invoicer_state", state="draining") == 1
    assert value(parsed, "invoicer_state", state="running") == 0
    assert value(parsed, "invoicer_healthy") == 1


def test_the_file_is_readable_by_the_node_exporter_whatever_the_umask(tmp_path: Path) -> None:
    """The unit's UMask=0077 must not leave the file readable by its (dynamic) owner only."""
    metrics = MetricsFile(tmp_path / "invoicer.prom")
    previous = os.umask(0o077)
    try:
        metrics.write(Snapshot(state="running", workers=1, stored_total=0, committed=0, pending=0,
                               queue_depth=0, paused="ConnectionError: refused"), 0.0)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "invoicer.prom").stat().st_mode) == 0o644
    assert value(samples((tmp_path / "invoicer.prom").read_text()), "invoicer_paused", daemon="invoicer") == 1


def test_an_unwritable_file_is_a_warning_not_a_failure(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    metrics = MetricsFile(tmp_path / "gone" / "invoicer.prom")
    snapshot = Snapshot(state="running", workers=1, stored_total=0, committed=0, pending=0, queue_depth=0)
    metrics.write(snapshot, 0.0)
    metrics.write(snapshot, 0.0)
    assert [r.getMessage() for r in caplog.records].count(
        f"cannot write the metrics file {tmp_path / 'gone' / 'invoicer.prom'} (No such file or directory); "
        "trying again every tick") == 1


@pytest.mark.parametrize(("value", "says"), [("metrics.txt", "ending in .prom"),
                                             ("/no/such/dir/invoicer.prom", "does not exist")])
def test_a_bad_metrics_file_is_a_configuration_error(value: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config({"INVOICER_METRICS_FILE": value})


def test_the_daemon_rewrites_the_file_every_tick_and_last_says_stopped(
        tmp_path: Path, start_daemon: Callable[..., Daemon]) -> None:
    metrics = tmp_path / "textfile" / "billing.prom"
    metrics.parent.mkdir()
    daemon = start_daemon(tmp_path / "invoices.db", INVOICER_METRICS_FILE=str(metrics), INVOICER_WORKERS="6",
                          INVOICER_PROCESSING_DELAY_MS="1")
    daemon.wait_ready()
    daemon.wait_stored(500)
    assert daemon.notify is not None
    daemon.notify.wait_for(lambda m: m.startswith("STATUS=running"), 10, daemon.process.pid)
    running = samples(metrics.read_text())
    labels = {"daemon": "billing"}
    assert running[("invoicer_state", tuple(sorted({**labels, "state": "running"}.items())))] == 1
    assert running[("invoicer_workers", tuple(labels.items()))] == 6
    assert running[("invoicer_committed_total", tuple(labels.items()))] > 0
    daemon.signal(signal.SIGTERM)
    code, _ = daemon.wait()
    assert code == 0
    stopped = samples(metrics.read_text())
    assert stopped[("invoicer_state", tuple(sorted({**labels, "state": "stopped"}.items())))] == 1
    assert stopped[("invoicer_in_flight", tuple(labels.items()))] == 0
    assert [path.name for path in metrics.parent.iterdir()] == ["billing.prom"]  # no temporary left
