"""invoicer@.service under the real systemd harness: two instances, one PostgreSQL, a credential.

The user manager runs in a private mount namespace only, so the tests' PostgreSQL server on the host's
127.0.0.1 is reachable once the shipped PostgreSQL drop-in opens the network to it (and nothing else).
The password reaches libpq in a password file (PGPASSFILE), or, discouraged, in the URI; either way the
journal, STATUS= and the process titles must never show it.

The shipped drop-in passes the password file with LoadCredential=. Under this harness's user manager
(systemd 252, not PID 1) a credential arrives empty: its ramfs is set up in a mount namespace of its own
and the service sees an empty directory (seen with a plain one-line unit too). So the tests keep every
line of the shipped drop-in but point PGPASSFILE at the file itself; the credential is for a real system.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require
from tests.pg import PASSWORD, ROLE
from tests.systemd_harness import UserManager, missing_requirements
from tests.test_postgresql import assert_gap_free, count
from tests.test_systemd import DROP_IN, wait_until, write_environment

pytestmark = pytest.mark.systemd
pytest.importorskip("psycopg")

TEMPLATE = "invoicer@.service"
POSTGRESQL_CONF = REPO / "packaging" / "postgresql.conf"
# What the template may differ in from invoicer.service, and nothing else.
TEMPLATE_ONLY = {
    "Description=Invoice pipeline daemon, instance %i (one gap-free sequence shared in PostgreSQL)",
    "EnvironmentFile=-/etc/default/invoicer-%i", "RuntimeDirectory=invoicer/%i", "User=invoicer",
    "Environment=INVOICER_ENVIRONMENT_FILE=/etc/default/invoicer:/etc/default/invoicer-%i"}
SINGLE_ONLY = {"Description=Invoice pipeline daemon (gap-free numbering, SQLite storage)",
               "RuntimeDirectory=invoicer"}


def settings(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


def test_the_template_is_the_single_unit_but_for_its_instance_lines() -> None:
    template, single = settings(REPO / TEMPLATE), settings(REPO / "invoicer.service")
    assert set(template) - set(single) == TEMPLATE_ONLY
    assert set(single) - set(template) == SINGLE_ONLY
    assert [line for line in template if line not in TEMPLATE_ONLY] == \
        [line for line in single if line not in SINGLE_ONLY]


def test_the_template_rates_as_safe_as_the_single_unit(tmp_path: Path) -> None:
    """systemd-analyze security --offline=true scores an instance of the template at 1.0 or better."""
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is needed")
    instance = tmp_path / "invoicer@check.service"
    instance.write_text((REPO / TEMPLATE).read_text())
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", str(instance)],
                            capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for invoicer@check\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout[-500:] + result.stderr
    assert float(match.group(1)) <= 1.0


def postgresql_drop_in(pgpass: Path) -> str:
    """The shipped drop-in, pointed at the tests' server and password file."""
    text = POSTGRESQL_CONF.read_text()
    for shipped in ("IPAddressAllow=192.0.2.20\n", "LoadCredential=pgpass:/etc/invoicer/pgpass\n"):
        assert shipped in text
    return (text.replace("IPAddressAllow=192.0.2.20\n", "IPAddressAllow=127.0.0.1\n")
            .replace("LoadCredential=pgpass:/etc/invoicer/pgpass\n", f"LoadCredential=pgpass:{pgpass}\n")
            .replace("Environment=PGPASSFILE=%d/pgpass\n", f"Environment=PGPASSFILE={pgpass}\n"))


@pytest.fixture(scope="module")
def manager(postgres_server: Any) -> Iterator[UserManager]:
    """A user manager with the template, the tests' drop-in, and the shipped PostgreSQL drop-in."""
    missing = missing_requirements()
    require(not missing, f"cannot run a systemd user manager here: missing {', '.join(missing)}")
    harness = UserManager()
    try:
        harness.start()
        (harness.units / TEMPLATE).write_text((REPO / TEMPLATE).read_text())
        drop_ins = harness.units / f"{TEMPLATE}.d"
        drop_ins.mkdir()
        # As for invoicer.service, plus: a user manager has no dynamic users, so no User= either.
        (drop_ins / "test.conf").write_text(DROP_IN.format(bin=Path(sys.executable).parent, repo=REPO)
                                            + "User=\n")
        pgpass = harness.root / "pgpass"
        pgpass.write_text(f"127.0.0.1:{postgres_server.port}:*:{ROLE}:{PASSWORD}\n")
        pgpass.chmod(0o600)  # libpq ignores a password file others may read
        (drop_ins / "postgresql.conf").write_text(postgresql_drop_in(pgpass))
        harness.systemctl("daemon-reload")
        yield harness
    finally:
        harness.stop()


def test_two_instances_share_one_sequence_with_the_password_in_a_password_file(
        manager: UserManager, postgres_server: Any) -> None:
    postgres_server.sql("DROP DATABASE IF EXISTS template_units WITH (FORCE)")
    postgres_server.create_database("template_units")
    uri = f"postgresql://{ROLE}@127.0.0.1:{postgres_server.port}/template_units"  # no password in it
    check = postgres_server.uri("template_units")
    write_environment(manager, INVOICER_DATABASE=uri, INVOICER_WORKERS="8", INVOICER_STATUS_INTERVAL="0.2",
                      INVOICER_PROCESSING_DELAY_MS="2", INVOICER_LEASE_TIMEOUT="3")
    manager.host_path("/etc/default/invoicer-2").write_text("INVOICER_WORKERS=3\n")  # the per-instance file
    manager.systemctl("start", "invoicer@1", "invoicer@2")
    try:
        for unit in ("invoicer@1", "invoicer@2"):
            assert manager.show(unit, "ActiveState")["ActiveState"] == "active"
        wait_until(lambda: count(check) >= 2000, what="2,000 invoices from both instances")
        manager.systemctl("stop", "invoicer@1")
        first = manager.show("invoicer@1", "Result", "ActiveState")
        assert first == {"Result": "success", "ActiveState": "inactive"}
        stored = count(check)
        wait_until(lambda: count(check) >= stored + 1000, what="the other instance going on alone")
        status = manager.show("invoicer@2", "StatusText", "MainPID")
        assert status["StatusText"].startswith("running: 3 workers")
        manager.host_path("/etc/default/invoicer-2").write_text("INVOICER_WORKERS=5\n")
        manager.systemctl("reload", "invoicer@2")  # re-reads both files: its own value wins again
        assert manager.show("invoicer@2", "StatusText")["StatusText"].startswith("running: 5 workers")
        title = manager.host_path(f"/proc/{status['MainPID']}/cmdline").read_bytes()
    finally:
        manager.systemctl("stop", "invoicer@1", "invoicer@2", check=False)
    assert manager.show("invoicer@2", "Result")["Result"] == "success"
    assert_gap_free(check)
    journal = manager.journal("-o", "json")  # everything: the daemon's records and the manager's
    assert PASSWORD not in journal
    assert PASSWORD.encode() not in title
    records = [json.loads(json.loads(line)["MESSAGE"]) for line in manager.journal(
        "-t", "invoicer", "-o", "json").splitlines() if json.loads(line).get("MESSAGE", "").startswith("{")]
    ready = [record for record in records if record["message"] == "ready"]
    assert sorted(record["workers"] for record in ready) == [3, 8]
    assert all(record["database"] == uri for record in ready)


def test_a_password_in_the_uri_reaches_neither_the_journal_nor_status(
        manager: UserManager, postgres_server: Any) -> None:
    postgres_server.sql("DROP DATABASE IF EXISTS secret_uri WITH (FORCE)")
    postgres_server.create_database("secret_uri")
    uri = postgres_server.uri("secret_uri", tcp=True, password=True)
    assert PASSWORD in uri
    check = postgres_server.uri("secret_uri")
    write_environment(manager, INVOICER_DATABASE=uri, INVOICER_WORKERS="4", INVOICER_STATUS_INTERVAL="0.2",
                      INVOICER_LOG_LEVEL="DEBUG")
    (manager.units / f"{TEMPLATE}.d" / "postgresql.conf").rename(manager.root / "postgresql.conf")
    (manager.units / f"{TEMPLATE}.d" / "open.conf").write_text(
        "[Service]\nPrivateNetwork=no\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET\n"
        "IPAddressAllow=127.0.0.1\n")  # the network only: no password file, so only the URI's password
    manager.systemctl("daemon-reload")
    try:
        manager.systemctl("start", "invoicer@7")
        wait_until(lambda: count(check) >= 500, what="500 invoices")
        status = manager.show("invoicer@7", "StatusText", "MainPID")
        title = manager.host_path(f"/proc/{status['MainPID']}/cmdline").read_bytes()
        manager.systemctl("stop", "invoicer@7")
    finally:
        manager.systemctl("stop", "invoicer@7", check=False)
        (manager.units / f"{TEMPLATE}.d" / "open.conf").unlink()
        (manager.root / "postgresql.conf").rename(manager.units / f"{TEMPLATE}.d" / "postgresql.conf")
        manager.systemctl("daemon-reload")
    assert_gap_free(check)
    journal = manager.journal("-o", "json")
    assert "invoicer:***@127.0.0.1" in journal  # the URI was logged, redacted
    assert PASSWORD not in journal
    assert PASSWORD not in status["StatusText"]
    assert PASSWORD.encode() not in title
