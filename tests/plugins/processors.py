"""Processor plugins for the tests: well-behaved, failing, poisoned, garbage-returning, hanging."""

from __future__ import annotations

import os
import threading

from invoicer.processing import Invoice, build_invoice


def echo(invoice_id: int) -> Invoice:
    """Build the sample invoice without any delay."""
    return build_invoice(invoice_id)


def poison_sevens(invoice_id: int) -> Invoice:
    """Fail every time for numbers divisible by 7 (poison invoices); build the rest."""
    if invoice_id % 7 == 0:
        raise ValueError(f"cannot process {invoice_id}")
    return build_invoice(invoice_id)


def garbage_for_fives(invoice_id: int) -> object:
    """Return something that is not an Invoice for numbers divisible by 5."""
    if invoice_id % 5 == 0:
        return {"id": invoice_id}
    return build_invoice(invoice_id)


_never = threading.Event()


def hang_after(invoice_id: int) -> Invoice:
    """Work normally up to $HANG_AFTER, then block forever (a stuck external call)."""
    if invoice_id > int(os.environ.get("HANG_AFTER", "100")):
        _never.wait()
    return build_invoice(invoice_id)
