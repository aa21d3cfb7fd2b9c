"""A processor plugin that makes the daemon's main thread fail: a reload raises; some calls hang.

Importing it wraps Daemon._reload in this process only, so SIGHUP raises in the main thread while
consumer threads are stuck in calls that never return (they would keep a normal interpreter exit
waiting forever).
"""

from __future__ import annotations

import threading

from invoicer.daemon import Daemon
from invoicer.processing import Invoice, InvoiceRequest, build_invoice

_never = threading.Event()


def _broken_reload(self: Daemon) -> None:
    raise RuntimeError("reload broke (injected by the test)")


Daemon._reload = _broken_reload  # type: ignore[method-assign]


def process(request: InvoiceRequest) -> Invoice:
    """Hang forever on every tenth number; build the others."""
    invoice_id = request.number
    if invoice_id % 10 == 0:
        _never.wait()
    return build_invoice(invoice_id, request.order)
