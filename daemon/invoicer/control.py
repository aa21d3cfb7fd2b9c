"""``invoicer reload``: ask a running daemon to reload and wait until the reload is in effect.

systemd 252 (Debian 12) has no ``Type=notify-reload``, and ``ExecReload=kill -HUP $MAINPID`` returns
before the daemon has done anything. So the daemon records each finished reload in a small state file
(in ``$RUNTIME_DIRECTORY`` under systemd), and this client sends SIGHUP and waits for the next record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

RELOAD_STATE = "reload-state.json"
POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class ReloadRecord:
    """The outcome of the daemon's latest reload (generation 0: none yet since start)."""

    pid: int
    generation: int
    ok: bool
    message: str


def state_path(env: Mapping[str, str], database: Path, pid: int | None = None) -> Path:
    """Where the daemon keeps its reload record: ``$RUNTIME_DIRECTORY`` or beside the database.

    With PostgreSQL (``pid`` given) several instances may share a directory: each names its own record.
    """
    runtime = env.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if runtime:
        return Path(runtime) / RELOAD_STATE
    if pid is not None:  # absolute, so that `invoicer reload PID` finds it from any directory
        return Path(tempfile.gettempdir()) / f"invoicer.{pid}.{RELOAD_STATE}"
    return database.with_name(f"{database.name}.{RELOAD_STATE}")


def write_record(path: Path, record: ReloadRecord) -> None:
    """Replace the record atomically (write, then rename), so a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(dataclasses.asdict(record)) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_record(path: Path) -> ReloadRecord | None:
    """Read the record, or None when there is none (yet)."""
    try:
        return ReloadRecord(**json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        return None


class ReloadError(Exception):
    """The reload could not be requested, did not finish in time, or was refused by the daemon."""


def request_reload(pid: int, path: Path, timeout: float) -> ReloadRecord:
    """Send SIGHUP to ``pid`` and wait for its next reload record; raise ReloadError if it fails."""
    before = read_record(path)
    if before is None or before.pid != pid:
        raise ReloadError(f"no reload record of process {pid} at {path}; is invoicer running there?")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"process {pid} does not exist") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = read_record(path)
        if record is not None and record.pid == pid and record.generation > before.generation:
            if not record.ok:
                raise ReloadError(record.message)
            return record
        time.sleep(POLL_S)  # another process's file: there is no event to wait on
    raise ReloadError(f"process {pid} did not finish reloading within {timeout:g}s")
