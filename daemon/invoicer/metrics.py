"""Metrics for Prometheus without opening the network: the node exporter's textfile-collector format.

With ``INVOICER_METRICS_FILE`` set, the observer rewrites that file every status tick, atomically (a
temporary file in the same directory, then a rename), so the node exporter's textfile collector never
reads half of it. Labels: ``daemon``, the file's name without ``.prom`` (several instances, several files).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from invoicer.observer import Snapshot

log = logging.getLogger("invoicer")

STATES = ("starting", "recovering", "running", "idle", "draining", "stopped")


def render(snapshot: Snapshot, rate: float, daemon: str) -> str:
    """Return the metrics of ``snapshot`` in the text exposition format."""
    label = f'daemon="{_escape(daemon)}"'
    metrics = [
        ("invoicer_committed_total", "counter", "Invoices committed by this process since it started.",
         snapshot.committed),
        ("invoicer_failed_total", "counter", "Invoices committed as failed by this process since it started.",
         snapshot.failed),
        ("invoicer_stored", "gauge", "Invoices stored in the database (at start, plus this process's since).",
         snapshot.stored_total),
        ("invoicer_rate", "gauge", "Invoices committed per second, over the last 5 seconds.", round(rate, 3)),
        ("invoicer_queue_depth", "gauge", "Invoice numbers waiting in the work queue.", snapshot.queue_depth),
        ("invoicer_in_flight", "gauge", "Invoice numbers handed to the pipeline and not yet committed.",
         snapshot.pending),
        ("invoicer_workers", "gauge", "Consumer threads.", snapshot.workers),
        ("invoicer_oldest_in_flight_seconds", "gauge", "Age of the oldest processor call under way.",
         round(snapshot.oldest_call, 3)),
        ("invoicer_recovery_backlog", "gauge", "Invoice numbers owed since start-up and not yet stored.",
         snapshot.recovery_backlog),
    ]
    lines = []
    for name, kind, text, value in metrics:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name}{{{label}}} {value}"]
    lines += ["# HELP invoicer_state The daemon's state (1 for the current one).",
              "# TYPE invoicer_state gauge"]
    lines += [f'invoicer_state{{{label},state="{state}"}} {int(snapshot.state == state)}' for state in STATES]
    lines += ["# HELP invoicer_healthy 1 while the pipeline is healthy (the watchdog is pinged).",
              "# TYPE invoicer_healthy gauge", f"invoicer_healthy{{{label}}} {int(not snapshot.problem)}",
              "# HELP invoicer_paused 1 while intake is paused because the processor's service is down.",
              "# TYPE invoicer_paused gauge", f"invoicer_paused{{{label}}} {int(bool(snapshot.paused))}"]
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsFile:
    """The file the observer rewrites each tick; a failed write is logged (once until it works again)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.daemon = path.name.removesuffix(".prom")
        self._failing = False

    def write(self, snapshot: Snapshot, rate: float) -> None:
        """Replace the file with the metrics of ``snapshot``, atomically."""
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            temporary.write_text(render(snapshot, rate, self.daemon), encoding="utf-8")
            # Readable by the node exporter's user: the unit's UMask=0077 would make it 0600.
            temporary.chmod(0o644)
            temporary.replace(self.path)
        except (OSError, ValueError) as exc:  # ValueError: a file name the file system cannot encode
            with contextlib.suppress(OSError, ValueError):
                temporary.unlink(missing_ok=True)
            if not self._failing:
                log.warning("cannot write the metrics file %s (%s); trying again every tick", self.path,
                            getattr(exc, "strerror", None) or exc)
            self._failing = True
            return
        if self._failing:
            log.info("metrics file %s written again", self.path)
        self._failing = False
