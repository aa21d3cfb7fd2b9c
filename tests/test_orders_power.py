"""The orders source on a disk that loses power, stalls or fails (faultfs): claims made in the check process.

test_power.py proves the numbering with the demo source; here the claims themselves (paired by the check
process on its own connection) meet the cut, the frozen fsync and the failing disk, and afterwards every
order has exactly one invoice, the numbers gap-free and in submission order.
"""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import Daemon, assert_consistent, daemon_env
from tests.test_orders_daemon import ORDERS, assert_one_invoice_per_order, invoice_to_the_end, payload
from tests.test_power import copy_of, cut_and_kill, messages_until, on_mount

if TYPE_CHECKING:
    from tests.faultfs_fixture import FaultMount

pytest_plugins = ("tests.faultfs_fixture",)

StartDaemon = Callable[..., Daemon]
TOTAL = 20_000
LOAD = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "0", **ORDERS}


def submit_on(fs: FaultMount, directory: Path) -> None:
    """`invoicer submit` TOTAL orders into the database on the mount, in its namespace."""
    orders = directory / "orders.jsonl"
    orders.write_text("".join(payload(n) + "\n" for n in range(TOTAL)))
    done = subprocess.run([*fs.enter, sys.executable, "-m", "invoicer", "submit", str(orders)],
                          env=daemon_env(fs.inside / "invoices.db", **ORDERS), capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("cycle", "moment"), [(0, "running"), (1, "draining"), (2, "running")])
def test_a_power_cut_while_claiming_orders_loses_and_doubles_nothing(
        start_faultfs: Callable[[], FaultMount], start_daemon: StartDaemon, short_tmp: Path,
        cycle: int, moment: str) -> None:
    rng = random.Random(100 + cycle)
    fs = start_faultfs()
    submit_on(fs, short_tmp)
    daemon = on_mount(start_daemon, fs, **LOAD)
    daemon.wait_stored(rng.randint(1, 6_000))
    if moment == "draining":
        daemon.signal(signal.SIGTERM)  # the cut lands in the drain, the claim asked for ahead under way
    _, promised = cut_and_kill(fs, daemon, rng)
    found = assert_consistent(copy_of(fs.backing, short_tmp / "after-cut"))
    assert found.count >= promised  # every commit a STATUS= reported survived
    invoice_to_the_end(start_daemon, fs.backing / "invoices.db", TOTAL, LOAD)


def test_a_frozen_disk_holds_claims_up_and_they_go_on_after_the_thaw(
        faultfs: FaultMount, start_daemon: StartDaemon, short_tmp: Path) -> None:
    """Frozen past the check process's deadline: reported as stalled; after the thaw, nothing lost."""
    submit_on(faultfs, short_tmp)
    daemon = on_mount(start_daemon, faultfs, **LOAD)
    daemon.wait_stored(3_000)
    faultfs.client.freeze()
    stalled = re.compile(r"stalled: storage: .* has not finished for ([0-9]+)s")
    # 15 s of it: past the claim's deadline (5 s to say what it read, 5 s + 1 s more to answer).
    messages_until(daemon, lambda m: bool((found := stalled.search(m)) and int(found[1]) >= 15), 60)
    faultfs.client.thaw()
    daemon.wait_stored(TOTAL, timeout=120)
    # Healthy again: the stall report clears (a lock met before the thaw must not keep it).
    messages_until(daemon, lambda m: "STATUS=" in m and "stalled" not in m, 30)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output[-3000:]
    assert "locked by another program" not in output  # the lock was the daemon's own stuck commit
    faultfs.stop()
    assert len(assert_one_invoice_per_order(faultfs.backing / "invoices.db")) == TOTAL


@pytest.mark.parametrize("fault", ["fsync", "write"])
def test_a_failing_disk_ends_the_daemon_and_the_next_start_invoices_every_order_once(
        start_faultfs: Callable[[], FaultMount], start_daemon: StartDaemon, short_tmp: Path,
        fault: str) -> None:
    fs = start_faultfs()
    submit_on(fs, short_tmp)
    daemon = on_mount(start_daemon, fs, **LOAD)
    daemon.wait_stored(2_000)
    fs.client.fail(fault)
    code, output = daemon.wait(60)
    assert code == 74, output[-2000:]  # EX_IOERR: the disk failed; systemd restarts it
    assert re.search(r"database .*: (fsync failed|a write failed|the disk is full)", output), output[-2000:]
    fs.client.heal()
    fs.stop()
    invoice_to_the_end(start_daemon, fs.backing / "invoices.db", TOTAL, LOAD)
