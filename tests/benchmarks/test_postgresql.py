"""Benchmarks of the PostgreSQL backend: ``python -m pytest -m bench -s tests/benchmarks/test_postgresql.py``.

Against the tests' own PostgreSQL 15 server (tests/pg.py), on this machine's two cores, the server on the
same cores as the daemons. Figures are printed, not asserted (the goals are in issue #13):

* one instance on PostgreSQL against one on SQLite, 128 workers at 5 ms, same run (goal >= 0.8 x);
* three instances of 32 workers at 5 ms against three times one instance, same run, same server (>= 0.8);
* raw group-commit ingest through the ledger (fence, COPY, finished blocks), 2,048 rows a commit (>= 100k/s);
* how long a killed instance's numbers take to be stored by the others (<= 2 x lease + a few s).
"""

from __future__ import annotations

import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from invoicer.pipeline import invoice_row
from invoicer.processing import sample_invoice
from invoicer.storage import Batch
from tests.conftest import NotifyListener, daemon_env
from tests.pg import wait_for

psycopg = pytest.importorskip("psycopg")
from invoicer.storage.postgresql import PostgresStorage  # noqa: E402  # needs psycopg

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

WARMUP_S = 2.0
MEASURE_S = 6.0


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="inv-pgbench-", dir="/tmp") as directory:
        yield Path(directory)


def fresh(server: Any, name: str) -> str:
    server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    server.create_database(name)
    return str(server.uri(name))


def stored(database: str | Path) -> int:
    if isinstance(database, Path):
        with sqlite3.connect(database, timeout=30) as connection:
            return int(connection.execute("SELECT count(*) FROM invoices").fetchone()[0])
    with psycopg.connect(database, autocommit=True) as connection:
        return int(connection.execute("SELECT count(*) FROM invoices").fetchone()[0])


def ready(listener: NotifyListener, processes: list[subprocess.Popen[bytes]]) -> None:
    """Wait for every process's READY=1 (they share the listener: look at all it collected)."""
    def sent(pid: int) -> bool:
        return any(sender == pid and "READY=1" in message.split("\n")
                   for message, sender in zip(list(listener.messages), list(listener.senders), strict=False))
    for process in processes:
        assert wait_for(lambda process=process: sent(process.pid), 60), process.pid


def rate(database: str | Path, instances: int, workdir: Path, **env: str) -> float:
    """Start ``instances`` daemons on ``database``; invoices/s committed by them together, after a warm-up."""
    listener = NotifyListener(workdir / f"notify-{time.monotonic_ns()}.sock")
    processes = []
    try:
        for index in range(instances):
            environment = {**daemon_env(database, INVOICER_STATUS_INTERVAL="1", INVOICER_LOG_LEVEL="WARNING",
                                        **env), "NOTIFY_SOCKET": str(listener.path)}
            with (workdir / f"daemon-{index}.log").open("a") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", "invoicer", "run"], env=environment,
                                                  stdout=log, stderr=subprocess.STDOUT))
        ready(listener, processes)
        time.sleep(WARMUP_S)  # a benchmark: the warm-up is a duration, not an event
        first, started = stored(database), time.monotonic()
        time.sleep(MEASURE_S)
        last, ended = stored(database), time.monotonic()
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(120)
        listener.close()
    return (last - first) / (ended - started)


def test_one_instance_on_postgresql_against_sqlite(postgres_server: Any, workdir: Path) -> None:
    """128 workers at 5 ms, demo source; three rounds, the order alternating (goal: PostgreSQL >= 0.8 x)."""
    ratios = []
    for round_number in range(3):
        rates = {}
        for backend in (("sqlite", "postgresql") if round_number % 2 == 0 else ("postgresql", "sqlite")):
            database: str | Path = (workdir / f"round{round_number}.db" if backend == "sqlite"
                                    else fresh(postgres_server, f"bench_one_{round_number}"))
            rates[backend] = rate(database, 1, workdir, INVOICER_WORKERS="128",
                                  INVOICER_PROCESSING_DELAY_MS="5")
        ratios.append(rates["postgresql"] / rates["sqlite"])
        print(f"\nround {round_number + 1}: SQLite {rates['sqlite']:,.0f}/s, PostgreSQL "
              f"{rates['postgresql']:,.0f}/s = {ratios[-1]:.2f} x")
    print(f"median: PostgreSQL = {statistics.median(ratios):.2f} x SQLite (goal 0.8)")


def test_three_instances_against_three_times_one(postgres_server: Any, workdir: Path) -> None:
    """32 workers at 5 ms each: three instances on one database against 3 x one instance (goal >= 0.8)."""
    ratios = []
    for round_number in range(3):
        one = rate(fresh(postgres_server, f"bench_single_{round_number}"), 1, workdir, INVOICER_WORKERS="32",
                   INVOICER_PROCESSING_DELAY_MS="5")
        three = rate(fresh(postgres_server, f"bench_three_{round_number}"), 3, workdir, INVOICER_WORKERS="32",
                     INVOICER_PROCESSING_DELAY_MS="5")
        ratios.append(three / (3 * one))
        print(f"\nround {round_number + 1}: one instance {one:,.0f}/s, three {three:,.0f}/s = "
              f"{ratios[-1]:.2f} x three times one")
    print(f"median: {statistics.median(ratios):.2f} x (goal 0.8)")


def test_raw_group_commit_ingest(postgres_server: Any) -> None:
    """Rows a second through the ledger alone: a block, then 2,048-row commits (fence, COPY, delete)."""
    uri = fresh(postgres_server, "bench_ingest")
    storage = PostgresStorage(uri)
    storage.open()
    ledger = storage.ledger(storage.recovery_plan())
    total, per_commit = 300_000, 2048
    first, last = storage.reserve(total)
    template = invoice_row(1, sample_invoice(1), 1)
    batches = []
    for start in range(first, last + 1, per_commit):
        numbers = range(start, min(start + per_commit, last + 1))
        batches.append((numbers, Batch.of([(n, *template[1:]) for n in numbers])))
    started = time.perf_counter()
    for numbers, batch in batches:
        ledger.commit(batch, [numbers])
    seconds = time.perf_counter() - started
    storage.close()
    assert stored(uri) == total
    print(f"\nraw ingest: {total:,} rows in {seconds:.2f}s = {total / seconds:,.0f} rows/s "
          f"({per_commit} rows a commit; goal 100,000)")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_killed_instances_numbers_are_all_stored_within(how: str, postgres_server: Any,
                                                          workdir: Path) -> None:
    """Seconds from the end of an instance to the last of its numbers stored (lease 10 s).

    SIGKILL: its sessions die with it, so the others see its liveness lock free at once. SIGSTOP (a lost
    host, a partition): its sessions stay, so only the lease lets the others in.
    """
    uri = fresh(postgres_server, f"bench_takeover_{how.lower()}")
    listener = NotifyListener(workdir / "takeover.sock")
    processes = []
    try:
        for index in range(3):
            environment = {**daemon_env(uri, INVOICER_WORKERS="32", INVOICER_PROCESSING_DELAY_MS="5",
                                        INVOICER_LEASE_TIMEOUT="10", INVOICER_LOG_LEVEL="WARNING"),
                           "NOTIFY_SOCKET": str(listener.path)}
            with (workdir / f"takeover-{index}.log").open("a") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", "invoicer", "run"], env=environment,
                                                  stdout=log, stderr=subprocess.STDOUT))
        ready(listener, processes)
        time.sleep(WARMUP_S)
        victim = processes[0]
        pattern = f"%:{victim.pid}:%"

        def blocks() -> list[tuple[int, int]]:
            with psycopg.connect(uri, autocommit=True) as connection:
                return [(int(first), int(last)) for first, last in connection.execute(
                    "SELECT first, last FROM invoice_blocks WHERE owner LIKE %s", (pattern,))]

        def all_stored(owed: list[tuple[int, int]]) -> bool:
            with psycopg.connect(uri, autocommit=True) as connection:
                return all(connection.execute("SELECT count(*) FROM invoices WHERE id BETWEEN %s AND %s",
                                              (first, last)).fetchone()[0] == last - first + 1
                           for first, last in owed)

        victim.send_signal(getattr(signal, how))
        ended = time.monotonic()
        owed = blocks()  # what it held when it ended (a stopped process changes nothing more)
        assert owed
        assert wait_for(lambda: not blocks(), 60)
        taken = time.monotonic() - ended
        assert wait_for(lambda: all_stored(owed), 60)
        done = time.monotonic() - ended
        print(f"\n{how}: {sum(last - first + 1 for first, last in owed):,} numbers in {len(owed)} blocks; "
              f"taken over after {taken:.1f}s, all stored after {done:.1f}s (lease 10 s; goal 20 s + a few)")
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(120)
        listener.close()
