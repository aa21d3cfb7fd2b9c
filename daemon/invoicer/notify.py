"""sd_notify(3) messages through the ``sdnotify`` package: tiny, and silent without systemd."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import sdnotify

SEND_TIMEOUT_S = 1.0


def _ascii_line(text: str) -> str:
    # Debian's sdnotify 0.3.1 encodes latin-1 and silently drops a message it cannot encode; systemd
    # wants one line per assignment. So: ASCII only, no line breaks.
    return text.replace("\n", " ").encode("ascii", "replace").decode("ascii")


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds of the watchdog timeout systemd set for us, or None (sd_watchdog_enabled(3) rules)."""
    usec = env.get("WATCHDOG_USEC", "")
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(pid):
        return None  # meant for another process (we were started by, say, a wrapper)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class Notifier:
    """Sends sd_notify messages; a no-op when ``NOTIFY_SOCKET`` is unset."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        # Rule: _lock guards the lazy creation of _notifier; each send is then one datagram.
        self._lock = threading.Lock()
        self._notifier: sdnotify.SystemdNotifier | None = None

    def send(self, *assignments: str) -> None:
        """Send ``assignments`` (``KEY=value`` strings) as one datagram."""
        if not self.enabled:
            return
        with self._lock:
            if self._notifier is None:
                self._notifier = sdnotify.SystemdNotifier()  # connects to $NOTIFY_SOCKET
                if self._notifier.socket is not None:
                    # A manager that stops reading must not block the daemon: after this long a
                    # message is dropped (sdnotify swallows the timeout) rather than stall a thread.
                    self._notifier.socket.settimeout(SEND_TIMEOUT_S)
            notifier = self._notifier
        notifier.notify("\n".join(_ascii_line(a) for a in assignments))

    def close(self) -> None:
        """Close the socket; a later send reconnects."""
        with self._lock:
            if self._notifier is not None and self._notifier.socket is not None:
                self._notifier.socket.close()
            self._notifier = None

    def ready(self, status: str) -> None:
        """Tell systemd start-up is complete (``READY=1``) along with the first status line."""
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        """Set the one-line status ``systemctl status`` shows."""
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Ping the watchdog."""
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        """Ask for ``seconds`` more before the current start/stop timeout expires."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def stopping(self) -> None:
        """Tell systemd the service is stopping."""
        self.send("STOPPING=1")

    def reloading(self, monotonic_usec: int) -> None:
        """Tell systemd a reload has begun (``RELOADING=1`` with ``MONOTONIC_USEC=``)."""
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
