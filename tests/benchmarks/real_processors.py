"""Figures for misbehaving processors, with real `invoicer run` processes (not part of the test run).

    .venv/bin/python tests/benchmarks/real_processors.py [outage|hang|drain ...]

outage: 32 workers, the service down for 8 s: invoices stored as failed, time until throughput is back.
hang:   16 workers, 2 ms invoices, one call hung for a minute (INVOICER_INVOICE_TIMEOUT=60): RSS and
        stored_through every 5 s.
drain:  SIGTERM while a call hangs (INVOICER_INVOICE_TIMEOUT=10): how long the drain takes, exit code.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.conftest import NotifyListener, daemon_env, stored_in_status  # noqa: E402

PLUGINS = "tests.plugins.processors"


def start(directory: Path, listener: NotifyListener, **env: str) -> subprocess.Popen[bytes]:
    """Start a daemon on a fresh database in ``directory``, reporting to ``listener``."""
    environment = daemon_env(directory / "invoices.db", NOTIFY_SOCKET=str(listener.path), **env)
    log = (directory / "daemon.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "invoicer", "run"], env=environment, stdout=log,
                            stderr=subprocess.STDOUT)


def next_stored(listener: NotifyListener, pid: int) -> tuple[float, int, str]:
    """The next STATUS= line: when it came, the stored total, the text."""
    message = listener.wait_for(lambda m: m.startswith("STATUS="), 30, pid)
    return time.monotonic(), stored_in_status(message), message[7:]


def one_query(database: Path, query: str) -> object:
    """One value by plain SQL."""
    connection = sqlite3.connect(database)
    try:
        return connection.execute(query).fetchone()[0]
    finally:
        connection.close()


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def outage(directory: Path, listener: NotifyListener) -> None:
    """32 workers, an 8 s outage of the processor's service."""
    flag = directory / "down"
    daemon = start(directory, listener, INVOICER_WORKERS="32",
                   INVOICER_PROCESSOR=f"{PLUGINS}:down_while_flagged", OUTAGE_FLAG=str(flag))
    listener.wait_for(lambda m: stored_in_status(m) > 20_000, 60, daemon.pid)
    before = [next_stored(listener, daemon.pid) for _ in range(20)]
    rate_before = (before[-1][1] - before[0][1]) / (before[-1][0] - before[0][0])
    flag.touch()
    down_at = time.monotonic()
    while time.monotonic() - down_at < 8:
        next_stored(listener, daemon.pid)
    flag.unlink()
    back_at = time.monotonic()
    _, resumed_from, _ = next_stored(listener, daemon.pid)
    while True:
        now, stored, text = next_stored(listener, daemon.pid)
        if text.startswith("running:") and stored - resumed_from > rate_before * 0.5:
            break
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(60)
    failed = one_query(directory / "invoices.db", "SELECT count(*) FROM invoices WHERE status = 'failed'")
    print(f"outage: {rate_before:,.0f}/s before; 8 s down; {failed} invoices stored as failed; half a "
          f"second's worth committed again {now - back_at:.2f} s after the service returned; exit {code}")


def hang(directory: Path, listener: NotifyListener) -> None:
    """16 workers, 2 ms invoices, one call hung past a minute."""
    database = directory / "invoices.db"
    daemon = start(directory, listener, INVOICER_WORKERS="16",
                   INVOICER_PROCESSOR=f"{PLUGINS}:hang_on_and_wait", HANG_ON="100", PROCESSING_S="0.002")
    listener.wait_for(lambda m: "READY=1" in m.split("\n"), 30, daemon.pid)
    started = time.monotonic()
    while (elapsed := time.monotonic() - started) < 70:
        _, stored, _ = next_stored(listener, daemon.pid)
        if int(elapsed) % 5 == 0:
            through = one_query(database, "SELECT stored_through FROM sequence")
            saved = str(one_query(database, "SELECT stored_runs FROM sequence"))
            runs = len(saved.split(",")) if saved else 0
            print(f"hang: {elapsed:5.1f} s: {stored:,} stored, stored_through {through:,}, "
                  f"{runs} saved runs, RSS {rss_mib(daemon.pid):.1f} MiB")
            time.sleep(1)  # one line per 5 s mark
    daemon.send_signal(signal.SIGTERM)
    error = one_query(database, "SELECT error FROM invoices WHERE id = 100")
    print(f"hang: exit {daemon.wait(120)}; invoice 100: {error}")


def drain(directory: Path, listener: NotifyListener) -> None:
    """SIGTERM two seconds into a hung call whose deadline is 10 s."""
    daemon = start(directory, listener, INVOICER_WORKERS="16", INVOICER_INVOICE_TIMEOUT="10",
                   INVOICER_PROCESSOR=f"{PLUGINS}:hang_on_and_wait", HANG_ON="100", PROCESSING_S="0.002")
    listener.wait_for(lambda m: stored_in_status(m) > 1000, 30, daemon.pid)
    time.sleep(2)  # the call for 100 has hung for about two seconds by now
    stopping = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    code = daemon.wait(120)
    print(f"drain: with one call hung, SIGTERM to exit took {time.monotonic() - stopping:.2f} s "
          f"(deadline 10 s); exit {code}")


def main() -> None:
    """Run the named measurements (all by default)."""
    chosen = sys.argv[1:] or ["outage", "hang", "drain"]
    for name in chosen:
        with tempfile.TemporaryDirectory(prefix="inv-real-", dir="/tmp") as scratch:
            directory = Path(scratch)
            listener = NotifyListener(directory / "notify.sock")
            try:
                {"outage": outage, "hang": hang, "drain": drain}[name](directory, listener)
            finally:
                listener.close()


if __name__ == "__main__":
    main()
