"""The daemon on Debian 12's own Python with python3-sdnotify 0.3.1 and python3-pythonjsonlogger 2.0.1."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, assert_gap_free, require

DEBIAN_PYTHON = "/usr/bin/python3"
PROBE = ("import importlib.metadata as m, sdnotify, pythonjsonlogger.jsonlogger; "
         "print(m.version('sdnotify'), m.version('python-json-logger'))")


@pytest.fixture
def debian_versions() -> tuple[str, str]:
    """The versions of sdnotify and python-json-logger Debian's Python imports (installed by .ci/run)."""
    require(Path(DEBIAN_PYTHON).exists(), f"{DEBIAN_PYTHON} is missing")
    probe = subprocess.run([DEBIAN_PYTHON, "-c", PROBE], capture_output=True, text=True, check=False,
                           timeout=30)
    require(probe.returncode == 0, "python3-sdnotify and python3-pythonjsonlogger are not installed "
                                   f"for {DEBIAN_PYTHON}: {probe.stderr.strip()[-200:]}")
    sdnotify_version, logger_version = probe.stdout.split()
    return sdnotify_version, logger_version


def test_runs_on_debian_packages(tmp_path: Path, start_daemon: Callable[..., Daemon],
                                 debian_versions: tuple[str, str]) -> None:
    """Under Debian's python3 and its 2.x json logger: READY, STATUS, JSON logs, drain, gap-free."""
    assert debian_versions[1].startswith("2.")  # the old pythonjsonlogger.jsonlogger path is the one used
    database = tmp_path / "invoices.db"
    daemon = start_daemon(database, python=DEBIAN_PYTHON, INVOICER_WORKERS="4",
                          INVOICER_PROCESSING_DELAY_MS="1")
    daemon.wait_ready()
    daemon.wait_stored(300)
    daemon.signal()
    code, output = daemon.wait()
    assert code == 0, output
    lines = [json.loads(line) for line in output.splitlines()]
    assert lines[0]["message"].startswith("starting invoicer")
    assert lines[-1]["message"] == "drained and stopped"
    assert daemon.notify is not None
    daemon.notify.drain()
    assert daemon.notify.assignments()[-1] == "STOPPING=1"
    assert_gap_free(database)
