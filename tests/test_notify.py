"""sd_notify messages over a real unixgram socket; WATCHDOG_USEC / WATCHDOG_PID rules."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from invoicer import notify
from invoicer.notify import Notifier, watchdog_interval
from tests.conftest import NotifyListener


def test_messages_arrive_on_the_socket(notify_socket: NotifyListener,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """READY, STATUS, WATCHDOG, EXTEND_TIMEOUT_USEC, RELOADING and STOPPING arrive as sent."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    notifier = Notifier()
    notifier.ready("running: 2 workers")
    notifier.watchdog()
    notifier.extend_timeout(2.5)
    notifier.reloading(123)
    notifier.stopping()
    notifier.close()
    received = [notify_socket.receive(5) for _ in range(5)]
    assert received == ["READY=1\nSTATUS=running: 2 workers", "WATCHDOG=1", "EXTEND_TIMEOUT_USEC=2500000",
                        "RELOADING=1\nMONOTONIC_USEC=123", "STOPPING=1"]


def test_abstract_socket_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """An abstract NOTIFY_SOCKET ('@name') works as systemd passes it."""
    import os
    import socket

    name = f"invoicer-test-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    notifier = Notifier()
    notifier.status("hello")
    notifier.close()
    assert listener.recv(100) == b"STATUS=hello"
    listener.close()


def test_status_is_one_ascii_line(notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-ASCII text and line breaks cannot break the one-line STATUS (sdnotify drops non-latin-1)."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_socket.path))
    notifier = Notifier()
    notifier.status("draining \u2192 5 left\nsecond line \u20ac")
    notifier.close()
    assert notify_socket.receive(5) == "STATUS=draining ? 5 left second line ?"


def test_silent_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every call is a no-op that raises nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    notifier.ready("x")
    notifier.watchdog()
    assert notifier.enabled is False


# sdnotify drops (without closing) the socket whose connect() failed; the warning is its, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_socket_file_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NOTIFY_SOCKET path with no listener does not crash the daemon."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/invoicer.sock")
    notifier = Notifier()
    notifier.status("nobody listens")
    notifier.close()
    assert notifier.enabled is True


WATCHDOG_CASES = [
    ("unset", {}, None),
    ("ours", {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "42"}, 4.0),
    ("no-pid", {"WATCHDOG_USEC": "500000"}, 0.5),
    ("other-pid", {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "41"}, None),
    ("zero", {"WATCHDOG_USEC": "0"}, None),
    ("garbage", {"WATCHDOG_USEC": "soon"}, None),
]


@pytest.mark.parametrize(("env", "expected"), [(e, x) for _, e, x in WATCHDOG_CASES],
                         ids=[name for name, _, _ in WATCHDOG_CASES])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    """The watchdog is on only with a positive WATCHDOG_USEC meant for our PID (sd_watchdog_enabled)."""
    assert watchdog_interval(env, 42) == expected


def test_a_manager_that_stops_reading_does_not_block(short_tmp: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the socket's queue is full, sends give up after SEND_TIMEOUT_S instead of blocking forever."""
    import socket

    path = short_tmp / "deaf.sock"
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(str(path))  # bound, never read
    monkeypatch.setattr(notify, "SEND_TIMEOUT_S", 0.01)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = Notifier()
    for number in range(100):  # far more than a unix datagram queue holds
        notifier.status(f"message {number}")
    notifier.close()
    received = 0
    deaf.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while deaf.recv(100):
            received += 1
    deaf.close()
    assert 0 < received < 100
