"""The installed Debian package: /usr/bin/invoicer on Debian's python3, its unit under real systemd, purge.

Runs when INVOICER_TEST_INSTALLED=1 (``.ci/run`` sets it after ``apt-get install ./invoicer_*.deb``);
the last test purges the package.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import assert_gap_free, daemon_env
from tests.pg import PASSWORD
from tests.systemd_harness import UserManager, missing_requirements
from tests.test_checker import children, wait_gone
from tests.test_systemd import database, rate_of, status, wait_until, write_environment

pytestmark = pytest.mark.skipif(os.environ.get("INVOICER_TEST_INSTALLED") != "1",
                                reason="set INVOICER_TEST_INSTALLED=1 after installing the package")

UNIT = "invoicer.service"
INSTALLED_UNIT = Path("/lib/systemd/system/invoicer.service")
# Only what a user manager cannot do (DESIGN §6); ExecStart stays /usr/bin/invoicer.
DROP_IN = """\
[Service]
DynamicUser=no
PrivateUsers=no
ProtectHome=no
ProtectKernelTunables=no
SystemCallFilter=@chown
"""
OPERATOR_DATABASE = Path("/var/lib/invoicer/invoices.db")


def dpkg_files() -> list[Path]:
    """What the package installed (files only)."""
    listing = subprocess.run(["dpkg", "-L", "invoicer"], capture_output=True, text=True, check=True)
    return [Path(line) for line in listing.stdout.splitlines() if line and not Path(line).is_dir()]


def test_installed_files() -> None:
    """The binary runs on Debian's python3; unit, conffile and man page are where Debian puts them."""
    assert Path("/usr/bin/invoicer").read_text().splitlines()[0] == "#!/usr/bin/python3"
    version = subprocess.run(["/usr/bin/invoicer", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("invoicer ")
    assert INSTALLED_UNIT.exists()
    conffiles = subprocess.run(["dpkg-query", "-W", "-f=${Conffiles}", "invoicer"], capture_output=True,
                               text=True, check=True).stdout
    assert "/etc/default/invoicer" in conffiles
    assert subprocess.run(["man", "-w", "invoicer"], capture_output=True, text=True,
                          check=True).stdout.strip() == "/usr/share/man/man8/invoicer.8.gz"
    assert Path("/usr/share/doc/invoicer/examples/orders.jsonl").is_file()


def test_installed_unit_idles_by_default_and_invoices_submitted_orders(manager: UserManager) -> None:
    """With the shipped defaults the service makes no invoice of its own; submitted orders it invoices."""
    write_environment(manager, INVOICER_STATUS_INTERVAL="0.2")
    manager.systemctl("start", UNIT)
    wait_until(lambda: status(manager)["StatusText"].startswith("idle: "), what="STATUS idle")
    assert " 0 stored," in status(manager)["StatusText"]
    submitted = subprocess.run(
        ["/usr/bin/invoicer", "submit", "/usr/share/doc/invoicer/examples/orders.jsonl"],
        env={**daemon_env(database(manager)), "INVOICER_SOURCE": "orders"}, capture_output=True,
        text=True, check=False)
    assert submitted.returncode == 0, submitted.stderr
    wait_until(lambda: " 20 stored," in status(manager)["StatusText"], what="20 stored")
    wait_until(lambda: status(manager)["StatusText"].startswith("idle: "), what="idle again")
    # The orders were checked in the check process, under the unit's sandbox, which ends with the stop.
    checkers = children(int(status(manager)["MainPID"]))
    assert len(checkers) == 1
    assert "invoicer.checker" in Path(f"/proc/{checkers[0]}/cmdline").read_text()
    manager.systemctl("stop", UNIT)
    assert status(manager)["Result"] == "success"
    assert assert_gap_free(database(manager)).count == 20
    wait_gone(checkers[0])


def test_installed_unit_verifies_clean() -> None:
    """systemd-analyze verify on the installed unit, with its binary and man page really there: silent."""
    result = subprocess.run(["systemd-analyze", "verify", str(INSTALLED_UNIT)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    """A user manager running the installed unit with the minimal drop-in."""
    assert not missing_requirements(), missing_requirements()
    harness = UserManager()
    try:
        harness.start()
        shutil.copy(INSTALLED_UNIT, harness.units / UNIT)
        (harness.units / f"{UNIT}.d").mkdir()
        (harness.units / f"{UNIT}.d" / "test.conf").write_text(DROP_IN)
        harness.systemctl("daemon-reload")
        yield harness
    finally:
        harness.systemctl("stop", UNIT, check=False, timeout=60)
        harness.stop()


def test_installed_unit_starts_reloads_and_stops(manager: UserManager) -> None:
    """The installed unit on Debian's python3: ready, status, reload in place, stop, gap-free."""
    write_environment(manager, INVOICER_WORKERS="4", INVOICER_STATUS_INTERVAL="0.2",
                      INVOICER_PROCESSING_DELAY_MS="2", INVOICER_SOURCE="demo")
    manager.systemctl("start", UNIT)
    first = status(manager)
    assert ": 4 workers, " in first["StatusText"]
    main = first["MainPID"]
    assert Path(f"/proc/{main}/exe").resolve().name.startswith("python3")
    assert "/usr/bin/invoicer" in Path(f"/proc/{main}/cmdline").read_text()
    wait_until(lambda: rate_of(status(manager)["StatusText"]) > 0, what="a rate")
    write_environment(manager, INVOICER_WORKERS="7", INVOICER_STATUS_INTERVAL="0.2",
                      INVOICER_PROCESSING_DELAY_MS="2", INVOICER_SOURCE="demo")
    manager.systemctl("reload", UNIT)
    after = status(manager)
    assert after["MainPID"] == main
    assert ": 7 workers, " in after["StatusText"]
    manager.systemctl("stop", UNIT)
    assert status(manager)["Result"] == "success"
    assert_gap_free(database(manager))


TEMPLATE = "invoicer@.service"
INSTALLED_TEMPLATE = Path("/lib/systemd/system/invoicer@.service")


def test_installed_binary_runs_against_postgresql_with_debians_psycopg(
        postgres_server: Any, tmp_path: Path) -> None:
    """/usr/bin/invoicer on Debian's python3 and python3-psycopg (the Recommends): submit, run, drain."""
    from tests.test_postgresql import assert_gap_free as assert_pg_gap_free
    from tests.test_postgresql import assert_orders_invoiced_once, count

    postgres_server.sql("DROP DATABASE IF EXISTS installed_binary WITH (FORCE)")
    postgres_server.create_database("installed_binary")
    uri = postgres_server.uri("installed_binary")
    env = {**daemon_env(uri), "INVOICER_SOURCE": "orders", "PYTHONPATH": ""}
    orders = "/usr/share/doc/invoicer/examples/orders.jsonl"
    submitted = subprocess.run(["/usr/bin/invoicer", "submit", orders], env=env, capture_output=True,
                               text=True, check=False, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    daemon = subprocess.Popen(["/usr/bin/invoicer", "run"], env=env, stdout=subprocess.DEVNULL, cwd=tmp_path)
    wait_until(lambda: count(uri) == 20, what="the 20 sample orders invoiced")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    assert_pg_gap_free(uri)
    assert_orders_invoiced_once(uri, 20)


def test_installed_template_runs_two_instances_on_postgresql(postgres_server: Any) -> None:
    """The installed invoicer@.service, two instances on one database: stop one, the other goes on."""
    from tests.test_postgresql import assert_gap_free as assert_pg_gap_free
    from tests.test_postgresql import count

    assert INSTALLED_TEMPLATE.exists()
    postgres_server.sql("DROP DATABASE IF EXISTS installed_template WITH (FORCE)")
    postgres_server.create_database("installed_template")
    check = postgres_server.uri("installed_template")
    harness = UserManager()
    try:
        harness.start()
        shutil.copy(INSTALLED_TEMPLATE, harness.units / TEMPLATE)
        (harness.units / f"{TEMPLATE}.d").mkdir()
        pgpass = harness.root / "pgpass"
        pgpass.write_text(f"127.0.0.1:{postgres_server.port}:*:invoicer:{PASSWORD}\n")
        pgpass.chmod(0o600)
        shipped = Path("/usr/share/doc/invoicer/examples/postgresql.conf").read_text()
        (harness.units / f"{TEMPLATE}.d" / "postgresql.conf").write_text(
            shipped.replace("IPAddressAllow=192.0.2.20", "IPAddressAllow=127.0.0.1")
            .replace("LoadCredential=pgpass:/etc/invoicer/pgpass", f"LoadCredential=pgpass:{pgpass}")
            .replace("Environment=PGPASSFILE=%d/pgpass", f"Environment=PGPASSFILE={pgpass}"))
        (harness.units / f"{TEMPLATE}.d" / "test.conf").write_text(DROP_IN + "User=\n")
        harness.systemctl("daemon-reload")
        write_environment(harness, INVOICER_DATABASE=f"postgresql://invoicer@127.0.0.1:{postgres_server.port}"
                          "/installed_template", INVOICER_SOURCE="demo", INVOICER_WORKERS="4",
                          INVOICER_PROCESSING_DELAY_MS="2", INVOICER_STATUS_INTERVAL="0.2")
        harness.systemctl("start", "invoicer@1", "invoicer@2")
        wait_until(lambda: count(check) >= 1000, what="1,000 invoices")
        harness.systemctl("stop", "invoicer@1")
        stored = count(check)
        wait_until(lambda: count(check) >= stored + 500, what="the other instance going on")
        harness.systemctl("stop", "invoicer@2")
        for unit in ("invoicer@1", "invoicer@2"):
            assert harness.show(unit, "Result")["Result"] == "success"
        assert PASSWORD not in harness.journal("-o", "json")
    finally:
        harness.systemctl("stop", "invoicer@1", "invoicer@2", check=False, timeout=60)
        harness.stop()
    assert_pg_gap_free(check)


def test_purge_leaves_only_the_database() -> None:
    """Purging removes every installed file, /etc/default/invoicer included, and keeps the database."""
    OPERATOR_DATABASE.parent.mkdir(parents=True, exist_ok=True)
    daemon = subprocess.Popen(["/usr/bin/invoicer", "run"], env=daemon_env(OPERATOR_DATABASE),
                              stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not Path(f"{OPERATOR_DATABASE}.reload-state.json").exists():  # written once it is running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(30) == 0
    stored = assert_gap_free(OPERATOR_DATABASE).count
    # An operator's `invoicer failed`, run anywhere without INVOICER_DATABASE, finds the service's database.
    operator_env = {k: v for k, v in daemon_env(OPERATOR_DATABASE).items() if k != "INVOICER_DATABASE"}
    found = subprocess.run(["/usr/bin/invoicer", "failed"], env=operator_env, capture_output=True, text=True,
                           check=False, cwd="/")
    assert (found.returncode, found.stdout, found.stderr) == (0, "", "")
    installed = dpkg_files()
    subprocess.run(["apt-get", "purge", "-y", "invoicer"], check=True, capture_output=True,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    assert [path for path in installed if path.exists()] == []
    assert not Path("/etc/default/invoicer").exists()
    assert assert_gap_free(OPERATOR_DATABASE).count == stored
    shutil.rmtree(OPERATOR_DATABASE.parent)  # the test's own data; an operator's stays
