"""The ``start_faultfs`` fixture: a faultfs mount over a fresh backing directory, in a private namespace."""

from __future__ import annotations

import contextlib
import ctypes.util
import dataclasses
import importlib.util
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require
from tests.faultfs import FaultClient
from tests.namespace import can_unshare

READY_TIMEOUT_S = 30.0


@dataclasses.dataclass
class FaultMount:
    """A running faultfs: where to reach it, its backing directory, its control client."""

    process: subprocess.Popen[str]
    mount: Path  # the mount as this process reaches it (through /proc/PID/root when in a namespace)
    inside: Path  # the mount as programs started with ``enter`` see it
    enter: list[str]  # the command prefix that runs a program in the mount's namespace
    backing: Path
    client: FaultClient

    def stop(self) -> None:
        """Unmount (SIGTERM: libfuse leaves its loop and unmounts) and reap the process; safe twice."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, RuntimeError):
                self.client.thaw()  # a frozen fsync holds a FUSE thread that libfuse would wait for
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if not self.enter and os.path.ismount(self.inside):  # no namespace to take the mount away with it
            subprocess.run(["fusermount3", "-u", "-z", str(self.inside)], check=False)


def faultfs_available() -> tuple[bool, str]:
    """Whether faultfs can run here, and if not why."""
    if not os.path.exists("/dev/fuse"):
        return False, "no /dev/fuse"
    if ctypes.util.find_library("fuse3") is None:
        return False, "libfuse3 missing (apt-get install fuse3)"
    if importlib.util.find_spec("mfusepy") is None:
        return False, "mfusepy missing (pip install mfusepy)"
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        return False, "neither root nor fusermount3 (apt-get install fuse3)"
    return True, ""


def _wait_ready(process: subprocess.Popen[str], log: Path) -> None:
    """Wait for the ``ready`` line (printed when the kernel initialises the mount), or fail."""
    assert process.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stdout], [], [], left)
        if readable:
            line = process.stdout.readline()
            if line.strip() == "ready":
                return
            if not line:
                break
    process.kill()
    process.wait()
    raise AssertionError(f"faultfs did not come up: {log.read_text()}")


def start(root: Path) -> FaultMount:
    """Mount a faultfs over ``root/backing`` at ``root/mnt``, in a private mount namespace if possible."""
    backing, inside, control = root / "backing", root / "mnt", root / "control.sock"
    log = root / "faultfs.log"
    backing.mkdir()
    inside.mkdir()
    isolated = can_unshare()
    # unshare execs the program, so the FUSE process is the namespace's only one: the mount dies with it.
    prefix = ["unshare", "--mount", "--propagation", "private", "--"] if isolated else []
    with log.open("w") as errors:
        command = [*prefix, sys.executable, "-m", "tests.faultfs", "serve", str(backing), str(inside),
                   str(control)]
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=errors, text=True)
    _wait_ready(process, log)
    mount = Path(f"/proc/{process.pid}/root") / inside.relative_to("/") if isolated else inside
    enter = ["nsenter", f"--mount=/proc/{process.pid}/ns/mnt", "--"] if isolated else []
    handle = FaultMount(process, mount, inside, enter, backing, FaultClient(control))
    if not os.path.ismount(mount):
        handle.stop()
        raise AssertionError(f"faultfs said ready but {mount} is not a mount point")
    return handle


@pytest.fixture
def start_faultfs(short_tmp: Path) -> Iterator[Callable[[], FaultMount]]:
    """Start faultfs mounts (each over a fresh backing directory) and stop them all at the end."""
    available, reason = faultfs_available()
    require(available, reason)
    started: list[FaultMount] = []

    def start_one() -> FaultMount:
        root = short_tmp / f"fs{len(started)}"
        root.mkdir()
        started.append(start(root))
        return started[-1]

    yield start_one
    for handle in started:
        handle.stop()


@pytest.fixture
def faultfs(start_faultfs: Callable[[], FaultMount]) -> FaultMount:
    """One faultfs mount."""
    return start_faultfs()
