"""The orders source in real processes: submit, idle, submitters beside the daemon, SIGKILL with a backlog."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from invoicer.orders import demo_order
from invoicer.processing import build_invoice
from invoicer.storage import submit_orders
from tests.conftest import REPO, Daemon, NotifyListener, daemon_env, stored_in_status

StartDaemon = Callable[..., Daemon]
ORDERS = {"INVOICER_SOURCE": "orders"}
EXAMPLES = REPO / "examples" / "orders.jsonl"


def payload(index: int, lines: int = 0) -> str:
    order = {**demo_order(index), "reference": f"PO-{index}"}
    if lines:
        order["lines"] = [{"description": f"Part {n} of a long order", "quantity": 1 + n % 7,
                           "unit_price": f"{n % 997}.{n % 100:02d}", "tax_rate": "0.19"}
                          for n in range(lines)]
    return json.dumps(order)


def invoicer(database: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an ``invoicer`` command as an operator would."""
    return subprocess.run([sys.executable, "-m", "invoicer", *args], env=daemon_env(database, **ORDERS),
                          input=stdin, capture_output=True, text=True, timeout=120, check=False)


def assert_one_invoice_per_order(database: Path) -> list[tuple[int, int]]:
    """Every valid order has exactly one invoice, numbers are 1..N, in submission order (one instance)."""
    with sqlite3.connect(database) as connection:
        invoices = connection.execute("SELECT id, order_id FROM invoices ORDER BY id").fetchall()
        paired = connection.execute("SELECT invoice_id, id FROM orders WHERE invoice_id IS NOT NULL "
                                    "ORDER BY invoice_id").fetchall()
        waiting = connection.execute(
            "SELECT count(*) FROM orders WHERE invoice_id IS NULL AND rejected IS NULL").fetchone()[0]
        high_water, through = connection.execute("SELECT high_water, stored_through FROM sequence").fetchone()
    connection.close()
    assert waiting == 0
    assert [number for number, _ in invoices] == list(range(1, len(invoices) + 1))
    assert invoices == paired  # invoices.order_id and orders.invoice_id agree, one to one
    assert [order_id for _, order_id in invoices] == sorted(order_id for _, order_id in invoices)
    assert high_water == through == len(invoices)
    return invoices


def invoice_to_the_end(start_daemon: StartDaemon, database: Path, total: int, env: dict[str, str],
                       timeout: float = 120) -> None:
    """Start a daemon on ``database``, stop it once ``total`` are stored: exit 0, one invoice an order."""
    daemon = start_daemon(database, **env)
    daemon.wait_stored(total, timeout=timeout)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log[-2000:]
    assert len(assert_one_invoice_per_order(database)) == total


def test_quick_start_submits_the_sample_orders_and_invoices_them(tmp_path: Path,
                                                                  start_daemon: StartDaemon) -> None:
    """The README's first commands on a fresh database: submit the shipped sample orders, then run."""
    database = tmp_path / "quick.db"
    submitted = invoicer(database, "submit", str(EXAMPLES))
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.startswith("submitted 20 orders (ids 1..20)")
    daemon = start_daemon(database, **ORDERS)
    daemon.wait_stored(20)
    assert daemon.notify is not None
    daemon.notify.wait_for(lambda m: "STATUS=idle:" in m, 30, daemon.process.pid)
    daemon.signal()
    code, _log = daemon.wait()
    assert code == 0
    invoices = assert_one_invoice_per_order(database)
    assert len(invoices) == 20
    orders = [json.loads(line) for line in EXAMPLES.read_text().splitlines() if line.strip()]
    with sqlite3.connect(database) as connection:
        documents = [row[0] for row in connection.execute("SELECT document FROM invoices ORDER BY id")]
    connection.close()
    assert documents == [build_invoice(n, order).document for n, order in enumerate(orders, 1)]


def test_submitters_in_other_processes_write_while_the_daemon_runs(tmp_path: Path,
                                                                    start_daemon: StartDaemon) -> None:
    """Three programs insert orders with plain SQL, one transaction each, while the daemon claims them."""
    database = tmp_path / "busy.db"
    daemon = start_daemon(database, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="1", **ORDERS)
    daemon.wait_ready()
    script = textwrap.dedent("""
        import json, sqlite3, sys
        from invoicer.orders import demo_order
        connection = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
        for index in range(int(sys.argv[2])):
            order = {**demo_order(index), "reference": f"{sys.argv[3]}-{index}"}
            connection.execute("INSERT INTO orders (payload) VALUES (?)", (json.dumps(order),))
        """)
    environment = daemon_env(database)
    submitters = [subprocess.Popen([sys.executable, "-c", script, str(database), "300", f"S{n}"],
                                   env=environment) for n in range(3)]
    for submitter in submitters:
        assert submitter.wait(timeout=120) == 0
    daemon.wait_stored(900, timeout=60)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert len(assert_one_invoice_per_order(database)) == 900


def test_sigkill_with_a_backlog_loses_no_order_and_numbers_none_twice(tmp_path: Path,
                                                                       start_daemon: StartDaemon) -> None:
    """SIGKILL at random points of a 20,000-order backlog, then restart: each order invoiced exactly once."""
    database = tmp_path / "kill.db"
    total = 20_000
    submit_orders(database, [payload(n) for n in range(total)])
    chooser = random.Random(int.from_bytes(os.urandom(4)))
    for _round in range(4):
        daemon = start_daemon(database, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="0", **ORDERS)
        daemon.wait_ready()
        with sqlite3.connect(database) as connection:
            stored = connection.execute("SELECT count(*) FROM invoices").fetchone()[0]
        connection.close()
        daemon.wait_stored(chooser.randint(1, 2_500))  # counted from this run's start: STATUS totals are
        daemon.process.send_signal(signal.SIGKILL)      # the table's, so this is past `stored` at least
        daemon.process.wait(30)
        assert stored <= total
    invoice_to_the_end(start_daemon, database, total,
                       {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "0", **ORDERS})


def test_a_stop_gives_back_the_claimed_orders_it_did_not_start(tmp_path: Path,
                                                                start_daemon: StartDaemon) -> None:
    """SIGTERM in the middle of a backlog: exit 0, no number owed, unstarted orders wait for the next run."""
    database = tmp_path / "stop.db"
    total = 3_000
    submit_orders(database, [payload(n) for n in range(total)])
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="2", **ORDERS)
    daemon.wait_stored(200)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    with sqlite3.connect(database) as connection:
        stored, high_water = connection.execute(
            "SELECT count(*), (SELECT high_water FROM sequence) FROM invoices").fetchone()
        unpaired = connection.execute("SELECT count(*) FROM orders WHERE invoice_id IS NULL").fetchone()[0]
    connection.close()
    assert stored == high_water < total
    assert unpaired == total - stored
    invoice_to_the_end(start_daemon, database, total, {"INVOICER_PROCESSING_DELAY_MS": "0", **ORDERS},
                       timeout=60)


def test_idle_daemon_pings_the_watchdog_uses_no_cpu_and_takes_a_new_order(
        tmp_path: Path, start_daemon: StartDaemon, notify_socket: NotifyListener) -> None:
    database = tmp_path / "idle.db"
    daemon = start_daemon(database, WATCHDOG_USEC="1000000", INVOICER_STATUS_INTERVAL="1", **ORDERS)
    pid = daemon.process.pid
    notify_socket.wait_for(lambda m: "STATUS=idle:" in m, 30, pid)
    cpu_before = cpu_seconds(pid)
    wall_before = os.times().elapsed
    for _ping in range(6):  # at least every half of WatchdogSec: about three seconds of idling
        notify_socket.wait_for(lambda m: "WATCHDOG=1" in m.split("\n"), 5, pid)
    idle_share = (cpu_seconds(pid) - cpu_before) / (os.times().elapsed - wall_before)
    assert idle_share < 0.05, f"an idle daemon used {idle_share:.1%} of a core"
    submit_orders(database, [payload(1)])
    notify_socket.wait_for(lambda m: stored_in_status(m) == 1, 10, pid)
    daemon.signal()
    assert daemon.wait()[0] == 0
    assert len(assert_one_invoice_per_order(database)) == 1


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_bad_orders_are_rejected_at_claim_and_listed(tmp_path: Path, start_daemon: StartDaemon) -> None:
    """Orders inserted with SQL are checked when claimed: the bad ones take no number and say why."""
    database = tmp_path / "bad.db"
    deep = json.dumps({**demo_order(6), "metadata": {"a": None}}).replace("null", "[" * 50 + "]" * 50)
    texts = [payload(1), "{oops", payload(2), json.dumps({**demo_order(3), "lines": []}), deep,
             payload(4, lines=40), json.dumps([1, 2]), payload(5)]
    submit_orders(database, texts)
    daemon = start_daemon(database, INVOICER_ORDER_MAX_BYTES="2KiB", **ORDERS)
    daemon.wait_stored(3)
    assert daemon.notify is not None
    daemon.notify.wait_for(lambda m: "STATUS=idle:" in m, 30, daemon.process.pid)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert [order_id for _, order_id in assert_one_invoice_per_order(database)] == [1, 3, 8]
    listed = invoicer(database, "rejected", "--json")
    assert listed.returncode == 0, listed.stderr
    reasons = {row["order"]: row["reason"] for row in map(json.loads, listed.stdout.splitlines())}
    assert set(reasons) == {2, 4, 5, 6, 7}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[4] == "lines: empty (an order needs at least one line)"
    assert "deeper than 16 levels" in reasons[5]
    assert "over the limit of 2,048 bytes" in reasons[6]
    assert reasons[7] == "order must be a JSON object, not array"
    assert "order 2 rejected before numbering: malformed JSON" in log


def test_submit_refuses_a_file_with_a_bad_line_and_inserts_nothing(tmp_path: Path) -> None:
    database = tmp_path / "submit.db"
    good = invoicer(database, "submit", "-", stdin=f"{payload(1)}\n\n{payload(2)}\n")
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("submitted 2 orders (ids 1..2)")
    bad = invoicer(database, "submit", "-", stdin=f"{payload(3)}\n{payload(4)}\n{{\"customer\": 5}}\n")
    assert bad.returncode == 65
    assert bad.stderr.strip().splitlines() == [
        "invoicer submit: standard input, line 3: missing field 'currency'"]
    missing = invoicer(database, "submit", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 66
    assert "cannot read" in missing.stderr
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM orders").fetchone()[0] == 2
    connection.close()


@pytest.mark.parametrize("budget", ["2MiB", "512MiB"])
def test_large_orders_stay_within_the_byte_budget(tmp_path: Path, start_daemon: StartDaemon,
                                                  budget: str) -> None:
    """5,000-line orders (~0.5 MB each): the peak RSS follows INVOICER_INFLIGHT_BYTES, not the backlog."""
    database = tmp_path / "big.db"
    count = 60
    big = payload(1, lines=5_000)
    submit_orders(database, [big] * count)
    # 64 workers: each loop once kept its last order after the commit, whatever the budget said.
    daemon = start_daemon(database, INVOICER_WORKERS="64", INVOICER_PROCESSING_DELAY_MS="5",
                          INVOICER_INFLIGHT_BYTES=budget, **ORDERS)
    daemon.wait_stored(count, timeout=120)
    peak = peak_rss_mib(daemon.process.pid)
    daemon.signal()
    assert daemon.wait()[0] == 0
    assert len(assert_one_invoice_per_order(database)) == count
    held = len(big) * count / 2**20
    if budget == "2MiB":
        assert peak < 110, f"peak RSS {peak:.0f} MiB with a 2 MiB budget"
    else:  # the control: a claim reads at most CLAIM_BYTES (8 MiB), so about three claims are in flight
        assert peak > 90, f"peak RSS {peak:.0f} MiB: claims of 8 MiB of the {held:.0f} MiB backlog in flight"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_an_outage_with_few_large_orders_in_flight_stores_none_as_failed(tmp_path: Path,
                                                                         start_daemon: StartDaemon) -> None:
    """A byte budget that admits three orders at a time: the outage is recognised by them failing."""
    database = tmp_path / "outage.db"
    flag = tmp_path / "down"
    flag.touch()
    count = 30
    submit_orders(database, [payload(n, lines=300) for n in range(count)])
    daemon = start_daemon(database, INVOICER_WORKERS="8", INVOICER_INFLIGHT_BYTES="64KiB",
                          INVOICER_PROCESSOR="tests.plugins.processors:down_while_flagged",
                          OUTAGE_FLAG=str(flag), **ORDERS)
    assert daemon.notify is not None
    daemon.notify.wait_for(lambda m: "STATUS=paused: ConnectionError" in m, 30, daemon.process.pid)
    flag.unlink()
    daemon.wait_stored(count, timeout=60)
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert len(assert_one_invoice_per_order(database)) == count
    with sqlite3.connect(database) as connection:
        assert connection.execute("SELECT count(*) FROM invoices WHERE status = 'failed'").fetchone()[0] == 0
    connection.close()


def test_a_busy_daemon_waits_out_another_programs_write_lock(tmp_path: Path,
                                                             start_daemon: StartDaemon) -> None:
    """A submitter holding the write lock past the busy timeout makes the daemon wait, not exit."""
    database = tmp_path / "locked.db"
    submit_orders(database, [payload(n) for n in range(20_000)])
    daemon = start_daemon(database, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="1", **ORDERS)
    daemon.wait_stored(100)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO orders (payload) VALUES (?)", (payload(99_999),))
    try:
        wait_for_log(daemon, "is locked by another program")
    finally:
        holder.execute("COMMIT")
        holder.close()
    daemon.wait_stored(20_001, timeout=120)
    assert daemon.process.poll() is None
    daemon.signal()
    code, log = daemon.wait()
    assert code == 0, log
    assert len(assert_one_invoice_per_order(database)) == 20_001


def wait_for_log(daemon: Daemon, text: str, timeout: float = 60.0) -> None:
    """Poll the daemon's log file (another process writes it: nothing to wait on) for ``text``."""
    deadline = time.monotonic() + timeout
    while text not in daemon.log_path.read_text():
        assert daemon.process.poll() is None, daemon.log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s"
        time.sleep(0.1)


def test_a_drain_does_not_wait_forever_for_another_programs_lock(tmp_path: Path,
                                                                  start_daemon: StartDaemon) -> None:
    """SIGTERM while another program holds the write lock: the drain gives up after the busy timeout."""
    database = tmp_path / "drain-locked.db"
    submit_orders(database, [payload(n) for n in range(20)])
    daemon = start_daemon(database, **ORDERS)
    daemon.wait_stored(20)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        daemon.signal()
        code, log = daemon.wait(timeout=30)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert code == 75, log
    assert "locked by another program" in log
    again = start_daemon(database, **ORDERS)  # nothing lost: the next start finds everything stored
    again.wait_stored(20)
    again.signal()
    assert again.wait()[0] == 0
    assert len(assert_one_invoice_per_order(database)) == 20
