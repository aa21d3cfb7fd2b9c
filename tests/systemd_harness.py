"""A real systemd user manager and journald in a private mount namespace (DESIGN §6).

Nothing is written to the host's /etc or /run/systemd: the namespace gets tmpfs mounts over
/run/systemd, /run/log and /var/log/journal, and a writable overlay over /etc/default whose changes land
in the harness's own directory. Every process started here is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.namespace import MountNamespace, can_unshare

JOURNALD = "/lib/systemd/systemd-journald"
SYSTEMD = "/lib/systemd/systemd"

# The namespace's mounts: the manager's and journald's runtime state, and a writable /etc/default.
SETUP = """
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system
mount -t tmpfs tmpfs /run/log
mkdir -p /var/log/journal
mount -t tmpfs tmpfs /var/log/journal
mount -t overlay overlay -o lowerdir=/etc/default,upperdir={root}/etc-upper,workdir={root}/etc-work \
    /etc/default
"""


def missing_requirements() -> list[str]:
    """What this machine lacks for the harness (empty when it can run)."""
    missing = [tool for tool in ("unshare", "nsenter", "systemctl", "journalctl", "systemd-analyze")
               if shutil.which(tool) is None]
    missing += [path for path in (JOURNALD, SYSTEMD) if not Path(path).exists()]
    if os.geteuid() != 0:
        missing.append("root (for unshare --mount)")
    elif not missing and not can_unshare():
        missing.append("a private mount namespace (unshare --propagation private fails: a chroot?)")
    return missing


class UserManager:
    """systemd --user plus journald, isolated in a mount namespace; ``run()`` executes inside it."""

    def __init__(self) -> None:
        # Not under /tmp or /var/tmp (PrivateTmp= hides them from the service) nor /run (the service gets
        # a fresh /run there): the notify socket and the user manager's directories must stay visible.
        self.root = Path(tempfile.mkdtemp(prefix="invoicer-systemd-", dir="/var/lib"))
        self.home = self.root / "home"
        self.runtime = self.root / "runtime"
        self.units = self.home / ".config" / "systemd" / "user"
        self._processes: list[subprocess.Popen[str]] = []
        self._namespace = MountNamespace(SETUP.format(root=self.root))

    @property
    def env(self) -> dict[str, str]:
        """The environment for commands run against this manager."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("INVOICER_", "NOTIFY_SOCKET"))}
        env.update(HOME=str(self.home), XDG_RUNTIME_DIR=str(self.runtime), SYSTEMD_PAGER="",
                   SYSTEMD_COLORS="0", DBUS_SESSION_BUS_ADDRESS=f"unix:path={self.runtime}/bus")
        return env

    def _enter(self) -> list[str]:
        return self._namespace.enter()

    def start(self, timeout: float = 30.0) -> None:
        """Make the namespace, start journald and the user manager, wait for the manager's socket."""
        for directory in (self.units, self.runtime, self.root / "etc-upper", self.root / "etc-work"):
            directory.mkdir(parents=True, exist_ok=True)
        self.runtime.chmod(0o700)
        self._namespace.__enter__()
        self._spawn([JOURNALD], self.root / "journald.log")
        journal_socket = self._namespace.path(Path("/run/systemd/journal/stdout"))
        self._wait_for(journal_socket, timeout)
        self._spawn([SYSTEMD, "--user", "--log-target=journal"], self.root / "manager.log")
        self._wait_for(self.runtime / "systemd" / "private", timeout)

    def _spawn(self, command: list[str], log: Path) -> None:
        with log.open("w") as output:
            self._processes.append(subprocess.Popen(self._enter() + command, env=self.env, stdout=output,
                                                    stderr=subprocess.STDOUT, text=True))

    def _wait_for(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not appear within {timeout}s; see {self.root}/*.log")
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
            time.sleep(0.05)  # another process's socket: nothing to wait on but its appearance

    def run(self, *command: str, check: bool = True, timeout: float = 120.0,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace, against this manager."""
        return subprocess.run(self._enter() + list(command), env=self.env, capture_output=True, text=True,
                              check=check, timeout=timeout, input=input_text)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0
                  ) -> subprocess.CompletedProcess[str]:
        """``systemctl --user ARGS`` inside the namespace."""
        return self.run("systemctl", "--user", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl --user show -p …`` as a dict."""
        output = self.systemctl("show", unit, *(f"--property={p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        """``journalctl ARGS`` inside the namespace (the namespace's journald)."""
        return self.run("journalctl", "--no-pager", *args).stdout

    def host_path(self, path: str) -> Path:
        """The host's way into ``path`` as the namespace sees it (through the holder's root)."""
        return self._namespace.path(Path(path))

    def stop(self) -> None:
        """Stop the manager, journald and the namespace, by PID, and remove the directory."""
        for process in reversed(self._processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._namespace.__exit__()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
