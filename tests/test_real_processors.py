"""Real `invoicer run` processes against processors that misbehave as real ones do.

Calls that hang, a service that goes down, a commit that fails during the drain, a main thread that
fails, processors that start subprocesses: the promises (nothing lost, duplicated or skipped; honest
exit codes; a truthful watchdog) must hold for them, not only for the built-in stand-in.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

from invoicer.config import cpu_list
from invoicer.outage import OUTAGE_INVOICES
from invoicer.storage import parse_runs
from tests.conftest import Daemon, NotifyListener, assert_gap_free, stored_in_status, table_facts

StartDaemon = Callable[..., Daemon]
PLUGINS = "tests.plugins.processors"


def records(output: str) -> list[dict[str, object]]:
    """The JSON log records a daemon printed."""
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def sql(database: Path, query: str) -> list[tuple[object, ...]]:
    """Run one query with plain SQL, as an operator would."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(query).fetchall()
    connection.close()
    return rows


def statuses(notify: NotifyListener, pid: int) -> Callable[[Callable[[str], bool]], str]:
    """A waiter for the next STATUS= line (of ``pid``) that satisfies a predicate."""
    def wait(predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        return notify.wait_for(lambda m: m.startswith("STATUS=") and predicate(m[7:]), timeout, pid)
    return wait


def test_a_hung_call_is_given_up_and_durability_moves_on(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """A call that never returns is stored as failed after its deadline; stored_through passes it."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="16", INVOICER_INVOICE_TIMEOUT="1",
                          INVOICER_PROCESSOR=f"{PLUGINS}:hang_on_and_wait", HANG_ON="100",
                          PROCESSING_S="0.002")
    daemon.wait_ready()
    assert daemon.notify is not None
    wait = statuses(daemon.notify, daemon.process.pid)
    wait(lambda s: "1 hung calls abandoned" in s)
    first = stored_in_status(wait(lambda s: stored_in_status("STATUS=" + s) > 0))
    wait(lambda s: stored_in_status("STATUS=" + s) > first + 2000)
    assert table_facts(database).stored_through > 100  # the hung number no longer holds it back
    runs = str(sql(database, "SELECT stored_runs FROM sequence")[0][0])
    assert len(parse_runs(runs)) <= 16  # a gap per call in flight, at most
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait(30)
    assert code == 0, output
    facts = assert_gap_free(database)
    assert facts.failed == 1
    (error,) = sql(database, "SELECT error FROM invoices WHERE id = 100")[0]
    assert "InvoiceTimeoutError: processor call did not return within 1s" in str(error)


def test_recovery_after_a_hang_reads_the_runs_not_the_rows(tmp_path: Path,
                                                            start_daemon: StartDaemon) -> None:
    """Killed while a call hangs far below many commits, the next start owes exactly the unstored numbers."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="0",
                          INVOICER_PROCESSOR=f"{PLUGINS}:hang_on", HANG_ON="50")
    daemon.wait_stored(20_000)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    facts = table_facts(database)
    assert facts.stored_through < 50 < facts.count
    runs = parse_runs(str(sql(database, "SELECT stored_runs FROM sequence")[0][0]))
    assert 1 <= len(runs) <= 8 + 1  # merged: a run per gap, not a row per invoice
    again = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSOR=f"{PLUGINS}:echo")
    again.wait_ready()
    again.signal(signal.SIGTERM)
    code, output = again.wait()
    assert code == 0, output
    recovery = next(r for r in records(output) if str(r["message"]).startswith("recovery:"))
    assert recovery["recovered"] == facts.high_water - facts.count
    assert recovery["stored_total"] == facts.count
    assert_gap_free(database)


def test_an_outage_pauses_instead_of_failing_invoices(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """All calls failing pauses intake (STATUS says why, pings go on); it resumes itself, nothing failed."""
    database = tmp_path / "invoices.db"
    flag = tmp_path / "service-down"
    daemon = start_daemon(database, INVOICER_WORKERS="32", WATCHDOG_USEC="2000000",
                          INVOICER_PROCESSOR=f"{PLUGINS}:down_while_flagged", OUTAGE_FLAG=str(flag))
    daemon.wait_stored(500)
    assert daemon.notify is not None
    wait = statuses(daemon.notify, daemon.process.pid)
    flag.touch()
    paused = wait(lambda s: s.startswith("paused: ConnectionError: [Errno 111] Connection refused"))
    for _ in range(3):  # paused is a legitimate standstill: the watchdog keeps being fed
        daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", 10, daemon.process.pid)
    flag.unlink()
    resumed_from = stored_in_status(paused)
    wait(lambda s: s.startswith("running:") and stored_in_status("STATUS=" + s) > resumed_from + 500)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    assert assert_gap_free(database).failed == 0
    events = [r["event"] for r in records(output) if "event" in r]
    assert events[:2] == ["paused", "resumed"]


def test_the_drain_waits_for_a_hung_call_only_until_its_deadline(tmp_path: Path,
                                                                  start_daemon: StartDaemon) -> None:
    """SIGTERM while a call hangs: the drain gives the call up at its deadline and exits 0, gap-free."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_INVOICE_TIMEOUT="3",
                          INVOICER_PROCESSOR=f"{PLUGINS}:hang_on_and_wait", HANG_ON="20",
                          PROCESSING_S="0.01")
    daemon.wait_stored(100)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait(20)
    assert code == 0, output
    assert "drained and stopped" in output
    facts = assert_gap_free(database)
    assert sql(database, "SELECT status FROM invoices WHERE id = 20") == [("failed",)]
    assert facts.failed == 1


def test_a_failure_at_the_end_of_the_drain_is_not_swallowed(tmp_path: Path,
                                                           start_daemon: StartDaemon) -> None:
    """A commit that fails during the drain ends the process with the storage exit code, not 0."""
    database = tmp_path / "invoices.db"
    flag = tmp_path / "disk-broken"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_QUEUE_SIZE="64",
                          INVOICER_PROCESSOR="tests.plugins.failing_commit:process",
                          COMMIT_FAILS_FLAG=str(flag), PROCESSING_S="0.05")
    daemon.wait_stored(40)
    assert daemon.notify is not None
    daemon.signal(signal.SIGTERM)
    statuses(daemon.notify, daemon.process.pid)(lambda s: s.startswith("draining:"))
    flag.touch()
    code, output = daemon.wait(30)
    assert code == 74, output
    assert "writer failed during the drain" in output
    assert "drained and stopped" not in output
    facts = table_facts(database)  # what did commit is sound; the rest is recovered at the next start
    assert facts.count == facts.distinct


def test_an_exception_escaping_the_main_thread_ends_the_process(tmp_path: Path,
                                                                start_daemon: StartDaemon) -> None:
    """The main thread failing ends the process with exit 70 at once, though calls hang in other threads."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4",
                          INVOICER_PROCESSOR="tests.plugins.broken_reload:process")
    daemon.wait_stored(5)
    daemon.signal(signal.SIGHUP)
    code, output = daemon.wait(30)
    assert code == 70, output
    assert "the main thread failed: reload broke" in output


def test_more_hung_calls_than_workers_stop_the_watchdog(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Once more calls hang than there are workers the process is sick: STATUS says so, pings stop."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="2", INVOICER_INVOICE_TIMEOUT="0.5",
                          WATCHDOG_USEC="2000000", INVOICER_PROCESSOR=f"{PLUGINS}:hang_on",
                          HANG_ON=",".join(str(n) for n in range(1, 200)))
    daemon.wait_ready()
    assert daemon.notify is not None
    pid = daemon.process.pid
    statuses(daemon.notify, pid)(lambda s: "hung processor calls abandoned, more than the 2 workers" in s)
    after: list[str] = []
    while sum(m.startswith("STATUS=") for m in after) < 10:  # a second of ticks: nothing but STATUS=
        message = daemon.notify.receive(10, pid)
        assert message is not None
        after.append(message)
    assert "WATCHDOG=1" not in after
    daemon.signal(signal.SIGKILL)
    daemon.wait()


def test_a_processor_subprocess_may_use_every_cpu(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """By default consumer threads are not pinned, so what a processor starts may use all the CPUs."""
    database = tmp_path / "invoices.db"
    seen = tmp_path / "cpus"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSOR=f"{PLUGINS}:run_subprocess",
                          SUBPROCESS_CPUS=str(seen))
    daemon.wait_stored(20)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    assert set(seen.read_text().split()) == {cpu_list(os.sched_getaffinity(0))}
    assert_gap_free(database)


def test_a_long_outage_resumes_when_the_service_returns(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Down from the start at one worker: invoices go round as probes, none is stuck; it resumes after."""
    database = tmp_path / "invoices.db"
    flag = tmp_path / "service-down"
    flag.touch()
    daemon = start_daemon(database, INVOICER_WORKERS="1", INVOICER_QUEUE_SIZE="1",
                          INVOICER_PROCESSOR=f"{PLUGINS}:down_while_flagged", OUTAGE_FLAG=str(flag))
    daemon.wait_ready()
    assert daemon.notify is not None
    wait = statuses(daemon.notify, daemon.process.pid)
    wait(lambda s: s.startswith("paused: ConnectionError"))
    for _ in range(40):  # four seconds paused: past three failed probes of the first invoice
        wait(lambda s: s.startswith("paused:"))
    flag.unlink()
    wait(lambda s: s.startswith("running:") and stored_in_status("STATUS=" + s) > 100)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    facts = assert_gap_free(database)
    assert facts.failed < OUTAGE_INVOICES  # only those before the outage was recognised (one worker)
    assert "failed 3 probes" not in output


def test_a_run_of_bad_invoices_is_poison_not_an_outage(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Fifty bad orders in a row (ValueError): each stored as failed, intake never pauses."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_QUEUE_SIZE="64",
                          INVOICER_PROCESSOR=f"{PLUGINS}:bad_range", BAD_FROM="1000", BAD_TO="1049")
    daemon.wait_stored(3000)
    daemon.signal(signal.SIGTERM)
    code, output = daemon.wait()
    assert code == 0, output
    assert assert_gap_free(database).failed == 50
    assert '"event": "paused"' not in output
