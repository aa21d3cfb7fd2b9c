"""The repository's own invoicer.service under a real systemd user manager and journald (DESIGN §6)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from invoicer.config import resolve_consumer_cpu
from tests.conftest import REPO, assert_gap_free, require, table_facts
from tests.systemd_harness import UserManager, missing_requirements

pytestmark = pytest.mark.systemd

UNIT = "invoicer.service"
# Only what a user manager cannot do, where ExecStart finds the test install (DESIGN §6), and the
# tests' own environment.
DROP_IN = """\
[Service]
ExecStart=
ExecStart={bin}/invoicer run
ExecReload=
ExecReload={bin}/invoicer reload $MAINPID
DynamicUser=no
PrivateUsers=no
ProtectHome=no
ProtectKernelTunables=no
SystemCallFilter=@chown
# The tests' processor plugins (tests.plugins) live in the repository.
Environment=PYTHONPATH={repo}
# Synthetic work, without submitting orders (as tests/conftest.py's daemon_env); the environment file
# may override it.
Environment=INVOICER_SOURCE=demo
# The checkout (and its .venv) may lie under /tmp, which PrivateTmp= would hide.
BindReadOnlyPaths={repo}
"""


def test_installed_entry_point_exists() -> None:
    """The console script the drop-in points at is installed beside the test interpreter."""
    assert (Path(sys.executable).parent / "invoicer").exists()


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    """A user manager with the repository's unit, the test drop-in and an environment file."""
    yield from unit_manager()


def unit_manager() -> Iterator[UserManager]:
    """Start a user manager with the repository's unit and the test drop-in; stop it all after."""
    missing = missing_requirements()
    require(not missing, f"cannot run a systemd user manager here: missing {', '.join(missing)}")
    harness = UserManager()
    try:
        harness.start()
        shutil.copy(REPO / UNIT, harness.units / UNIT)
        drop_in = harness.units / f"{UNIT}.d"
        drop_in.mkdir()
        (drop_in / "test.conf").write_text(DROP_IN.format(bin=Path(sys.executable).parent, repo=REPO))
        harness.systemctl("daemon-reload")
        yield harness
    finally:
        harness.systemctl("stop", UNIT, check=False, timeout=60)
        harness.stop()


@contextlib.contextmanager
def extra_drop_in(manager: UserManager, name: str, text: str) -> Iterator[None]:
    """Add a drop-in for one test (daemon-reload), and take it away again afterwards."""
    path = manager.units / f"{UNIT}.d" / name
    path.write_text(text)
    try:
        manager.systemctl("daemon-reload")
        yield
    finally:
        path.unlink()
        manager.systemctl("daemon-reload")


def write_environment(manager: UserManager, **values: str) -> None:
    """Write /etc/default/invoicer as the namespace sees it (never the host's)."""
    text = "".join(f"{key}={value}\n" for key, value in values.items())
    manager.host_path("/etc/default/invoicer").write_text(text)


def database(manager: UserManager) -> Path:
    """Where StateDirectory=invoicer puts the default database under a user manager."""
    return manager.home / ".config" / "invoicer" / "invoices.db"


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` (another process's state: nothing to wait on) until true or fail."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.1)


def status(manager: UserManager) -> dict[str, str]:
    """The properties the tests look at."""
    return manager.show(UNIT, "StatusText", "MainPID", "NRestarts", "Result", "ActiveState", "SubState")


def rate_of(status_text: str) -> int:
    """The invoices/s figure in a STATUS line."""
    match = re.search(r"([\d,]+) invoices/s", status_text)
    assert match, status_text
    return int(match.group(1).replace(",", ""))


SHORT_WATCHDOG = "[Service]\nWatchdogSec=2s\nRestartSec=1s\n"
SHORT_STOP_TIMEOUT = "[Service]\nTimeoutStopSec=2s\n"
BASE_ENV = {"INVOICER_STATUS_INTERVAL": "0.2", "INVOICER_PROCESSING_DELAY_MS": "2"}


def test_unit_file_verifies_clean() -> None:
    """systemd-analyze verify reports nothing (with the binary and man page where the unit names them)."""
    require(not missing_requirements(), "systemd-analyze and unshare are needed")
    require(shutil.which("man") is not None, "man is needed for the Documentation= check")
    overlays = Path(tempfile.mkdtemp(prefix="invoicer-verify-"))
    (overlays / "bin").mkdir()
    (overlays / "man8").mkdir()
    (overlays / "doc").mkdir()
    shutil.copy(Path(sys.executable).parent / "invoicer", overlays / "bin" / "invoicer")
    shutil.copy(REPO / "packaging" / "invoicer.8", overlays / "man8" / "invoicer.8")
    script = (f"mount -t overlay overlay -o lowerdir=/usr/bin:{overlays}/bin /usr/bin && "
              f"mount -t overlay overlay -o lowerdir=/usr/share/man/man8:{overlays}/man8 "
              f"/usr/share/man/man8 && systemd-analyze verify {REPO / UNIT}")
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                 script], capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(overlays)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_security_exposure_at_most_1() -> None:
    """systemd-analyze security --offline=true scores the unit at 1.0 or better."""
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is needed")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(REPO / UNIT)],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for invoicer\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 1.0


def test_start_reports_ready_status_and_logs_to_the_journal(manager: UserManager) -> None:
    """Start returns after READY=1; status shows workers and a rate; the journal has JSON with priorities."""
    write_environment(manager, INVOICER_WORKERS="4", INVOICER_CONSUMER_CPU="auto", **BASE_ENV)
    manager.systemctl("start", UNIT)
    first = status(manager)
    assert first["ActiveState"] == "active"
    assert first["StatusText"].startswith(("running: 4 workers, ", "recovering: 4 workers, "))
    wait_until(lambda: rate_of(status(manager)["StatusText"]) > 0, what="a non-zero rate in STATUS")
    pid = first["MainPID"]
    entries = [json.loads(line) for line in manager.journal("-t", "invoicer", "-o", "json").splitlines()]
    mine = [e for e in entries if e.get("_PID") == pid]
    assert mine
    for entry in mine:
        record = json.loads(entry["MESSAGE"])
        expected = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}[record["level"]]
        assert entry["PRIORITY"] == expected
    records = [json.loads(e["MESSAGE"]) for e in mine]
    ready = [r for r in records if r["message"] == "ready"]
    assert ready
    # The unit's system call filter lets the consumer threads pin themselves (the opt-in
    # INVOICER_CONSUMER_CPU=auto).
    assert ready[0]["consumer_cpu"] == resolve_consumer_cpu("auto", os.sched_getaffinity(int(pid)))
    assert not [r for r in records if "not pinned" in r["message"]]


def test_restart_applies_a_new_worker_count(manager: UserManager) -> None:
    """Edit INVOICER_WORKERS in the environment file, restart: status shows the new count, new PID."""
    manager.systemctl("start", UNIT)
    before = status(manager)["MainPID"]
    write_environment(manager, INVOICER_WORKERS="6", **BASE_ENV)
    manager.systemctl("restart", UNIT)
    after = status(manager)
    assert after["MainPID"] != before
    assert ": 6 workers, " in after["StatusText"]


def test_reload_applies_workers_in_place(manager: UserManager) -> None:
    """Edit INVOICER_WORKERS, reload: reload returns with the new count in effect, same MainPID."""
    manager.systemctl("start", UNIT)
    before = status(manager)["MainPID"]
    write_environment(manager, INVOICER_WORKERS="3", INVOICER_LOG_LEVEL="WARNING", **BASE_ENV)
    manager.systemctl("reload", UNIT)
    after = status(manager)
    assert after["MainPID"] == before
    assert after["ActiveState"] == "active"
    assert ": 3 workers, " in after["StatusText"]


def test_reload_with_a_bad_value_keeps_running(manager: UserManager) -> None:
    """A bad value makes reload fail with the reason; the daemon keeps its configuration and PID."""
    manager.systemctl("start", UNIT)
    before = status(manager)
    write_environment(manager, INVOICER_WORKERS="lots", **BASE_ENV)
    result = manager.systemctl("reload", UNIT, check=False)
    assert result.returncode != 0
    after = status(manager)
    assert after["MainPID"] == before["MainPID"]
    assert after["ActiveState"] == "active"
    workers = re.search(r": (\d+) workers", before["StatusText"])
    assert workers
    assert f": {workers.group(1)} workers, " in after["StatusText"]

    def warnings() -> str:
        return manager.journal("-t", "invoicer", "-p", "warning", "-o", "cat", f"_PID={after['MainPID']}")

    # journald reads the stream asynchronously; the line is there, but perhaps not yet indexed.
    wait_until(lambda: "INVOICER_WORKERS='lots'" in warnings(), what="the refused reload in the journal")
    assert all(json.loads(line)["level"] in ("WARNING", "ERROR", "CRITICAL")
               for line in warnings().splitlines())


def test_stop_succeeds_and_leaves_the_table_gap_free(manager: UserManager) -> None:
    """Stop drains: Result=success, and count = max(id) = the high-water mark."""
    write_environment(manager, INVOICER_WORKERS="8", **BASE_ENV)
    manager.systemctl("restart", UNIT)
    wait_until(lambda: rate_of(status(manager)["StatusText"]) > 0, what="a non-zero rate")
    manager.systemctl("stop", UNIT)
    final = status(manager)
    assert final["Result"] == "success"
    assert final["ActiveState"] == "inactive"
    assert_gap_free(database(manager))


def test_slow_but_progressing_pipeline_keeps_its_watchdog(manager: UserManager) -> None:
    """Invoices of 0.6 s each, WatchdogSec=2s: pings continue, no restart for three watchdog periods."""
    with extra_drop_in(manager, "watchdog.conf", SHORT_WATCHDOG):
        # A queue sized for slow invoices (README: the drain takes about queue / workers invoices).
        write_environment(manager, INVOICER_WORKERS="4", INVOICER_STATUS_INTERVAL="0.2",
                          INVOICER_PROCESSING_DELAY_MS="600", INVOICER_QUEUE_SIZE="8")
        manager.systemctl("restart", UNIT)
        pid = status(manager)["MainPID"]
        started = time.monotonic()
        while time.monotonic() - started < 6.0:  # three watchdog periods, by the clock on purpose
            time.sleep(0.5)
            assert status(manager)["MainPID"] == pid
        assert status(manager)["NRestarts"] == "0"
        manager.systemctl("stop", UNIT)
        assert status(manager)["Result"] == "success"


def test_hung_workers_are_killed_by_the_watchdog_and_restarted(manager: UserManager) -> None:
    """Every call hangs: given up until more hang than workers, then pings stop and systemd restarts it."""
    with extra_drop_in(manager, "watchdog.conf", SHORT_WATCHDOG):
        write_environment(manager, INVOICER_WORKERS="4", INVOICER_STATUS_INTERVAL="0.2",
                          INVOICER_PROCESSOR="tests.plugins.processors:hang_after", HANG_AFTER="300",
                          INVOICER_PROCESSING_DELAY_MS="0", INVOICER_INVOICE_TIMEOUT="0.5")
        manager.systemctl("restart", UNIT)
        wait_until(lambda: int(status(manager)["NRestarts"]) >= 1, timeout=60, what="a watchdog restart")
        manager_log = manager.journal("-o", "cat", "_COMM=systemd")
        assert "invoicer.service: Watchdog timeout (limit 2s)!" in manager_log
        assert "invoicer.service: Failed with result 'watchdog'." in manager_log
        write_environment(manager, INVOICER_WORKERS="8", **BASE_ENV)  # the processor is mended
        manager.systemctl("restart", UNIT)
        high_water = table_facts(database(manager)).high_water
        wait_until(lambda: table_facts(database(manager)).stored_through >= high_water, timeout=60,
                   what="recovery of the abandoned numbers")
        manager.systemctl("stop", UNIT)
        assert status(manager)["Result"] == "success"
        assert_gap_free(database(manager))
        with sqlite3.connect(database(manager)) as connection:  # only calls given up before the outage
            errors = connection.execute("SELECT error FROM invoices WHERE status = 'failed'").fetchall()
        connection.close()
        assert all("did not return within 0.5s" in error for (error,) in errors)


def test_long_drain_extends_the_stop_timeout(manager: UserManager) -> None:
    """A drain longer than TimeoutStopSec=2s ends in success: STATUS draining, EXTEND_TIMEOUT_USEC."""
    with extra_drop_in(manager, "timeout.conf", SHORT_STOP_TIMEOUT):
        # 64 queued + 4 in flight at 0.3 s each over 4 workers: a drain of about 5 s.
        write_environment(manager, INVOICER_WORKERS="4", INVOICER_STATUS_INTERVAL="0.2",
                          INVOICER_PROCESSING_DELAY_MS="300", INVOICER_QUEUE_SIZE="64")
        manager.systemctl("restart", UNIT)
        pid = status(manager)["MainPID"]
        wait_until(lambda: "queue 64" in status(manager)["StatusText"], what="a full queue")
        manager.systemctl("stop", "--no-block", UNIT)
        wait_until(lambda: status(manager)["StatusText"].startswith("draining: "), what="STATUS=draining")
        wait_until(lambda: status(manager)["ActiveState"] == "inactive", timeout=60, what="the stop")
        assert status(manager)["Result"] == "success"
        summary = [json.loads(line) for line in manager.journal("-t", "invoicer", "-o", "cat",
                                                                f"_PID={pid}").splitlines()]
        drained = next(r for r in summary if r["message"] == "drained and stopped")
        assert drained["seconds"] > 2.0  # longer than TimeoutStopSec: the extensions carried it
        assert_gap_free(database(manager))


def test_the_metrics_drop_in_lets_the_unit_write_its_textfile(manager: UserManager) -> None:
    """The shipped metrics drop-in (its directory moved to the test's): the file appears, every tick."""
    textfile = manager.root / "textfile"
    textfile.mkdir()
    shipped = (REPO / "packaging" / "metrics.conf").read_text()
    assert "/var/lib/prometheus/node-exporter" in shipped
    drop_in = (shipped.replace("/var/lib/prometheus/node-exporter", str(textfile))
               .replace("SupplementaryGroups=invoicer-metrics\n", ""))  # root under the test's manager
    with extra_drop_in(manager, "metrics.conf", drop_in):
        write_environment(manager, INVOICER_WORKERS="4", **BASE_ENV)
        manager.systemctl("restart", UNIT)
        wait_until((textfile / "invoicer.prom").exists, what="the metrics file")
        wait_until(lambda: 'invoicer_state{daemon="invoicer",state="running"} 1'
                   in (textfile / "invoicer.prom").read_text(), what="state running in the metrics")
        manager.systemctl("stop", UNIT)
    assert 'invoicer_state{daemon="invoicer",state="stopped"} 1' in (textfile / "invoicer.prom").read_text()
    assert sorted(path.name for path in textfile.iterdir()) == ["invoicer.prom"]


def unit_seconds(key: str) -> float:
    """A time setting of the repository's unit, in seconds (values like 30s)."""
    for line in (REPO / UNIT).read_text().splitlines():
        if line.startswith(f"{key}="):
            return float(line.split("=", 1)[1].removesuffix("s"))
    raise AssertionError(f"{key}= is not in {UNIT}")


def test_the_daemon_abandons_a_stalled_drain_before_systemd_kills_it() -> None:
    """The daemon's own drain stall limit is below TimeoutStopSec, so its exit (and log) comes first."""
    from invoicer.daemon import DRAIN_STALL_S, STALL_S

    assert unit_seconds("TimeoutStopSec") > DRAIN_STALL_S
    assert unit_seconds("WatchdogSec") / 2 >= STALL_S  # a stalled disk stops the pings well in time
