"""A private mount namespace held open by one process, for faults the host must not see."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path


@functools.cache
def can_unshare() -> bool:
    """Whether this process may make private mount namespaces: root, the tools, and a real try.

    In a chroot whose root is no mount point, ``unshare --propagation private`` fails ("cannot change
    root filesystem propagation"): the probe finds that out, so the tests skip instead of erroring.
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


class MountNamespace:
    """``unshare --mount`` around a shell ``setup`` that prints "ready"; commands run inside via nsenter."""

    def __init__(self, setup: str) -> None:
        self._setup = setup
        self._holder: subprocess.Popen[str] | None = None

    def __enter__(self) -> MountNamespace:
        self._holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
             f"set -e\n{self._setup}\necho ready\nexec sleep infinity"],
            stdout=subprocess.PIPE, text=True)
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "ready":
            self.__exit__()
            raise RuntimeError("could not set up the mount namespace")
        return self

    def enter(self) -> list[str]:
        """The command prefix that runs a program inside the namespace."""
        assert self._holder is not None
        # -r: the holder's root directory too, so that a chroot stays a chroot inside the namespace.
        holder = f"/proc/{self._holder.pid}"
        return ["nsenter", f"--mount={holder}/ns/mnt", f"--root={holder}/root", "--"]

    def run(self, command: str) -> None:
        """Run a shell command inside the namespace; it must succeed."""
        subprocess.run([*self.enter(), "/bin/sh", "-c", command], check=True, timeout=60)

    def path(self, inside: Path) -> Path:
        """The host's way to a path as the namespace sees it."""
        assert self._holder is not None
        return Path(f"/proc/{self._holder.pid}/root") / str(inside).lstrip("/")

    def __exit__(self, *exc: object) -> None:
        """End the namespace (safe to call twice, or before entering)."""
        if self._holder is not None:
            if self._holder.poll() is None:
                self._holder.kill()
                self._holder.wait()
            if self._holder.stdout is not None:
                self._holder.stdout.close()
