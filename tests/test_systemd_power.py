"""The repository's unit under a real systemd user manager, its database on a faultfs mount (DESIGN §6)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_gap_free, require
from tests.faultfs import FaultClient
from tests.faultfs_fixture import faultfs_available
from tests.systemd_harness import UserManager
from tests.test_systemd import UNIT, extra_drop_in, manager, status, wait_until

pytestmark = pytest.mark.systemd
__all__ = ["manager"]  # the module-scoped user manager fixture of tests/test_systemd.py, used here

# The database on the mount: under ProtectSystem=strict it must be named writable. WatchdogSec=2s: the
# stall limit is then 1 s.
ON_MOUNT = """\
[Service]
Environment=INVOICER_DATABASE={mount}/invoices.db INVOICER_STATUS_INTERVAL=0.2
Environment=INVOICER_PROCESSING_DELAY_MS=1
ReadWritePaths={mount}
WatchdogSec=2s
RestartSec=1s
"""


@contextlib.contextmanager
def faultfs_in(harness: UserManager) -> Iterator[tuple[Path, Path, FaultClient]]:
    """A faultfs mounted inside the harness's namespace (so the manager's services see it): mount, backing."""
    available, reason = faultfs_available()
    require(available, reason)
    # Not under /tmp (PrivateTmp= hides it from the service) nor /run (the service gets a fresh one).
    root = Path(tempfile.mkdtemp(prefix="invoicer-fault-", dir="/var/lib"))
    backing, mount, control = root / "backing", root / "mnt", root / "control.sock"
    backing.mkdir()
    mount.mkdir()
    command = [*harness._enter(), sys.executable, "-m", "tests.faultfs", "serve",
               str(backing), str(mount), str(control)]
    with (root / "faultfs.log").open("w") as errors:
        # nsenter into a mount namespace starts at its root directory: the package is found by PYTHONPATH.
        server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(REPO)},
                                  stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready", (root / "faultfs.log").read_text()
        yield mount, backing, FaultClient(control)
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            FaultClient(control).thaw()
        server.terminate()  # libfuse unmounts on SIGTERM
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
        shutil.rmtree(root, ignore_errors=True)


def stored(status_text: str) -> int:
    """The stored total in a StatusText ("... 1,234 stored ..."), -1 if none."""
    words = status_text.replace(",", "").split()
    return next((int(words[i - 1]) for i, w in enumerate(words) if w.startswith("stored") and i), -1)


def test_frozen_disk_gets_the_unit_restarted_by_its_watchdog(manager: UserManager) -> None:
    """Frozen fsync under the unit: pings stop, systemd's watchdog kills it, and it restarts and resumes."""
    with faultfs_in(manager) as (mount, backing, client), \
            extra_drop_in(manager, "faultfs.conf", ON_MOUNT.format(mount=mount)):
        manager.systemctl("start", UNIT)
        try:
            wait_until(lambda: stored(status(manager)["StatusText"]) >= 1000, what="1,000 stored")
            first_pid = status(manager)["MainPID"]
            client.freeze()
            wait_until(lambda: "stalled: storage: " in status(manager)["StatusText"], timeout=10,
                       what="STATUS saying the storage stalled")
            wait_until(lambda: "Watchdog timeout" in manager.journal("--user-unit", UNIT, "-o", "cat")
                       or "Watchdog timeout" in manager.journal("-o", "cat"), timeout=20,
                       what="the watchdog timeout")
            # The thread in the frozen fsync leaves the kernel only when the disk answers (D state, as on a
            # real stalled disk: without this thaw there is no restart within 60 s, the SIGABRT pending):
            # the disk comes back, and the process dies of the watchdog's SIGABRT.
            client.thaw()
            wait_until(lambda: int(status(manager)["NRestarts"]) >= 1, timeout=60, what="a watchdog restart")
            wait_until(lambda: status(manager)["MainPID"] not in ("0", first_pid)
                       and stored(status(manager)["StatusText"]) >= 0, timeout=30, what="the restarted unit")
            journal = manager.journal("-o", "cat")
            assert "invoicer.service: Watchdog timeout (limit 2s)!" in journal
            assert "invoicer.service: Failed with result 'watchdog'." in journal
        finally:
            manager.systemctl("stop", UNIT, timeout=60)
        assert status(manager)["Result"] == "success"
        assert_gap_free(backing / "invoices.db")  # the clean stop synced everything to the backing file
