"""``invoicer run`` as a real subprocess: signals, crashes, notifications, a second instance."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from invoicer.daemon import SAME_STOP_S
from tests.conftest import Daemon, assert_gap_free, daemon_env, table_facts

StartDaemon = Callable[..., Daemon]


def records(output: str) -> list[dict[str, object]]:
    """Parse every line the daemon printed as JSON (each must be one object)."""
    return [json.loads(line) for line in output.splitlines()]


def messages(output: str) -> list[str]:
    """The ``message`` of every log record."""
    return [str(r["message"]) for r in records(output)]


def test_help_and_version() -> None:
    """--help describes the commands and --version prints the version; both exit 0."""
    env = daemon_env(Path("unused.db"))
    shown = subprocess.run([sys.executable, "-m", "invoicer", "--help"], env=env, capture_output=True,
                           text=True, check=True, timeout=30)
    assert "run" in shown.stdout
    assert "INVOICER_WORKERS" in shown.stdout
    version = subprocess.run([sys.executable, "-m", "invoicer", "--version"], env=env, capture_output=True,
                             text=True, check=True, timeout=30)
    assert version.stdout.startswith("invoicer 0.")


def test_sigterm_under_load_drains_and_exits_0(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """SIGTERM under load: READY first, STATUS with a rate, drain, STOPPING=1 last, exit 0, gap-free."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="1")
    daemon.wait_ready()
    daemon.wait_stored(2000)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    assert daemon.notify is not None
    daemon.notify.drain()
    sent = daemon.notify.assignments()
    assert sent[0] == "READY=1"
    assert sent[-1] == "STOPPING=1"
    assert any(a.startswith("STATUS=running: 8 workers, ") and " invoices/s, " in a for a in sent)
    assert any(a.startswith("STATUS=draining: ") for a in sent)
    assert sent[-2].startswith("STATUS=stopped: ")
    facts = assert_gap_free(database)
    assert facts.count >= 2000
    assert facts.failed == 0
    drained = [r for r in records(output) if r["message"] == "drained and stopped"]
    assert drained[0]["stored_total"] == facts.count
    assert drained[0]["pending"] == 0


def test_sigint_drains_too(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """SIGINT (Ctrl-C in a terminal) drains and stops exactly like SIGTERM."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="0")
    daemon.wait_stored(500)
    daemon.signal(signal.SIGINT)
    code, output = daemon.wait()
    assert code == 0, output
    assert "SIGINT received: draining" in messages(output)
    assert_gap_free(database)


def test_consumer_threads_share_the_configured_cpu(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """INVOICER_CONSUMER_CPU pins a real daemon's consumer threads, and only them; `ready` names the CPU."""
    allowed = os.sched_getaffinity(0)
    cpu = max(allowed)
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="3", INVOICER_PROCESSING_DELAY_MS="1",
                          INVOICER_CONSUMER_CPU=str(cpu))
    daemon.wait_stored(300)
    pid = daemon.process.pid
    masks = {int(task.name): os.sched_getaffinity(int(task.name))
             for task in Path(f"/proc/{pid}/task").iterdir()}
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    assert masks[pid] == allowed  # the main thread
    pinned = [tid for tid, mask in masks.items() if mask == {cpu}]
    assert len(pinned) == (3 if len(allowed) > 1 else len(masks))
    ready = [r for r in records(output) if r["message"] == "ready"]
    assert ready[0]["consumer_cpu"] == cpu
    assert_gap_free(database)


def test_watchdog_pings_at_half_the_interval(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """With WATCHDOG_USEC=2s, no WATCHDOG_PID and rare STATUS=, a busy daemon still pings every second."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="1",
                          WATCHDOG_USEC="2000000", INVOICER_STATUS_INTERVAL="30")
    daemon.wait_ready()
    assert daemon.notify is not None
    arrivals = []
    for _ in range(4):
        daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=10)
        arrivals.append(time.monotonic())
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(0.8 <= gap < 2.0 for gap in gaps), gaps
    daemon.signal()
    assert daemon.wait()[0] == 0


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """SIGKILL at random moments, restarting each time, then a clean stop: the table is gap-free."""
    database = tmp_path / "invoices.db"
    rng = random.Random(20261127)
    recovered_total = 0
    for _cycle in range(4):
        daemon = start_daemon(database, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="2")
        daemon.wait_ready()
        time.sleep(rng.uniform(0.05, 0.8))  # the random crash point
        daemon.signal(signal.SIGKILL)
        code, output = daemon.wait()
        assert code == -signal.SIGKILL
        recovered_total += sum(int(str(r.get("recovered", 0))) for r in records(output))
        facts = table_facts(database)
        assert facts.count == facts.distinct
        assert facts.max_id is None or facts.max_id <= facts.high_water
    final = start_daemon(database, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="2")
    final.wait_ready()
    final.wait_stored(table_facts(database).high_water)  # the recovered backlog is done
    final.signal()
    code, output = final.wait()
    assert code == 0, output
    recovered_total += sum(int(str(r.get("recovered", 0))) for r in records(output))
    assert recovered_total > 0  # the crashes really left numbers to recover
    assert_gap_free(database)


def test_second_instance_is_refused_and_first_unharmed(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """A second daemon on the same database exits 75 with one clear line; the first keeps going."""
    database = tmp_path / "invoices.db"
    first = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="1")
    first.wait_ready()
    second = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=daemon_env(database),
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 75
    errors = [r for r in records(second.stdout) if r["level"] == "ERROR"]
    assert len(errors) == 1
    assert "in use by another invoicer instance" in str(errors[0]["message"])
    assert str(database) in str(errors[0]["message"])
    before = table_facts(database).count
    first.wait_stored(before + 100)
    first.signal()
    assert first.wait()[0] == 0
    assert_gap_free(database)


def test_second_signal_stops_at_once_and_next_start_recovers(tmp_path: Path,
                                                              start_daemon: StartDaemon) -> None:
    """A second SIGTERM during a long drain exits at once (128+15); the next start recovers the rest."""
    database = tmp_path / "invoices.db"
    slow = start_daemon(database, INVOICER_WORKERS="2", INVOICER_PROCESSING_DELAY_MS="100",
                        INVOICER_QUEUE_SIZE="400")
    slow.wait_stored(4)
    slow.signal()
    assert slow.notify is not None
    slow.notify.wait_for(lambda m: m.startswith("STATUS=draining"))
    time.sleep(SAME_STOP_S)  # by the clock on purpose: a signal sooner would count as the same request
    slow.signal()
    code, output = slow.wait(timeout=10)
    assert code == 128 + signal.SIGTERM
    assert any("stopping at once" in m for m in messages(output))
    left = table_facts(database)
    assert left.high_water > left.count  # the abandoned numbers are owed
    again = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="0")
    again.wait_stored(left.high_water)
    again.signal()
    code, output = again.wait()
    assert code == 0, output
    recovery = next(r for r in records(output) if str(r["message"]).startswith("recovery"))
    assert recovery["recovered"] == left.high_water - left.count
    assert_gap_free(database)


def test_the_same_stop_delivered_twice_still_drains(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Two SIGTERMs back to back (as GNU timeout sends them) are one request: a clean drain, exit 0."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="2", INVOICER_PROCESSING_DELAY_MS="20",
                          INVOICER_QUEUE_SIZE="64")
    daemon.wait_stored(20)
    daemon.signal()
    while "SIGTERM received: draining" not in daemon.log_path.read_text():  # the first one is handled
        time.sleep(0.005)
    daemon.signal()  # well within SAME_STOP_S of the first
    code, output = daemon.wait()
    assert code == 0, output
    assert "SIGTERM again within 0.25s: the same stop request" in messages(output)
    assert "drained and stopped" in messages(output)
    assert_gap_free(database)


def test_poison_and_garbage_invoices_do_not_stop_the_pipeline(tmp_path: Path,
                                                               start_daemon: StartDaemon) -> None:
    """Invoices that keep failing are stored as failed with their error; numbering stays gap-free."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="0",
                          INVOICER_PROCESSOR="tests.plugins.processors:poison_sevens")
    daemon.wait_stored(300)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output
    facts = assert_gap_free(database)
    assert facts.failed == (facts.max_id or 0) // 7
    failures = [r for r in records(output) if r["level"] == "ERROR"]
    assert failures
    assert all(int(str(r["invoice"])) % 7 == 0 and "ValueError" in str(r["exc_info"]) for r in failures)


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    """A file that is not SQLite: one error line naming it, exit 74, the file unchanged."""
    database = tmp_path / "invoices.db"
    database.write_text("not sqlite\n" * 100)
    result = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=daemon_env(database),
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 74
    errors = [r for r in records(result.stdout) if r["level"] == "ERROR"]
    assert len(errors) == 1
    assert f"database {database} is not a usable SQLite database" in str(errors[0]["message"])
    assert database.read_text() == "not sqlite\n" * 100
