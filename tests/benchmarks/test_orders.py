"""Benchmarks of the orders source: ``python -m pytest -m bench -s tests/benchmarks/test_orders.py``.

Throughput against the demo source on a backlog of 1,000,000 submitted orders (target >= 0.8 x), where
the difference goes (the floor), and the latency from submit to commit, at idle and under load. Figures
are printed, not asserted.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from invoicer.bench import measure, processor_alone
from invoicer.orders import demo_order
from invoicer.storage import submit_orders
from tests.conftest import NotifyListener, daemon_env

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

BACKLOG = 1_000_000
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="inv-orders-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture(scope="module")
def backlog(workdir: Path) -> Path:
    """A database holding 1,000,000 waiting orders: the demo source's orders, as submitted JSON."""
    database = workdir / "backlog.db"
    payloads = [json.dumps(demo_order(n)) for n in range(1, BACKLOG + 1)]
    started = time.perf_counter()
    submit_orders(database, payloads)
    print(f"\nsubmitted {BACKLOG:,} orders in {time.perf_counter() - started:.1f}s "
          f"({database.stat().st_size / 2**20:.0f} MiB)")
    return database


@dataclasses.dataclass(frozen=True)
class Point:
    """Where rates are measured: workers and delay, the backlog's database, a work directory."""

    workers: int
    delay_ms: float
    backlog: Path
    workdir: Path
    alone: float

    def rate(self, source: str, processor: str | None = None) -> float:
        """Invoices per second of ``source`` (``orders``: on a fresh copy of the backlog)."""
        database = None
        extra = {"INVOICER_SOURCE": source}
        if source == "orders":
            database = self.workdir / "orders-point.db"
            shutil.copyfile(self.backlog, database)
        if processor is not None:
            extra |= {"INVOICER_PROCESSOR": processor, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO}"}
        return measure(self.workers, self.delay_ms, seconds=4.0, warmup=1.0, queue_size=1024,
                       alone=self.alone, directory=self.workdir, extra_env=extra, database=database).rate


@pytest.mark.parametrize(("workers", "delay_ms"), [(1, 0.0), (128, 5.0)])
def test_orders_against_demo(workers: int, delay_ms: float, backlog: Path, workdir: Path) -> None:
    """The orders source on the backlog against the demo source, same workers and delay (target 0.8).

    Three rounds, the order alternating; the ratio of each back-to-back pair, and their median.
    """
    point = Point(workers, delay_ms, backlog, workdir, processor_alone(1.0))
    ratios = []
    for round_number in range(3):
        rates = {source: point.rate(source)
                 for source in (("demo", "orders") if round_number % 2 == 0 else ("orders", "demo"))}
        ratios.append(rates["orders"] / rates["demo"])
        print(f"\nround {round_number + 1}, {workers} workers at {delay_ms:g} ms: "
              f"demo {rates['demo']:,.0f}/s, orders {rates['orders']:,.0f}/s = {ratios[-1]:.2f} x")
        assert rates["orders"] > 0
    print(f"median: orders = {statistics.median(ratios):.2f} x demo (target 0.8)")


FLOOR = {"shared": "tests.benchmarks.floor:shared", "fresh": "tests.benchmarks.floor:fresh", "built-in": None}


@pytest.mark.parametrize(("workers", "delay_ms"), [(1, 0.0), (128, 5.0)])
def test_where_the_difference_goes(workers: int, delay_ms: float, backlog: Path, workdir: Path) -> None:
    """The orders source with checks cheaper than the built-in one (tests/benchmarks/floor.py), against demo.

    ``shared``: no parsing, no checking, no new order objects (the claims and order ids alone).
    ``fresh``: a new copy of each parsed order, no parsing or checking: the floor of any parser.
    ``built-in``: json and the order format's check, as the daemon runs by default.
    Three rounds, the order rotating; the median ratio of each to the demo source of its round.
    """
    point = Point(workers, delay_ms, backlog, workdir, processor_alone(1.0))
    ratios: dict[str, list[float]] = {name: [] for name in FLOOR}
    for round_number in range(3):
        names = ["demo", *FLOOR]
        names = names[round_number:] + names[:round_number]
        rates = {name: point.rate("demo") if name == "demo" else point.rate("orders", FLOOR[name])
                 for name in names}
        for name in FLOOR:
            ratios[name].append(rates[name] / rates["demo"])
        print(f"\nround {round_number + 1}, {workers} workers at {delay_ms:g} ms: "
              + ", ".join(f"{name} {rates[name]:,.0f}/s" for name in ["demo", *FLOOR]))
        assert all(rate > 0 for rate in rates.values())
    print("median against demo: " + ", ".join(f"{name} {statistics.median(values):.2f} x"
                                              for name, values in ratios.items()))


def _latencies(database: Path, count: int, *, gap: float) -> list[float]:
    """Submit ``count`` orders one at a time; seconds from each commit of the INSERT to its invoice's."""
    payload = json.dumps({**demo_order(7), "reference": "latency probe"})
    connection = sqlite3.connect(database, timeout=30, isolation_level=None)
    seen = []
    try:
        for _ in range(count):
            cursor = connection.execute("INSERT INTO orders (payload) VALUES (?)", (payload,))
            submitted = time.perf_counter()
            order_id = cursor.lastrowid
            query = connection.execute
            while query("SELECT 1 FROM invoices WHERE order_id = ?", (order_id,)).fetchone() is None:
                time.sleep(0.0005)  # a submitter polling for its invoice, as an application would
            seen.append(time.perf_counter() - submitted)
            time.sleep(gap)  # spread the submissions over the daemon's idle poll
    finally:
        connection.close()
    return seen


def _summary(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return (f"median {statistics.median(values) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
            f"max {values[-1] * 1000:.1f} ms over {len(values)} orders")


def test_submit_to_commit_latency(workdir: Path) -> None:
    """One order at a time into an idle daemon, then the same while 2,000 orders/s flow through it.

    The load: a submitter inserting 20 orders every 10 ms, with 64 workers at the default 5 ms delay
    (about 9,000 invoices/s of capacity here).
    """
    database = workdir / "latency.db"
    submit_orders(database, [])  # the schema
    listener = NotifyListener(workdir / "latency.sock")
    environment = daemon_env(database, NOTIFY_SOCKET=str(listener.path), INVOICER_LOG_LEVEL="WARNING",
                             INVOICER_SOURCE="orders", INVOICER_WORKERS="64")
    daemon = subprocess.Popen([sys.executable, "-m", "invoicer", "run"], env=environment,
                              stdout=subprocess.DEVNULL)
    stop = threading.Event()
    try:
        listener.wait_for(lambda m: "READY=1" in m.split("\n"), 30, daemon.pid)
        idle = _latencies(database, 200, gap=0.013)
        print(f"\nidle: {_summary(idle)}")

        def load() -> None:
            connection = sqlite3.connect(database, timeout=30, isolation_level=None)
            rows = [(json.dumps(demo_order(n)),) for n in range(20)]
            while not stop.is_set():
                connection.execute("BEGIN")
                connection.executemany("INSERT INTO orders (payload) VALUES (?)", rows)
                connection.execute("COMMIT")
                time.sleep(0.01)
            connection.close()

        loader = threading.Thread(target=load)
        loader.start()
        time.sleep(2.0)  # let the load settle
        busy = _latencies(database, 200, gap=0.013)
        stop.set()
        loader.join()
        print(f"under load (about 2,000 orders/s): {_summary(busy)}")
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(120)
        listener.close()
