"""Hosts as network namespaces: three instance hosts and a database host, joined by a switch.

Each host is an ``ip netns`` with a veth pair to a bridge in a fifth namespace, on 10.231.0.0/24 (addresses
made here only). PostgreSQL runs inside the database host and listens on its address; each instance runs
inside its host and reaches the server over that link. A host is killed (every process in it), or its
link is cut for longer than the lease and healed (its instance is then a zombie that must be fenced).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, require
from tests.pg import PostgresServer, unavailable, wait_for
from tests.test_postgresql import (
    EX_TEMPFAIL,
    assert_gap_free,
    assert_orders_invoiced_once,
    count,
    owned_by,
    stop_all,
    submit,
    wait_ready,
)

pytest.importorskip("psycopg")

NET = "10.231.0"
DB_ADDRESS = f"{NET}.1"
LEASE = "3"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


class Hosts:
    """The namespaces, the switch, and the links; ``remove()`` takes it all away."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.switch = f"invsw-{tag}"
        self.names = {"db": f"invdb-{tag}", **{f"h{i}": f"invh{i}-{tag}" for i in (1, 2, 3)}}
        self.addresses = {"db": DB_ADDRESS, "h1": f"{NET}.11", "h2": f"{NET}.12", "h3": f"{NET}.13"}
        self._links: dict[str, str] = {}

    def create(self) -> None:
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for index, (host, namespace) in enumerate(self.names.items()):
            ip("netns", "add", namespace)
            inside, outside = f"veth{index}", f"port{index}"
            ip("link", "add", inside, "netns", namespace, "type", "veth", "peer", "name", outside,
               "netns", self.switch)
            ip("-n", self.switch, "link", "set", outside, "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{self.addresses[host]}/24", "dev", inside)
            ip("-n", namespace, "link", "set", inside, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            self._links[host] = outside

    def run(self, host: str) -> list[str]:
        """The prefix that runs a command on ``host``."""
        return ["ip", "netns", "exec", self.names[host]]

    def cut(self, host: str) -> None:
        """Unplug the host's cable at the switch: packets are lost, no side sees a reset."""
        ip("-n", self.switch, "link", "set", self._links[host], "down")

    def heal(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self._links[host], "up")

    def kill(self, host: str) -> None:
        """Every process on the host dies at once (SIGKILL), as when the machine is lost."""
        pids = subprocess.run(["ip", "netns", "pids", self.names[host]], capture_output=True, text=True,
                              check=True).stdout.split()
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)

    def remove(self) -> None:
        for host in self.names:
            self.kill(host) if Path(f"/run/netns/{self.names[host]}").exists() else None
        for namespace in [*self.names.values(), self.switch]:
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True, check=False)


def can_make_hosts() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "network namespaces need root and iproute2"
    probe = f"invprobe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True, check=False)
    return "" if made.returncode == 0 else f"cannot make network namespaces ({made.stderr.strip()})"


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Hosts, PostgresServer]]:
    reason = can_make_hosts() or unavailable()
    require(not reason, reason)
    made = Hosts()
    root = Path(tempfile.mkdtemp(prefix="invnet-", dir="/tmp"))
    server = PostgresServer(root, host=DB_ADDRESS, port=5432)
    try:
        made.create()
        server.init()
        # pg_ctl inside the database host: the server listens on that host's address only.
        server._as_postgres = _in_namespace(server._as_postgres, made.run("db"))  # type: ignore[method-assign]
        server.start()
        yield made, server
    finally:
        server.stop("immediate")
        made.remove()
        shutil.rmtree(root, ignore_errors=True)


def _in_namespace(run: Callable[..., Any], prefix: list[str]) -> Callable[..., Any]:
    def wrapped(*argv: str, **kwargs: Any) -> Any:
        return subprocess.run([*prefix, "runuser", "-u", "postgres", "--", *argv], capture_output=True,
                              text=True, check=kwargs.get("check", True), timeout=kwargs.get("timeout", 60),
                              cwd="/")
    return wrapped


@pytest.fixture
def network_database(hosts: tuple[Hosts, PostgresServer], request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh database: (the URI over the switch, the URI over the server's socket for checks)."""
    _, server = hosts
    name = "n_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]
    server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    server.create_database(name)
    return server.uri(name, tcp=True, password=True), server.uri(name)


def test_instances_on_three_hosts_survive_a_lost_host_and_a_partition(
        hosts: tuple[Hosts, PostgresServer], network_database: tuple[str, str],
        start_daemon: Callable[..., Daemon]) -> None:
    made, _ = hosts
    remote, local = network_database
    submit(local, 20000)
    settings = {"INVOICER_SOURCE": "orders", "INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "5",
                "INVOICER_LEASE_TIMEOUT": LEASE}
    daemons = {host: start_daemon(remote, prefix=made.run(host), **settings) for host in ("h1", "h2", "h3")}
    wait_ready(*daemons.values())
    assert wait_for(lambda: count(local) >= 2000, 60)
    pids = {host: daemon.process.pid for host, daemon in daemons.items()}

    # Host 1 is lost: every process on it dies; its session stays open on the server until TCP notices.
    assert wait_for(lambda: owned_by(local, pids["h1"]) > 0, 10)  # it holds blocks (claims come and go)
    made.kill("h1")
    daemons["h1"].wait()
    assert wait_for(lambda: owned_by(local, pids["h1"]) == 0, 2 * float(LEASE) + 10)

    # Host 2 is cut off longer than the lease, then comes back: the others took its blocks over, and
    # its next commit must be refused by the fence (or its stranded session ended), never land.
    assert wait_for(lambda: owned_by(local, pids["h2"]) > 0, 10)
    made.cut("h2")
    assert wait_for(lambda: owned_by(local, pids["h2"]) == 0, 3 * float(LEASE) + 15)
    made.heal("h2")
    code, log = daemons["h2"].wait(60)
    assert code == EX_TEMPFAIL, log[-2000:]
    assert "taken over by another instance" in log or "the connection was lost" in log

    submit(local, 2000, start=20000)
    assert wait_for(lambda: count(local) == 22000, 120)
    stop_all([daemons["h3"]])
    assert_gap_free(local)
    assert_orders_invoiced_once(local, 22000)


def test_a_postgresql_restart_under_load_loses_nothing(
        hosts: tuple[Hosts, PostgresServer], network_database: tuple[str, str],
        start_daemon: Callable[..., Daemon]) -> None:
    made, server = hosts
    remote, local = network_database
    settings = {"INVOICER_WORKERS": "16", "INVOICER_PROCESSING_DELAY_MS": "2",
                "INVOICER_LEASE_TIMEOUT": LEASE}
    first = [start_daemon(remote, prefix=made.run(host), **settings) for host in ("h1", "h2")]
    wait_ready(*first)
    assert wait_for(lambda: count(local) >= 2000, 60)
    server.restart()  # fast shutdown: every session is cut, in-flight transactions roll back
    for daemon in first:
        code, log = daemon.wait(60)
        assert code == EX_TEMPFAIL, log[-2000:]  # systemd restarts it (Restart=on-failure)
        assert "the connection was lost" in log or "cannot be reached" in log
    stored = count(local)
    again = [start_daemon(remote, prefix=made.run(host), **settings) for host in ("h1", "h2")]
    wait_ready(*again)
    assert wait_for(lambda: count(local) >= stored + 2000, 60)
    stop_all(again)
    assert_gap_free(local)
