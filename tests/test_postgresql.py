"""The PostgreSQL backend against a real PostgreSQL 15 server that the tests start themselves.

Several ``invoicer run`` processes share one database: one gap-free sequence, each order invoiced once,
a killed instance's numbers taken over, a paused one (a zombie) fenced, bad URIs and unreachable servers
named in one line with the right exit code, and no password in anything the daemon prints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, Daemon, daemon_env
from tests.pg import PASSWORD, free_port, wait_for

psycopg = pytest.importorskip("psycopg")
from invoicer.storage.postgresql import PostgresStorage, _error  # noqa: E402  # needs psycopg

EX_TEMPFAIL = 75
EX_CONFIG = 78


def query(uri: str, statement: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement with plain SQL, as an external check would."""
    with psycopg.connect(uri, autocommit=True) as connection:
        cursor = connection.execute(statement, parameters)
        return cursor.fetchall() if cursor.description else []


def count(uri: str) -> int:
    """Invoices stored so far (0 before the schema exists)."""
    try:
        return int(query(uri, "SELECT count(*) FROM invoices")[0][0])
    except psycopg.errors.UndefinedTable:
        return 0


def assert_gap_free(uri: str) -> int:
    """After every instance stopped cleanly: 1..max(id) stored once each, no block left, mark = max."""
    stored, distinct, low, high = query(uri, "SELECT count(*), count(DISTINCT id), min(id), max(id)"
                                             " FROM invoices")[0]
    assert stored > 0
    assert (low, stored, distinct) == (1, high, high)
    assert query(uri, "SELECT count(*) FROM invoice_blocks")[0][0] == 0
    assert query(uri, "SELECT high_water FROM invoice_sequence")[0][0] == high
    return int(stored)


def assert_orders_invoiced_once(uri: str, orders: int) -> None:
    """Every order has exactly one invoice, and that invoice names it: a one-to-one pairing."""
    rows = query(uri, "SELECT o.id, o.invoice_id, i.id, i.order_id, i.status FROM orders o"
                      " LEFT JOIN invoices i ON i.order_id = o.id ORDER BY o.id")
    assert len(rows) == orders
    for order_id, paired, invoice, named, status in rows:
        assert paired is not None, order_id
        assert (paired, named) == (invoice, order_id)
        assert status == "ok"


def payload(index: int) -> str:
    """A valid order for the built-in processor."""
    return json.dumps({"customer": f"Customer {index}", "currency": "EUR", "lines": [
        {"description": f"item {index}", "quantity": 1 + index % 3, "unit_price": "9.95",
         "tax_rate": "0.19"}]})


def create_schema(uri: str) -> None:
    """Create the schema as a first start does."""
    storage = PostgresStorage(uri)
    storage.open()
    storage.close()


def submit(uri: str, count_: int, start: int = 0) -> None:
    """Submit orders with plain SQL, as an application would (the schema created first if need be)."""
    if not query(uri, "SELECT 1 FROM pg_tables WHERE tablename = 'orders'"):
        create_schema(uri)
    with psycopg.connect(uri) as connection, connection.cursor() as cursor:
        cursor.executemany("INSERT INTO orders (payload) VALUES (%s)",
                           [(payload(i),) for i in range(start, start + count_)])


def invoicer(uri: str, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """Run an operator command against ``uri``."""
    return subprocess.run([sys.executable, "-m", "invoicer", *args], env=daemon_env(uri, **env), input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def wait_ready(*daemons: Daemon, timeout: float = 30) -> None:
    """Wait until each instance sent READY=1 (several share one listener: read what it collected)."""
    def ready(daemon: Daemon) -> bool:
        assert daemon.notify is not None
        with daemon.notify._arrived:
            return any(pid == daemon.process.pid and "READY=1" in message.split("\n")
                       for message, pid in zip(daemon.notify.messages, daemon.notify.senders, strict=True))
    for daemon in daemons:
        assert wait_for(lambda daemon=daemon: ready(daemon) or daemon.process.poll() is not None, timeout)
        assert daemon.process.poll() is None, daemon.log_path.read_text()[-2000:]


def stop_all(daemons: list[Daemon]) -> list[str]:
    """SIGTERM every running instance at once; each must drain and exit 0. Returns their logs."""
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.signal(signal.SIGTERM)
    logs = []
    for daemon in daemons:
        code, log = daemon.wait(60)
        if os.environ.get("KEEP_LOGS"):
            Path(os.environ["KEEP_LOGS"], f"{daemon.process.pid}.log").write_text(log)
        assert code == 0, log[-3000:]
        logs.append(log)
    return logs


def owned_by(uri: str, pid: int) -> int:
    """Blocks an instance (by process id) owns now."""
    return int(query(uri, "SELECT count(*) FROM invoice_blocks WHERE owner LIKE %s", (f"%:{pid}:%",))[0][0])


# -- one instance: the single-host promises hold on PostgreSQL ------------------------------------------


def test_one_instance_drains_gap_free_and_restarts_where_it_stopped(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    daemon = start_daemon(uri, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="0")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 3000, 30)
    (log,) = stop_all([daemon])
    first = assert_gap_free(uri)
    assert "drained and stopped" in log
    again = start_daemon(uri, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="0")
    again.wait_ready()
    assert wait_for(lambda: count(uri) >= first + 1000, 30)
    stop_all([again])
    assert assert_gap_free(uri) > first


def test_sigkill_of_the_only_instance_is_recovered_by_its_restart_at_once(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    daemon = start_daemon(uri, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="5",
                          INVOICER_LEASE_TIMEOUT="60")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 500, 30)
    daemon.signal(signal.SIGKILL)
    daemon.wait()
    left = owned_by(uri, daemon.process.pid)
    assert left > 0  # it died owning unfinished blocks
    # Its session died with it, so its advisory lock is free: the restart takes the blocks over at once,
    # long before the 60 s lease would have expired.
    restarted = start_daemon(uri, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="5",
                             INVOICER_LEASE_TIMEOUT="60")
    restarted.wait_ready()
    assert restarted.notify is not None  # what it took over is a recovery, and STATUS= says so
    restarted.notify.wait_for(lambda m: m.startswith("STATUS=recovering:"), 15, restarted.process.pid)
    assert wait_for(lambda: owned_by(uri, daemon.process.pid) == 0, 15)
    (log,) = stop_all([restarted])
    assert "took over invoice numbers" in log
    assert_gap_free(uri)


def test_reload_and_the_watchdog_work_on_postgresql(pg_database: str, start_daemon: Callable[..., Daemon],
                                                   short_tmp: Path) -> None:
    uri = pg_database
    environment_file = short_tmp / "invoicer.env"
    environment_file.write_text("INVOICER_WORKERS=4\n")
    daemon = start_daemon(uri, INVOICER_ENVIRONMENT_FILE=str(environment_file), INVOICER_WORKERS="4",
                          WATCHDOG_USEC="2000000", INVOICER_PROCESSING_DELAY_MS="2")
    daemon.wait_ready()
    assert daemon.notify is not None
    daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", 10, daemon.process.pid)
    environment_file.write_text("INVOICER_WORKERS=9\n")
    daemon.signal(signal.SIGHUP)
    daemon.notify.wait_for(lambda m: "STATUS=running: 9 workers" in m, 10, daemon.process.pid)
    daemon.notify.wait_for(lambda m: m == "WATCHDOG=1", 10, daemon.process.pid)
    (log,) = stop_all([daemon])
    assert '"message": "reloaded"' in log
    assert_gap_free(uri)


def test_a_drain_finishes_its_blocks_past_a_call_that_hangs_forever(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    """SIGTERM with a call hung: the drain gives it up at its deadline, stored as failed.

    And it processes every other number the instance owns, so the stop owes nothing.
    """
    uri = pg_database
    daemon = start_daemon(uri, INVOICER_WORKERS="8", INVOICER_INVOICE_TIMEOUT="1", INVOICER_QUEUE_SIZE="64",
                          INVOICER_PROCESSOR="tests.plugins.processors:hang_on_and_wait", HANG_ON="300",
                          PROCESSING_S="0.002")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 290, 30)
    daemon.signal(signal.SIGTERM)
    code, log = daemon.wait(60)
    assert code == 0, log[-2000:]
    assert_gap_free(uri)
    assert query(uri, "SELECT id FROM invoices WHERE status = 'failed'") == [(300,)]


def test_orders_are_invoiced_once_each_in_submission_order_on_one_instance(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    result = invoicer(uri, "submit", "-", stdin="".join(payload(i) + "\n" for i in range(300)))
    assert result.returncode == 0, result.stderr
    assert "submitted 300 orders (ids 1..300)" in result.stdout
    submit(uri, 700, start=300)
    daemon = start_daemon(uri, INVOICER_SOURCE="orders", INVOICER_WORKERS="8")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) == 1000, 60)
    stop_all([daemon])
    assert_gap_free(uri)
    assert_orders_invoiced_once(uri, 1000)
    pairs = query(uri, "SELECT id, invoice_id FROM orders ORDER BY id")
    assert [number for _, number in pairs] == list(range(1, 1001))  # one instance: submission order


def test_orders_keep_their_payload_and_their_number_whatever_search_path_changes_them(
        pg_database: str) -> None:
    uri = pg_database
    submit(uri, 2)
    query(uri, "UPDATE orders SET invoice_id = 1 WHERE id = 1")  # paired, as a claim would
    query(uri, "INSERT INTO invoices (id, status, attempts, order_id) VALUES (1, 'ok', 1, 1)")
    with pytest.raises(psycopg.errors.RaiseException, match="payload cannot change"):
        query(uri, "UPDATE orders SET payload = '{}' WHERE id = 2")
    with pytest.raises(psycopg.errors.RaiseException, match="has an invoice number"):
        query(uri, "DELETE FROM orders WHERE id = 1")
    with pytest.raises(psycopg.errors.RaiseException, match="is invoiced"):  # from another search_path
        query(uri, "SET search_path = pg_catalog; UPDATE public.orders SET invoice_id = 5 WHERE id = 1")
    query(uri, "DELETE FROM orders WHERE id = 2")  # a waiting order may go


def test_a_bad_order_is_rejected_before_numbering_and_listed(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    submit(uri, 5)
    query(uri, "INSERT INTO orders (payload) VALUES ('{\"customer\": 1}'), ('not json')")
    submit(uri, 5, start=5)
    daemon = start_daemon(uri, INVOICER_SOURCE="orders", INVOICER_WORKERS="4")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) == 10, 30)
    stop_all([daemon])
    assert_gap_free(uri)
    assert query(uri, "SELECT count(*) FROM orders WHERE rejected IS NOT NULL")[0][0] == 2
    listed = invoicer(uri, "rejected")
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["6", "7"]


# -- many instances, one sequence ----------------------------------------------------------------------


def test_three_instances_share_one_gap_free_sequence_and_invoice_each_order_once(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    submit(uri, 6000)
    daemons = [start_daemon(uri, INVOICER_SOURCE="orders", INVOICER_WORKERS="16",
                            INVOICER_PROCESSING_DELAY_MS="1") for _ in range(3)]
    wait_ready(*daemons)
    submit(uri, 3000, start=6000)  # while they run
    assert wait_for(lambda: count(uri) == 9000, 90)
    stop_all(daemons)
    assert_gap_free(uri)
    assert_orders_invoiced_once(uri, 9000)
    owners = query(uri, "SELECT count(DISTINCT i.attempts) FROM invoices i")  # every row written once
    assert owners[0][0] >= 1


def test_a_killed_instances_numbers_are_taken_over_by_the_others(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    settings = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "5", "INVOICER_LEASE_TIMEOUT": "3"}
    daemons = [start_daemon(uri, **settings) for _ in range(3)]
    wait_ready(*daemons)
    assert wait_for(lambda: count(uri) >= 2000, 60)
    victim = daemons[0]
    victim.signal(signal.SIGKILL)
    victim.wait()
    killed_at = time.monotonic()
    assert owned_by(uri, victim.process.pid) > 0
    assert wait_for(lambda: owned_by(uri, victim.process.pid) == 0, 2 * 3 + 5)
    taken_over_in = time.monotonic() - killed_at
    logs = stop_all(daemons[1:])
    assert any("took over invoice numbers" in log for log in logs)
    assert_gap_free(uri)
    assert taken_over_in < 2 * 3 + 5


def stopped(pid: int) -> bool:
    """True once the process is in the stopped state (it paused itself)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


LOST = "the connection was lost"


@pytest.mark.parametrize(("pause_at", "ends_with", "other_says"), [
    # Outside the commit: the lease runs out, the others take over, and its next commit fails the fence.
    # (Its other threads stop where they are: one inside a reservation's transaction has its session
    # ended instead, by the idle-in-transaction timeout or by the others.)
    ("before-commit", ("taken over by another instance", LOST), "took over"),
    # Inside the commit, holding its blocks' row locks while the server waits for COPY data: the others
    # end its sessions once its lease has been expired for a whole lease, then take over. (A reservation
    # under way in another thread may be the first to find its session ended.)
    ("in-copy", (f"{LOST} while committing invoices", f"{LOST} while reserving invoice numbers"),
     "ended the session"),
])
def test_a_paused_instance_is_fenced_and_stores_nothing_it_lost(  # noqa: PLR0917  # a row and 3 fixtures
        pause_at: str, ends_with: tuple[str, ...], other_says: str, pg_database: str,
        start_daemon: Callable[..., Daemon],
        short_tmp: Path) -> None:
    uri = pg_database
    flag = short_tmp / "pause"
    settings = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "5", "INVOICER_LEASE_TIMEOUT": "2"}
    zombie = start_daemon(uri, INVOICER_PROCESSOR="tests.plugins.pg_pause:process", PAUSE_AT=pause_at,
                          PAUSE_FLAG=str(flag), **settings)
    other = start_daemon(uri, **settings)
    wait_ready(zombie, other)
    assert wait_for(lambda: owned_by(uri, zombie.process.pid) > 0 and count(uri) > 1000, 30)
    flag.touch()
    assert wait_for(lambda: stopped(zombie.process.pid), 10)
    assert owned_by(uri, zombie.process.pid) > 0
    # Its sessions stay open and its liveness lock held: only the lease (2 s) lets the others in.
    assert wait_for(lambda: owned_by(uri, zombie.process.pid) == 0, 3 * 2 + 10)
    zombie.signal(signal.SIGCONT)
    code, log = zombie.wait(30)
    assert code == EX_TEMPFAIL, log[-2000:]
    assert any(end in log for end in ends_with), log[-1500:]
    # Resumed, it may have taken a block before it found out; dead now, that one is the other's too.
    assert wait_for(lambda: owned_by(uri, zombie.process.pid) == 0, 15)
    (other_log,) = stop_all([other])
    assert other_says in other_log
    assert_gap_free(uri)


def test_a_session_the_server_ended_for_idling_in_its_transaction_is_a_lost_connection(
        pg_database: str) -> None:
    """A paused instance's session ended by idle_in_transaction_session_timeout: exit 75, try again."""
    with psycopg.connect(pg_database) as connection:
        connection.execute("SET idle_in_transaction_session_timeout = '50ms'")
        pid = connection.execute("SELECT pg_backend_pid()").fetchone()[0]
        # The server ends the session on its own: polled from another session, no event reaches us.
        assert wait_for(lambda: not query(pg_database, "SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                          (pid,)), 10)
        with pytest.raises(psycopg.Error) as ended:
            connection.execute("SELECT 1")
    error = _error(pg_database, ended.value, "reserving invoice numbers")
    assert error.exit_code == EX_TEMPFAIL
    assert "the connection was lost while reserving invoice numbers" in str(error)


def test_several_first_starts_at_once_create_the_schema_once(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    daemons = [start_daemon(uri, INVOICER_WORKERS="4", INVOICER_PROCESSING_DELAY_MS="1") for _ in range(5)]
    wait_ready(*daemons)
    assert wait_for(lambda: count(uri) >= 500, 30)
    stop_all(daemons)
    assert_gap_free(uri)
    assert query(uri, "SELECT count(*) FROM invoicer_schema")[0][0] == 1


def test_a_terminated_connection_ends_the_instance_and_loses_nothing(
        pg_database: str, start_daemon: Callable[..., Daemon], postgres_server: Any) -> None:
    uri = pg_database
    daemon = start_daemon(uri, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="2")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 500, 30)
    query(uri, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE %s",
          (f"invoicer:%:{daemon.process.pid}:%",))
    code, log = daemon.wait(30)
    assert code == EX_TEMPFAIL, log[-2000:]
    assert "the connection was lost" in log
    restarted = start_daemon(uri, INVOICER_WORKERS="16", INVOICER_PROCESSING_DELAY_MS="2")
    restarted.wait_ready()
    assert wait_for(lambda: owned_by(uri, daemon.process.pid) == 0, 15)
    stop_all([restarted])
    assert_gap_free(uri)


def test_a_shared_database_other_schemas_and_an_audit_trigger_keep_working(
        pg_database: str, postgres_server: Any, start_daemon: Callable[..., Daemon]) -> None:
    """The daemon's tables in a schema the operator chose; another role's audit trigger sees every row."""
    name = pg_database.split("/")[3].split("?", maxsplit=1)[0]
    for statement in (
            "CREATE TABLE public.invoices (note text)",  # someone else's table of the same name
            "CREATE SCHEMA billing AUTHORIZATION invoicer",
            "DO $$ BEGIN CREATE ROLE auditor NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            "CREATE SCHEMA audit AUTHORIZATION auditor",
            "CREATE TABLE audit.log (invoice bigint, seen timestamptz DEFAULT now())",
            "ALTER TABLE audit.log OWNER TO auditor",
            "CREATE FUNCTION audit.record() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$"
            " BEGIN INSERT INTO audit.log (invoice) VALUES (NEW.id); RETURN NEW; END $$",
            "ALTER FUNCTION audit.record() OWNER TO auditor"):
        postgres_server.sql(statement, dbname=name)
    uri = pg_database + "&options=-csearch_path%3Dbilling"
    create_schema(uri)
    postgres_server.sql("CREATE TRIGGER audited AFTER INSERT ON billing.invoices FOR EACH ROW"
                        " EXECUTE FUNCTION audit.record()", dbname=name)
    daemon = start_daemon(uri, INVOICER_WORKERS="8", INVOICER_PROCESSING_DELAY_MS="1")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 2000, 30)
    stop_all([daemon])
    assert_gap_free(uri)
    audited = postgres_server.sql("SELECT count(*), count(DISTINCT invoice) FROM audit.log", dbname=name)
    assert audited == [(count(uri), count(uri))]
    assert postgres_server.sql("SELECT count(*) FROM public.invoices", dbname=name) == [(0,)]


def test_a_slow_order_check_holds_its_claim_longer_than_half_a_lease(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    """A claim's transaction stays open while the processor checks its orders: it must not be ended.

    64 orders at 20 ms are 1.3 s, past the 1 s idle-in-transaction limit a lease of 2 s sets elsewhere.
    """
    uri = pg_database
    submit(uri, 300)
    daemon = start_daemon(uri, INVOICER_SOURCE="orders", INVOICER_LEASE_TIMEOUT="2", CHECK_S="0.02",
                          INVOICER_PROCESSOR="tests.plugins.slow_check:process")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) == 300, 60)
    stop_all([daemon])
    assert_orders_invoiced_once(uri, 300)


def test_a_lock_held_past_the_lock_timeout_is_waited_out(
        pg_database: str, postgres_server: Any, start_daemon: Callable[..., Daemon]) -> None:
    """A lock held longer than lock_timeout is waited out: the commits try again, then go on.

    Another role's audit trigger writes to a table someone holds in SHARE mode (a CREATE INDEX, say).
    """
    uri = pg_database
    name = uri.split("/")[3].split("?", maxsplit=1)[0]
    for statement in (
            "CREATE TABLE public.audit_log (invoice bigint)",
            "CREATE FUNCTION public.audit_record() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$"
            " BEGIN INSERT INTO public.audit_log VALUES (NEW.id); RETURN NEW; END $$"):
        postgres_server.sql(statement, dbname=name)
    create_schema(uri)
    postgres_server.sql("CREATE TRIGGER audited AFTER INSERT ON invoices FOR EACH ROW"
                        " EXECUTE FUNCTION public.audit_record()", dbname=name)
    daemon = start_daemon(uri, INVOICER_WORKERS="8", INVOICER_LEASE_TIMEOUT="2",
                          INVOICER_PROCESSING_DELAY_MS="1")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 500, 30)
    with psycopg.connect(postgres_server.uri(name).replace("invoicer@", "postgres@")) as locker:
        locker.execute("LOCK TABLE public.audit_log IN SHARE MODE")
        assert wait_for(lambda: "trying again" in daemon.log_path.read_text(), 30)
        assert daemon.process.poll() is None
        stalled = count(uri)
    assert wait_for(lambda: count(uri) >= stalled + 500, 30)  # the lock released: commits go on
    stop_all([daemon])
    assert_gap_free(uri)
    audited = postgres_server.sql("SELECT count(*) FROM public.audit_log", dbname=name)
    assert audited == [(count(uri),)]


# -- bad configuration, unreachable servers, secrets ---------------------------------------------------


@pytest.mark.parametrize(("uri", "code", "says"), [
    ("postgresql://invoicer@localhost/db?bogus=1", EX_CONFIG, "not a valid libpq URI"),
    ("postgresql://invoicer@localhost:99999/db", EX_CONFIG, "is not a TCP port"),
    # libpq ends the user part at the first "@" and the host at the first "/": neither half is printed
    (f"postgresql://invoicer:{PASSWORD[:4]}/{PASSWORD[4:]}@localhost/db", EX_CONFIG, "an '@' after the user"),
    (f"postgresql://invoicer:12/{PASSWORD}@localhost/db", EX_CONFIG, "an '@' after the user"),
    (f"postgresql://invoicer:{PASSWORD[:4]}@{PASSWORD[4:]}@localhost/db", EX_CONFIG, "an '@' after the user"),
    (f"postgresql://invoicer:{PASSWORD}%zz@localhost/db", EX_CONFIG, "invalid percent-encoded token"),
])
def test_a_malformed_uri_is_one_line_and_exit_78(uri: str, code: int, says: str,
                                                    start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(uri, notify=False)
    returned, log = daemon.wait(30)
    assert returned == code, log
    assert says in log
    assert len([line for line in log.splitlines() if '"level": "ERROR"' in line]) == 1
    assert PASSWORD not in log
    assert PASSWORD[4:] not in log


def test_an_unreachable_server_exits_75_for_systemd_to_try_again(start_daemon: Callable[..., Daemon]) -> None:
    port = free_port()
    daemon = start_daemon(f"postgresql://invoicer:{PASSWORD}@127.0.0.1:{port}/db", notify=False)
    returned, log = daemon.wait(30)
    assert returned == EX_TEMPFAIL, log
    assert "cannot be reached" in log
    assert PASSWORD not in log


def test_a_wrong_password_exits_78_without_printing_either_password(
        pg_database: str, postgres_server: Any, start_daemon: Callable[..., Daemon]) -> None:
    name = pg_database.split("/")[3].split("?", maxsplit=1)[0]
    wrong = "Wr0ng-" + PASSWORD
    uri = f"postgresql://invoicer:{wrong}@127.0.0.1:{postgres_server.port}/{name}"
    daemon = start_daemon(uri, notify=False)
    returned, log = daemon.wait(30)
    assert returned == EX_CONFIG, log
    assert "refused the connection" in log
    assert wrong not in log
    assert PASSWORD not in log


def test_the_password_in_the_uri_reaches_no_log_status_or_process_title(
        pg_database: str, postgres_server: Any, start_daemon: Callable[..., Daemon]) -> None:
    name = pg_database.split("/")[3].split("?", maxsplit=1)[0]
    uri = postgres_server.uri(name, tcp=True, password=True)
    assert PASSWORD in uri
    daemon = start_daemon(uri, INVOICER_WORKERS="4", INVOICER_LOG_LEVEL="DEBUG")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 200, 30)
    title = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes().decode(errors="replace")
    (log,) = stop_all([daemon])
    assert '"database": "postgresql://invoicer:***@127.0.0.1' in log
    assert PASSWORD not in log
    assert PASSWORD not in title
    assert daemon.notify is not None
    assert not any(PASSWORD in message for message in daemon.notify.messages)
    assert_gap_free(uri)


def test_operator_commands_work_against_postgresql(pg_database: str) -> None:
    uri = pg_database
    assert invoicer(uri, "failed").returncode != 0  # no schema yet: says so
    result = invoicer(uri, "submit", "-", stdin=payload(1) + "\n")
    assert result.returncode == 0, result.stderr
    assert invoicer(uri, "failed").stdout == ""
    assert invoicer(uri, "rejected").stdout == ""


def test_failed_invoices_are_listed_and_retried_beside_a_running_instance(
        pg_database: str, start_daemon: Callable[..., Daemon]) -> None:
    uri = pg_database
    daemon = start_daemon(uri, INVOICER_WORKERS="4", INVOICER_QUEUE_SIZE="32",
                          INVOICER_PROCESSOR="tests.plugins.processors:poison_sevens")
    daemon.wait_ready()
    assert wait_for(lambda: count(uri) >= 20, 30)
    stop_all([daemon])
    failed = invoicer(uri, "failed", "--json")
    assert failed.returncode == 0, failed.stderr
    numbers = [json.loads(line)["invoice"] for line in failed.stdout.splitlines()]
    assert numbers
    assert all(number % 7 == 0 for number in numbers)
    # Retry runs beside a running instance on PostgreSQL: no instance writes a stored row again.
    running = start_daemon(uri, INVOICER_WORKERS="4", INVOICER_QUEUE_SIZE="32")
    running.wait_ready()
    retried = invoicer(uri, "retry")
    assert retried.returncode == 0, retried.stderr
    assert f"retried {len(numbers)} failed invoices: {len(numbers)} now ok" in retried.stdout
    stop_all([running])
    assert invoicer(uri, "failed").stdout == ""
    assert_gap_free(uri)


def test_the_daemon_imports_no_psycopg_for_sqlite(tmp_path: Path) -> None:
    probe = ("import sys; import invoicer.daemon, invoicer.cli; "
             "print('psycopg' in sys.modules)")
    env = daemon_env(tmp_path / "x.db")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert result.stdout.strip() == "False"
