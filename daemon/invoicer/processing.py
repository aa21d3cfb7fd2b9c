"""The processor interface and the built-in processor.

A processor is any callable ``process(request: InvoiceRequest) -> Invoice`` named by
``INVOICER_PROCESSOR`` (``module:callable``). The request carries:

``number``
    the invoice number, gap-free. The processor must be **idempotent on it**: after a timeout, a crash
    or ``invoicer retry`` it is called again with the same number and the same order, and must produce
    the same invoice (or do its external step only once, keyed by the number).
``order_id``
    ``orders.id`` of the submitted order, or ``None`` for the demo source's synthetic orders.
``order``
    the parsed order (a dict from JSON), already checked before it took its number. It may be shared
    between calls: a processor must not change it.

A processor may carry a ``check_order`` attribute, ``check_order(payload: str, *, max_bytes: int) ->
dict``: it parses a submitted payload and raises :class:`invoicer.orders.InvalidOrder` (one line) for one
it cannot invoice, so that the order is refused before it takes a number. Without it, any JSON object
within the limits of :func:`invoicer.orders.parse_order` is accepted. The built-in processor's is
:func:`invoicer.orders.check_order` (the format in :mod:`invoicer.orders`).

The built-in :func:`process` computes the invoice (:func:`invoicer.invoicing.invoice_for_order`) and
then waits ``INVOICER_PROCESSING_DELAY_MS`` to stand in for the slow external step of a real deployment
(a tax authority API, a PDF renderer).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from invoicer.invoicing import CENT, Invoice, invoice_for_order
from invoicer.orders import check_order, demo_order, parse_order

__all__ = [
    "CENT",
    "Invoice",
    "InvoiceRequest",
    "ServiceUnavailableError",
    "build_invoice",
    "demo_request",
    "order_checker",
    "process",
    "sample_invoice",
    "set_delay_ms",
]


class InvoiceRequest(NamedTuple):
    """What a processor receives: the invoice number, the order's id and the order (module docstring)."""

    number: int
    order_id: int | None
    order: dict[str, Any]


class ServiceUnavailableError(ConnectionError):
    """Raise it from a processor when the service answered "not now" (HTTP 503, say) rather than "bad".

    Like any OSError it tells the daemon an outage may be under way: when it comes for several different
    invoices in a row, intake pauses instead of storing them as failed. Any other exception is taken to
    be about the invoice itself.
    """


def _read_delay_seconds() -> float:
    try:
        delay_ms = float(os.environ.get("INVOICER_PROCESSING_DELAY_MS", "") or 5.0)
    except ValueError:
        delay_ms = 5.0  # the daemon's configuration check reports bad values and exits 78
    return max(delay_ms, 0.0) / 1000.0


_delay_seconds = _read_delay_seconds()


def set_delay_ms(delay_ms: float) -> None:
    """Set the stand-in external wait (the daemon passes its validated configuration here)."""
    global _delay_seconds
    _delay_seconds = delay_ms / 1000.0


build_invoice = invoice_for_order
"""``build_invoice(number, order)``: the built-in processor's invoice, without the wait."""


def sample_invoice(number: int) -> Invoice:
    """Return the invoice of the demo source's synthetic order for ``number``, without waiting."""
    return invoice_for_order(number, demo_order(number))


def demo_request(number: int) -> InvoiceRequest:
    """Return the request the demo source makes for ``number`` (and recovery, for a number with no order)."""
    return InvoiceRequest(number, None, demo_order(number))


def process(request: InvoiceRequest) -> Invoice:
    """Compute the invoice for the request's order, then wait the configured processing delay."""
    invoice = invoice_for_order(request.number, request.order)
    if _delay_seconds > 0:
        time.sleep(_delay_seconds)
    return invoice


process.check_order = check_order  # type: ignore[attr-defined]  # the built-in format, refused early


def order_checker(processor: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    """Return the processor's ``check_order`` if it has one, else the generic :func:`parse_order`."""
    checker = getattr(processor, "check_order", None)
    return checker if callable(checker) else parse_order
