"""Fault injection with real processes and real files: nothing lost, duplicated or skipped.

Cycles per fault: INVOICER_FAULT_CYCLES (default 3; the long mode is INVOICER_FAULT_CYCLES=50).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from invoicer.processing import sample_invoice
from invoicer.storage import Storage
from tests.conftest import (
    Daemon,
    assert_consistent,
    assert_gap_free,
    daemon_env,
    require,
    stored_in_status,
    table_facts,
)
from tests.namespace import MountNamespace, can_unshare

CYCLES = int(os.environ.get("INVOICER_FAULT_CYCLES", "3"))
StartDaemon = Callable[..., Daemon]
LOAD = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "1"}


def records(output: str) -> list[dict[str, object]]:
    """Every log line as JSON."""
    return [json.loads(line) for line in output.splitlines()]


def digest(*paths: Path) -> list[str]:
    """Content hashes, to prove files were left exactly as they were."""
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent" for p in paths]


@pytest.mark.timeout(120 + 20 * CYCLES)
def test_sigterm_at_random_moments(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """SIGTERM at random moments under load: exit 0 every time and gap-free, nothing left owed."""
    database = tmp_path / "invoices.db"
    rng = random.Random(5)
    for _cycle in range(CYCLES):
        daemon = start_daemon(database, **LOAD)
        daemon.wait_ready()
        time.sleep(rng.uniform(0.0, 0.7))  # the random moment
        daemon.signal(signal.SIGTERM)
        code, output = daemon.wait()
        assert code == 0, output
        assert_gap_free(database)


@pytest.mark.timeout(120 + 30 * CYCLES)
def test_sigkill_while_running_draining_or_recovering(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """SIGKILL while running, mid-drain or mid-recovery: consistent every time; a clean stop: gap-free."""
    database = tmp_path / "invoices.db"
    rng = random.Random(11)
    moments = ["running", "draining", "recovering"]
    for cycle in range(CYCLES):
        moment = moments[cycle % 3]
        daemon = start_daemon(database, **LOAD)
        if moment == "recovering":
            time.sleep(rng.uniform(0.0, 0.3))  # around start-up, while the backlog is processed first
        else:
            daemon.wait_ready()
            time.sleep(rng.uniform(0.05, 0.5))
            if moment == "draining":
                daemon.signal(signal.SIGTERM)
                time.sleep(rng.uniform(0.0, 0.1))
        daemon.signal(signal.SIGKILL)
        code, _ = daemon.wait()
        assert code == -signal.SIGKILL
        if database.exists():
            assert_consistent(database)
    final = start_daemon(database, **LOAD)
    final.wait_ready()
    final.wait_stored(table_facts(database).high_water)
    final.signal()
    assert final.wait()[0] == 0
    assert_gap_free(database)


def test_recovery_interrupted_is_finished_by_the_next_start(tmp_path: Path,
                                                             start_daemon: StartDaemon) -> None:
    """A large backlog, SIGKILL while recovering it, then a start that finishes it: gap-free."""
    database = tmp_path / "invoices.db"
    storage = Storage(database)
    storage.open()
    storage.reserve(20_000)  # handed out, never stored: as after a crash with this much in flight
    storage.close()
    first = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="1")
    first.wait_stored(2_000)
    first.signal(signal.SIGKILL)
    first.wait()
    halfway = assert_consistent(database)
    assert halfway.count < 20_000
    second = start_daemon(database, INVOICER_WORKERS="32", INVOICER_PROCESSING_DELAY_MS="0")
    second.wait_stored(20_000)
    second.signal()
    code, output = second.wait()
    assert code == 0, output
    recovery = next(r for r in records(output) if str(r["message"]).startswith("recovery"))
    assert recovery["recovered"] == 20_000 - halfway.count
    assert second.notify is not None
    assert any(a.startswith("STATUS=recovering: ") for a in second.notify.assignments())
    assert second.notify.assignments()[-2].startswith("STATUS=stopped: ")
    assert assert_gap_free(database).count >= 20_000


def test_disk_full_exits_non_zero_and_a_restart_resumes(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """A full disk: logged and in STATUS=, exit 74, nothing lost; with space back, a restart is gap-free."""
    require(can_unshare(), "a private mount namespace needs root and unshare")
    directory = tmp_path / "small"
    directory.mkdir()
    with MountNamespace(f"mount -t tmpfs -o size=2m tmpfs {directory}") as namespace:
        database = directory / "invoices.db"
        daemon = start_daemon(database, prefix=namespace.enter(), INVOICER_WORKERS="4",
                              INVOICER_PROCESSING_DELAY_MS="0")
        code, output = daemon.wait(timeout=120)
        assert code == 74, output
        errors = [r for r in records(output) if r["level"] == "CRITICAL"]
        assert len(errors) == 1
        assert "disk is full" in str(errors[0]["message"])
        assert daemon.notify is not None
        daemon.notify.drain()
        assert any(a.startswith("STATUS=failed: ") and "disk is full" in a
                   for a in daemon.notify.assignments())

        def copy_out(name: str) -> Path:  # SQLite reads a WAL database reliably on the host's own path
            target = tmp_path / name
            target.mkdir()
            namespace.run(f"cp {database}* {target}/")
            return target / database.name

        full = assert_consistent(copy_out("after-full"))
        assert full.count > 0
        namespace.run(f"mount -o remount,size=64m {directory}")  # space is back
        again = start_daemon(database, prefix=namespace.enter(), INVOICER_WORKERS="4",
                             INVOICER_PROCESSING_DELAY_MS="1")
        again.wait_stored(full.high_water)
        again.signal()
        assert again.wait()[0] == 0
        assert assert_gap_free(copy_out("after-restart")).count >= full.high_water


def test_read_only_location_is_refused(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """A database on a read-only mount: one error naming the path and the problem, 74, files unchanged."""
    require(can_unshare(), "a private mount namespace needs root and unshare")
    database = tmp_path / "invoices.db"
    seed = start_daemon(database, **LOAD)
    seed.wait_stored(500)
    seed.signal()
    assert seed.wait()[0] == 0
    files = [database, Path(f"{database}-wal"), Path(f"{database}-shm")]
    before = digest(*files)
    with MountNamespace(f"mount --bind {tmp_path} {tmp_path}\nmount -o remount,bind,ro {tmp_path}") as ns:
        result = subprocess.run([*ns.enter(), sys.executable, "-m", "invoicer", "run"],
                                env=daemon_env(database), capture_output=True, text=True, timeout=60,
                                check=False)
    assert result.returncode == 74
    (error,) = [r for r in records(result.stdout) if r["level"] == "ERROR"]
    assert str(database) in str(error["message"])
    assert "Read-only file system" in str(error["message"])
    assert digest(*files) == before


def killed_with_wal(database: Path, start_daemon: StartDaemon) -> Path:
    """A database whose writer was SIGKILLed, so its write-ahead log still holds transactions."""
    daemon = start_daemon(database, **LOAD)
    daemon.wait_stored(300)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    wal = Path(f"{database}-wal")
    assert wal.stat().st_size > 32
    return wal


@pytest.mark.parametrize("damage", ["page-size", "checksum"])
def test_damaged_wal_is_refused_and_left_alone(tmp_path: Path, start_daemon: StartDaemon,
                                               damage: str) -> None:
    """A live WAL's header damaged in a way no power cut explains: refused, 74, database and WAL unchanged."""
    database = tmp_path / "invoices.db"
    wal = killed_with_wal(database, start_daemon)
    content = bytearray(wal.read_bytes())
    if damage == "page-size":
        content[8:12] = b"\xff\xff\xff\xff"
    else:  # frame 1 was written under this header, so it was whole and synced: the damage came later
        content[24] ^= 0xFF
    wal.write_bytes(content)
    before = digest(database, wal)
    result = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=daemon_env(database),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 74
    (error,) = [r for r in records(result.stdout) if r["level"] == "ERROR"]
    assert f"write-ahead log {wal} is damaged" in str(error["message"])
    assert digest(database, wal) == before


@pytest.mark.parametrize("state", ["intact", "short-header", "torn-restart-header"])
def test_wal_a_power_cut_can_leave_is_accepted(tmp_path: Path, start_daemon: StartDaemon, state: str) -> None:
    """A crash's live WAL, a new log's header torn, a restart's header torn: the next start recovers all."""
    database = tmp_path / "invoices.db"
    wal = killed_with_wal(database, start_daemon)
    if state != "intact":  # the files as a cut leaves them once every frame is in the database file
        content = wal.read_bytes()
        connection = sqlite3.connect(database)
        assert connection.execute("PRAGMA wal_checkpoint(FULL)").fetchone()[0] == 0
        copy = tmp_path / "cut" / database.name
        copy.parent.mkdir()
        shutil.copy(database, copy)
        connection.close()
        database, wal = copy, Path(f"{copy}-wal")
        if state == "short-header":  # a new log's first write, torn at byte 20
            wal.write_bytes(content[:20])
        else:  # a restart's new checkpoint sequence and salts reached the disk, its checksum did not
            sequence, salt = struct.unpack(">2I", content[12:20])
            wal.write_bytes(content[:12] + struct.pack(">3I", sequence + 1, salt + 1, 7) + content[24:])
    before = table_facts(database)
    again = start_daemon(database, **LOAD)
    again.wait_ready()
    again.wait_stored(before.high_water)
    again.signal()
    assert again.wait()[0] == 0
    assert assert_gap_free(database).count >= before.count


def hold_write_lock(database: Path) -> subprocess.Popen[str]:
    """The sqlite3 shell holding a write transaction open on the database."""
    require(subprocess.run(["which", "sqlite3"], capture_output=True, check=False).returncode == 0,
            "the sqlite3 shell is needed")
    shell = subprocess.Popen(["sqlite3", str(database)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert shell.stdin is not None
    assert shell.stdout is not None
    # .timeout: wait for the daemon's own transaction to end; .bail: no "locked" unless BEGIN succeeded.
    shell.stdin.write(".timeout 10000\n.bail on\nBEGIN IMMEDIATE;\nSELECT 'locked';\n")
    shell.stdin.flush()
    assert shell.stdout.readline().strip() == "locked"
    return shell


def release(shell: subprocess.Popen[str]) -> None:
    """End the shell's transaction and the shell."""
    assert shell.stdin is not None
    shell.stdin.write("ROLLBACK;\n.quit\n")
    shell.stdin.close()
    shell.wait(10)
    if shell.stdout is not None:
        shell.stdout.close()


def test_locked_by_another_program(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Another program's write lock: a running daemon waits it out, saying it is stalled; a start exits 75."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, **LOAD)
    daemon.wait_stored(500)
    shell = hold_write_lock(database)  # taken while the daemon runs
    try:
        assert daemon.notify is not None
        daemon.notify.wait_for(lambda m: "stalled: storage: a commit has not finished" in m, 60,
                               daemon.process.pid)
        assert daemon.process.poll() is None
    finally:
        release(shell)
    stalled_at = table_facts(database).count
    daemon.wait_stored(stalled_at + 500)  # the lock gone, it goes on by itself
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output
    assert any("is locked by another program" in str(r["message"]) for r in records(output))
    shell = hold_write_lock(database)
    try:
        refused = subprocess.run([sys.executable, "-m", "invoicer", "run"], env=daemon_env(database),
                                 capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 75  # a start does not wait: systemd retries it
        assert "locked by another program" in refused.stdout
    finally:
        release(shell)
    assert_gap_free(database)


def test_failed_invoices_listed_and_retried(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Poison and garbage invoices are stored failed; `invoicer failed` lists them; `retry` mends them."""
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="0",
                          INVOICER_PROCESSOR="tests.plugins.processors:garbage_for_fives")
    daemon.wait_stored(400)
    refused = subprocess.run([sys.executable, "-m", "invoicer", "retry"], env=daemon_env(database),
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 75
    assert "stop the daemon" in refused.stderr
    daemon.signal()
    assert daemon.wait()[0] == 0
    facts = assert_gap_free(database)
    assert facts.failed == (facts.max_id or 0) // 5
    listed = subprocess.run([sys.executable, "-m", "invoicer", "failed", "--json"], env=daemon_env(database),
                            capture_output=True, text=True, timeout=60, check=True)
    failed = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [f["invoice"] for f in failed] == list(range(5, (facts.max_id or 0) + 1, 5))
    assert all("expected Invoice" in f["error"] and f["attempts"] == 3 for f in failed)
    mended = subprocess.run([sys.executable, "-m", "invoicer", "retry"],
                            env=daemon_env(database, INVOICER_PROCESSOR="tests.plugins.processors:echo"),
                            capture_output=True, text=True, timeout=120, check=False)
    assert mended.returncode == 0, mended.stderr
    assert f"retried {len(failed)} failed invoices: {len(failed)} now ok, 0 still failed" in mended.stdout
    after = assert_gap_free(database)
    assert after.failed == 0
    with sqlite3.connect(database) as connection:
        attempts, document, order_id = connection.execute(
            "SELECT attempts, document, order_id FROM invoices WHERE id = 5").fetchone()
    connection.close()
    assert attempts == 4  # three that failed, one that worked
    assert (document, order_id) == (sample_invoice(5).document, None)  # no order: retried with the demo one


def test_stored_in_status_reads_the_total() -> None:
    """The helper reads the stored total out of a STATUS line (the tests above rely on it)."""
    assert stored_in_status("STATUS=running: 4 workers, 1,234 invoices/s, 56,789 stored, queue 3") == 56789
