"""Power cuts, stalled and failing disks under a real ``invoicer run`` on faultfs (tests/faultfs.py).

Power-cut cycles: INVOICER_FAULT_CYCLES (default 10; the long mode is INVOICER_FAULT_CYCLES=200). With
INVOICER_POWER_FIGURES=FILE each cycle appends one JSON line of figures to FILE.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.conftest import Daemon, assert_consistent, assert_gap_free, stored_in_status, table_facts

if TYPE_CHECKING:  # imported for real as a plugin, so that pytest rewrites its asserts
    from tests.faultfs_fixture import FaultMount

pytest_plugins = ("tests.faultfs_fixture",)

CYCLES = int(os.environ.get("INVOICER_FAULT_CYCLES", "10"))
StartDaemon = Callable[..., Daemon]
StartFaultFS = Callable[[], "FaultMount"]
LOAD = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "1"}
WATCHDOG_S = 2.0
MOMENTS = ("running", "reserving", "draining", "recovering")
# fsyncs a start on a cleanly stopped database makes before its first number reservation: the new log's
# header and the schema transaction (measured with faultfs stats; the tests check the STATUS they cause).
FSYNCS_BEFORE_FIRST_RESERVATION = 2
NAMES = ("invoices.db", "invoices.db-wal", "invoices.db-shm")


def on_mount(start_daemon: StartDaemon, fs: FaultMount, **env: str) -> Daemon:
    """``invoicer run`` in the mount's namespace, on a database in the mount."""
    return start_daemon(fs.inside / "invoices.db", prefix=fs.enter, **env)


def sent(daemon: Daemon) -> list[str]:
    """Every notification this daemon process sent so far."""
    assert daemon.notify is not None
    return [m for m, pid in zip(daemon.notify.messages, daemon.notify.senders, strict=True)
            if pid == daemon.process.pid]


def reported(daemon: Daemon) -> int:
    """The highest stored total any STATUS= of this process, now ended, reported (0 if none).

    A commit is counted only once its fsync returned, so even a STATUS= sent after a cut reports only
    what reached the disk before it.
    """
    assert daemon.notify is not None
    daemon.notify.drain()
    return max([0, *(stored_in_status(m) for m in sent(daemon))])


def messages_until(daemon: Daemon, predicate: Callable[[str], bool], timeout: float
                   ) -> list[tuple[float, str]]:
    """Notifications of ``daemon``, stamped on arrival, up to and including one matching ``predicate``."""
    assert daemon.notify is not None
    arrived: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = daemon.notify.receive(left, daemon.process.pid)
        if message is None:
            break
        arrived.append((time.monotonic(), message))
        if predicate(message):
            return arrived
    raise AssertionError(f"no matching notification within {timeout}s; got {arrived[-3:]}")


def pings(messages: list[tuple[float, str]]) -> list[float]:
    """When the WATCHDOG=1 pings among ``messages`` arrived."""
    return [at for at, message in messages if "WATCHDOG=1" in message.split("\n")]


def copy_of(directory: Path, target: Path) -> Path:
    """Copy the database files as they lie on the disk; return the copy's database (read, not booted)."""
    target.mkdir()
    for name in NAMES:
        if (directory / name).exists():
            shutil.copy(directory / name, target / name)
    return target / "invoices.db"


def cut_and_kill(fs: FaultMount, daemon: Daemon, rng: random.Random) -> tuple[int, int]:
    """Cut the power (tearing every file's last write half the time), SIGKILL, unmount; (exit, reported)."""
    fs.client.cut(tear="all" if rng.random() < 0.5 else "", seed=rng.randrange(1 << 30))
    daemon.signal(signal.SIGKILL)
    code, _ = daemon.wait()
    fs.stop()
    return code, reported(daemon)


def seed_database(start_daemon: StartDaemon, fs: FaultMount, stored: int) -> None:
    """Run on the mount until ``stored`` invoices are stored, then stop cleanly (everything synced)."""
    daemon = on_mount(start_daemon, fs, **LOAD)
    daemon.wait_stored(stored)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output


def run_until_moment(start_daemon: StartDaemon, fs: FaultMount, moment: str, rng: random.Random,
                     env: dict[str, str]) -> Daemon:
    """Start on the mount and return at the chosen moment, the daemon still running (or just stopped)."""
    if moment == "reserving":  # stall exactly the first reservation's fsync; the cut lands inside it
        seed_database(start_daemon, fs, rng.randint(50, 2000))
        fs.client.freeze(after=FSYNCS_BEFORE_FIRST_RESERVATION)
    daemon = on_mount(start_daemon, fs, **env)
    daemon.wait_ready()
    if moment == "reserving":
        deadline = time.monotonic() + 30
        while fs.client.stats()["waiting"] != 1:  # the file system's own counter: nothing to wait on
            assert time.monotonic() < deadline, "the reservation's fsync never arrived"
            time.sleep(0.01)
    elif moment == "recovering":  # READY's STATUS says recovering: the owed numbers go first
        assert "STATUS=recovering: " in next(m for m in sent(daemon) if "READY=1" in m)
        for _ in range(rng.randint(0, 3)):
            if daemon.notify is not None:
                daemon.notify.receive(1.0, daemon.process.pid)
    else:
        daemon.wait_stored(rng.randint(1, 6000))
    if moment == "draining":
        daemon.signal(signal.SIGTERM)
        for _ in range(rng.randint(1, 3)):  # a STATUS or two into the drain, unless it is over sooner
            if daemon.process.poll() is not None:
                break
            last = messages_until(daemon, lambda m: "STATUS=" in m or "STOPPING=1" in m.split("\n"), 5.0)
            if "STOPPING=1" in last[-1][1].split("\n"):  # the drain is over: nothing more will come
                break
    return daemon


def next_boot(start_daemon: StartDaemon, directory: Path) -> dict[str, Any]:
    """Start on the backing directory as the next boot would, let it recover, stop it; check gap-free."""
    database = directory / "invoices.db"
    owed = table_facts(database).high_water
    daemon = start_daemon(database, **LOAD)
    daemon.wait_stored(owed)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output
    facts = assert_gap_free(database)
    assert facts.count >= owed
    recovery = next(json.loads(line) for line in output.splitlines() if '"message": "recovery' in line)
    return {"recovered": recovery["recovered"], "after_boot": facts.count}


@pytest.mark.timeout(120 + 30 * CYCLES)
@pytest.mark.parametrize("cycle", range(CYCLES))
def test_power_cut_keeps_every_reported_commit_and_the_next_boot_recovers(
        start_faultfs: StartFaultFS, start_daemon: StartDaemon, short_tmp: Path, cycle: int) -> None:
    """A cut at a random moment keeps every reported commit on disk; the next boot recovers, gap-free."""
    started = time.monotonic()
    rng = random.Random(cycle)
    moment = MOMENTS[cycle % len(MOMENTS)]
    env = {**LOAD, "INVOICER_PROCESSING_DELAY_MS": "0" if (cycle // len(MOMENTS)) % 2 else "1"}
    fs = start_faultfs()
    directory = fs.backing
    if moment == "recovering":  # first a cut that leaves numbers owed, then a boot that is cut early
        first = run_until_moment(start_daemon, fs, "running", rng, env)
        cut_and_kill(fs, first, rng)
        owed = assert_consistent(copy_of(directory, short_tmp / "before-recovery"))
        assert owed.high_water > owed.count
        fs = start_faultfs()
        for name in NAMES:
            if (directory / name).exists():
                os.rename(directory / name, fs.backing / name)  # the same disk, booted again
        directory = fs.backing
    daemon = run_until_moment(start_daemon, fs, moment, rng, env)
    code, promised = cut_and_kill(fs, daemon, rng)
    assert code in (-signal.SIGKILL, 74)  # killed, or it met the dead disk first and said so
    # What the next boot finds, read with plain sqlite3 before the daemon runs again (on a copy, so
    # that the daemon then meets the files exactly as the cut left them).
    found = assert_consistent(copy_of(directory, short_tmp / "after-cut"))
    assert found.count >= promised
    figures = {"cycle": cycle, "moment": moment, "delay_ms": env["INVOICER_PROCESSING_DELAY_MS"],
               "exit": code, "reported": promised, "on_disk": found.count,
               "unreported": found.count - promised, "owed": found.high_water - found.count,
               **next_boot(start_daemon, directory), "seconds": round(time.monotonic() - started, 2)}
    if path := os.environ.get("INVOICER_POWER_FIGURES"):
        with open(path, "a") as out:
            out.write(json.dumps(figures) + "\n")


# -- a stalled disk ------------------------------------------------------------------------------------


def test_frozen_disk_stops_the_pings_and_a_thaw_resumes(faultfs: FaultMount, start_daemon: StartDaemon
                                                         ) -> None:
    """A frozen fsync under load: pings stop within a watchdog interval, STATUS says stalled; thaw: on."""
    daemon = on_mount(start_daemon, faultfs, WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)), **LOAD)
    daemon.wait_stored(2000)
    faultfs.client.freeze()
    frozen_at = time.monotonic()
    stalled = messages_until(daemon, lambda m: "stalled: storage: " in m, WATCHDOG_S)
    assert stalled[-1][0] - frozen_at < WATCHDOG_S
    assert all(at - frozen_at < WATCHDOG_S for at in pings(stalled))
    held = stored_in_status(stalled[-1][1])
    # One more watchdog interval: no ping at all, and nothing more stored (nothing can commit).
    assert daemon.notify is not None
    quiet: list[str] = []
    while (message := daemon.notify.receive(max(0.0, frozen_at + 2 * WATCHDOG_S - time.monotonic()),
                                            daemon.process.pid)) is not None:
        quiet.append(message)
    assert not [m for m in quiet if "WATCHDOG=1" in m.split("\n")]
    assert all("stalled: storage: " in m and stored_in_status(m) == held for m in quiet if "STATUS=" in m)
    faultfs.client.thaw()
    messages_until(daemon, lambda m: "WATCHDOG=1" in m.split("\n"), 10.0)
    daemon.wait_stored(held + 1000)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output
    faultfs.stop()
    assert assert_gap_free(faultfs.backing / "invoices.db").count >= held + 1000


@pytest.mark.parametrize("then", ["thaw", "cut"])
def test_killed_while_frozen_recovers_gap_free(faultfs: FaultMount, start_daemon: StartDaemon,
                                               then: str) -> None:
    """SIGKILL during a frozen fsync, then the disk back or the power cut: the next boot is gap-free."""
    daemon = on_mount(start_daemon, faultfs, WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)), **LOAD)
    daemon.wait_stored(2000)
    faultfs.client.freeze()
    messages_until(daemon, lambda m: "stalled: storage: " in m, WATCHDOG_S)
    daemon.signal(signal.SIGKILL)
    # The thread inside the frozen fsync cannot leave the kernel until the disk answers (as on a real
    # stalled disk, it sits in D state), so the process ends only once it thaws or the power goes.
    if then == "thaw":
        faultfs.client.thaw()
    else:
        faultfs.client.cut()
    assert daemon.wait()[0] == -signal.SIGKILL
    promised = reported(daemon)
    faultfs.stop()
    assert table_facts(copy_of(faultfs.backing, faultfs.backing.parent / "copy")).count >= promised
    next_boot(start_daemon, faultfs.backing)


def test_first_reservation_frozen_sends_ready_then_withholds_pings(
        faultfs: FaultMount, start_daemon: StartDaemon) -> None:
    """The first number reservation stalls: READY=1 may come, pings stop at the stall limit, none later."""
    seed_database(start_daemon, faultfs, 500)
    faultfs.client.freeze(after=FSYNCS_BEFORE_FIRST_RESERVATION)
    daemon = on_mount(start_daemon, faultfs, WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)), **LOAD)
    ready = messages_until(daemon, lambda m: "READY=1" in m.split("\n"), 30.0)[-1][0]
    stalled = messages_until(daemon, lambda m: "stalled: storage: reserving invoice numbers" in m,
                             WATCHDOG_S)
    # The stall limit is min(10 s, WatchdogSec/2): until then a reservation is merely slow.
    assert all(at - ready < WATCHDOG_S / 2 + 0.5 for at in pings(stalled))
    assert daemon.notify is not None
    later: list[str] = []
    while (message := daemon.notify.receive(max(0.0, ready + 2 * WATCHDOG_S - time.monotonic()),
                                            daemon.process.pid)) is not None:
        later.append(message)
    assert not [m for m in later if "WATCHDOG=1" in m.split("\n")]
    assert all(stored_in_status(m) == 500 or stored_in_status(m) == stored_in_status(stalled[-1][1])
               for m in later if "STATUS=" in m)
    daemon.signal(signal.SIGKILL)
    faultfs.client.thaw()
    daemon.wait()


# -- a failing disk ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fault", "after", "doing"), [
    ("fsync", FSYNCS_BEFORE_FIRST_RESERVATION, "fsync failed while reserving invoice numbers"),
    ("fsync", FSYNCS_BEFORE_FIRST_RESERVATION + 1, "fsync failed while committing invoices"),
    ("write", None, "the disk is full while (committing invoices|reserving invoice numbers)"),
], ids=["eio-reserving", "eio-committing", "enospc"])
def test_failing_disk_exits_74_naming_the_operation_and_restarts_gap_free(
        faultfs: FaultMount, start_daemon: StartDaemon, fault: str, after: int | None, doing: str) -> None:
    """EIO on fsync, ENOSPC on write: one line naming file and operation, 74, no retry; then gap-free."""
    seed_database(start_daemon, faultfs, 500)
    if after is not None:
        faultfs.client.fail(fault, after=after)
    daemon = on_mount(start_daemon, faultfs, **LOAD)
    if after is None:
        daemon.wait_stored(1000)
        faultfs.client.fail(fault)
    code, output = daemon.wait()
    assert code == 74, output
    (error,) = [json.loads(line) for line in output.splitlines() if '"level": "CRITICAL"' in line]
    # The thread that met it, then storage's one line: "writer failed: database PATH: fsync failed ..."
    assert re.search(f"^(writer|producer) failed: database {re.escape(str(faultfs.inside))}/invoices.db: "
                     f"{doing} \\(", str(error["message"])), error
    assert error["exit_code"] == 74
    if fault == "fsync":  # fsyncgate: the failed fsync is not retried (a retry would fail again)
        assert faultfs.client.stats()["fsync_failures"] == 1
    promised = reported(daemon)
    faultfs.client.cut()  # whatever was written but not synced is gone: it must not have been counted
    faultfs.stop()
    on_disk = assert_consistent(copy_of(faultfs.backing, faultfs.backing.parent / "copy"))
    assert on_disk.count >= promised
    next_boot(start_daemon, faultfs.backing)


def test_restart_on_the_healed_mount_is_gap_free(faultfs: FaultMount, start_daemon: StartDaemon) -> None:
    """After a failed fsync and exit 74, heal: a start on the same mount recovers and stops gap-free."""
    seed_database(start_daemon, faultfs, 500)
    daemon = on_mount(start_daemon, faultfs, **LOAD)
    daemon.wait_stored(1500)
    faultfs.client.fail("fsync")
    assert daemon.wait()[0] == 74
    promised = reported(daemon)
    faultfs.client.heal()
    again = on_mount(start_daemon, faultfs, **LOAD)
    again.wait_stored(promised + 1000)
    again.signal()
    code, output = again.wait()
    assert code == 0, output
    faultfs.stop()
    with sqlite3.connect(faultfs.backing / "invoices.db") as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    connection.close()
    assert_gap_free(faultfs.backing / "invoices.db")
