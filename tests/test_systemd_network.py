"""The example HTTP processor under the real unit: with the network drop-in, and with the network closed.

The user manager runs in a private mount namespace only, so a service on the host's 127.0.0.1 is
reachable from the unit once PrivateNetwork=no; with PrivateNetwork=yes the unit has a loopback of its own.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from invoicer.outage import OUTAGE_INVOICES
from tests.conftest import REPO, assert_gap_free, require
from tests.http_service import InvoiceService
from tests.systemd_harness import UserManager, missing_requirements
from tests.test_systemd import (
    UNIT,
    database,
    extra_drop_in,
    status,
    unit_manager,
    wait_until,
    write_environment,
)

pytestmark = pytest.mark.systemd

NETWORK_CONF = REPO / "packaging" / "network.conf"
ALLOW_LINE = "IPAddressAllow=192.0.2.10\n"
HINT = ("install /usr/share/doc/invoicer/examples/network.conf as a drop-in, with the service's address "
        "in IPAddressAllow=, see README")
# The unit's hardening minus the one setting under test: address families opened, packet filter off.
FAMILIES_OPEN = "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"


def network_drop_in(allow: str) -> str:
    """The shipped drop-in with ``allow`` in IPAddressAllow=."""
    text = NETWORK_CONF.read_text()
    assert ALLOW_LINE in text
    return text.replace(ALLOW_LINE, f"IPAddressAllow={allow}\n")


@pytest.fixture(scope="module")
def manager() -> Iterator[UserManager]:
    """A user manager with the repository's unit and the same test drop-in as test_systemd.py."""
    yield from unit_manager()


@pytest.fixture
def service(manager: UserManager) -> Iterator[InvoiceService]:
    """An HTTP service on the host's 127.0.0.1, and a fresh database for the unit; the unit stopped after."""
    manager.systemctl("stop", UNIT, check=False)
    for path in database(manager).parent.glob("invoices.db*"):
        path.unlink()
    server = InvoiceService().start()
    yield server
    manager.systemctl("stop", UNIT, check=False, timeout=60)
    server.stop()


def configure(manager: UserManager, url: str, timeout: str = "2") -> None:
    """Point the unit's processor at ``url`` with few workers and a short queue (failing drains are short)."""
    write_environment(manager, INVOICER_PROCESSOR="invoicer.examples.http:process", INVOICER_HTTP_URL=url,
                      INVOICER_HTTP_TIMEOUT=timeout, INVOICER_WORKERS="2", INVOICER_QUEUE_SIZE="2",
                      INVOICER_STATUS_INTERVAL="0.2")


def errors_in_journal(manager: UserManager, pid: str) -> list[str]:
    """The last line of every traceback the daemon ``pid`` logged: the error as one line."""
    lines = manager.journal("-t", "invoicer", "-o", "cat", f"_PID={pid}").splitlines()
    records = [json.loads(line) for line in lines]
    return [record["exc_info"].splitlines()[-1] for record in records if "exc_info" in record]


def wait_for_error(manager: UserManager, pid: str, pattern: str) -> str:
    """Wait until the journal shows an error matching ``pattern`` (journald indexes asynchronously)."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = [line for line in errors_in_journal(manager, pid) if re.fullmatch(pattern, line)]
        return bool(found)

    wait_until(logged, what=f"an error matching {pattern!r} in the journal")
    return found[0]


def test_unit_with_the_network_drop_in_verifies_clean() -> None:
    """systemd-analyze verify accepts the unit with packaging/network.conf as its drop-in."""
    require(not missing_requirements(), "systemd-analyze and unshare are needed")
    require(shutil.which("man") is not None, "man is needed for the Documentation= check")
    work = Path(tempfile.mkdtemp(prefix="invoicer-verify-"))
    for directory in ("bin", "man8", "units/invoicer.service.d"):
        (work / directory).mkdir(parents=True)
    shutil.copy(Path(sys.executable).parent / "invoicer", work / "bin" / "invoicer")
    shutil.copy(REPO / "packaging" / "invoicer.8", work / "man8" / "invoicer.8")
    shutil.copy(REPO / UNIT, work / "units" / UNIT)
    shutil.copy(NETWORK_CONF, work / "units" / "invoicer.service.d" / "network.conf")
    unit = f"{work}/units/{UNIT}"
    script = (f"mount -t overlay overlay -o lowerdir=/usr/bin:{work}/bin /usr/bin && "
              f"mount -t overlay overlay -o lowerdir=/usr/share/man/man8:{work}/man8 /usr/share/man/man8 && "
              f"systemd-analyze verify {unit} && echo verified && "
              f"SYSTEMD_LOG_LEVEL=debug systemd-analyze verify {unit} 2>&1 | grep -o 'DropIn Path: .*'")
    try:
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                 script], capture_output=True, text=True, timeout=60, check=False)
    finally:
        shutil.rmtree(work)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    # Nothing from verify itself, and the drop-in was read.
    assert result.stdout.splitlines() == ["verified", f"DropIn Path: {work}/units/{UNIT}.d/network.conf"]


def test_with_the_network_drop_in_invoices_are_posted(manager: UserManager, service: InvoiceService) -> None:
    """The drop-in with IPAddressAllow=127.0.0.1: every stored invoice was POSTed once, with its key."""
    with extra_drop_in(manager, "network.conf", network_drop_in("127.0.0.1")):
        configure(manager, service.url)
        manager.systemctl("restart", UNIT)
        service.wait_for_requests(100, timeout=30)
        manager.systemctl("stop", UNIT)
    assert status(manager)["Result"] == "success"
    facts = assert_gap_free(database(manager))
    assert facts.failed == 0
    posted = sorted(int(request.key or 0) for request in service.recorded())
    assert posted == list(range(1, facts.count + 1))


def test_without_the_drop_in_the_journal_names_the_closed_network(manager: UserManager,
                                                                  service: InvoiceService) -> None:
    """The unit as shipped: socket() fails (RestrictAddressFamilies=) and the journal says how to open it."""
    configure(manager, service.url)
    manager.systemctl("restart", UNIT)
    error = wait_for_error(manager, status(manager)["MainPID"], r".*NetworkClosedError: .*")
    assert error == (f"invoicer.examples.http.NetworkClosedError: POST {service.url}: [Errno 97] Address "
                     "family not supported by protocol: the network is closed to this service "
                     f"(RestrictAddressFamilies=); {HINT}")
    assert service.recorded() == []
    # Every call fails: an outage, so the daemon pauses and says why instead of storing failed rows.
    wait_until(lambda: status(manager)["StatusText"].startswith("paused: NetworkClosedError: POST"),
               what="STATUS=paused naming the closed network")
    with sqlite3.connect(f"file:{database(manager)}?mode=ro", uri=True) as connection:
        failed = connection.execute("SELECT count(*) FROM invoices WHERE status = 'failed'").fetchone()[0]
    connection.close()
    assert failed < OUTAGE_INVOICES  # with two workers, the invoices before the outage was recognised


def test_an_address_not_allowed_times_out_naming_ip_address_allow(manager: UserManager,
                                                                 service: InvoiceService) -> None:
    """The drop-in without the service's address: IPAddressDeny=any drops the packets, connects time out."""
    with extra_drop_in(manager, "network.conf", network_drop_in("192.0.2.10")):
        configure(manager, service.url, timeout="0.3")
        manager.systemctl("restart", UNIT)
        error = wait_for_error(manager, status(manager)["MainPID"], r".*TimeoutError: .*")
    assert error == (f"TimeoutError: POST {service.url}: could not connect within 0.3 s "
                     "(INVOICER_HTTP_TIMEOUT); the service is down or unreachable, or IPAddressAllow= in "
                     "this service's network drop-in does not list its address, see README")
    assert service.recorded() == []


def test_private_network_alone_names_private_network(manager: UserManager, service: InvoiceService) -> None:
    """Families open and no packet filter, but PrivateNetwork=yes: no route, and the journal says why."""
    with extra_drop_in(manager, "network.conf", FAMILIES_OPEN + "IPAddressDeny=\n"):
        url = "http://192.0.2.1:8080/invoices"  # anywhere but the unit's own loopback
        configure(manager, url)
        manager.systemctl("restart", UNIT)
        error = wait_for_error(manager, status(manager)["MainPID"], r".*NetworkClosedError: .*")
    assert error == (f"invoicer.examples.http.NetworkClosedError: POST {url}: [Errno 101] Network is "
                     f"unreachable: the network is closed to this service (PrivateNetwork=); {HINT}")
