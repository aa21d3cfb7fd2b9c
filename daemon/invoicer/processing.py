"""The processor interface and the built-in sample processor.

A processor is any callable ``process(invoice_id: int) -> Invoice``. The built-in one builds a
deterministic sample invoice from the number (customer, 1-5 line items, ``Decimal`` totals with tax, a
JSON document) and then waits ``INVOICER_PROCESSING_DELAY_MS`` to stand in for the slow external step of a
real deployment (a tax authority API, a PDF renderer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from decimal import Decimal

CUSTOMERS = (
    "Acme Corporation", "Globex GmbH", "Initech Ltd", "Umbrella SA", "Stark Industries",
    "Wayne Enterprises", "Hooli Inc", "Vandelay Industries", "Soylent BV", "Tyrell Oy",
)
PRODUCTS = (
    ("Consulting hour", Decimal("120.00")), ("Support plan", Decimal("49.90")),
    ("Licence seat", Decimal("15.00")), ("Training day", Decimal("890.00")),
    ("Hosting month", Decimal("23.75")), ("Audit", Decimal("1450.00")),
    ("Integration", Decimal("310.40")), ("Spare part", Decimal("7.35")),
)
TAX_RATES = (Decimal("0.19"), Decimal("0.07"), Decimal("0.00"))
CENT = Decimal("0.01")
CURRENCY = "EUR"


class ServiceUnavailableError(ConnectionError):
    """Raise it from a processor when the service answered "not now" (HTTP 503, say) rather than "bad".

    Like any OSError it tells the daemon an outage may be under way: when it comes for several different
    invoices in a row, intake pauses instead of storing them as failed. Any other exception is taken to
    be about the invoice itself.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class Invoice:
    """A processed invoice, ready to be stored; ``id`` is the invoice number."""

    id: int
    customer: str
    currency: str
    subtotal: Decimal
    tax: Decimal
    total: Decimal
    document: str


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


def _mix(value: int) -> int:
    """Hash an integer to 64 bits (splitmix64 finaliser): varied-looking yet deterministic samples."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


def build_invoice(invoice_id: int) -> Invoice:
    """Build the deterministic sample invoice for ``invoice_id`` (no waiting)."""
    seed = _mix(invoice_id)
    customer = CUSTOMERS[seed % len(CUSTOMERS)]
    tax_rate = TAX_RATES[(seed >> 8) % len(TAX_RATES)]
    lines = []
    subtotal = Decimal(0)
    for line in range(1 + (seed >> 16) % 5):
        name, unit_price = PRODUCTS[(seed >> (20 + 3 * line)) % len(PRODUCTS)]
        quantity = 1 + (seed >> (36 + 2 * line)) % 9
        amount = unit_price * quantity
        subtotal += amount
        lines.append({"item": name, "quantity": quantity, "unit_price": str(unit_price),
                      "amount": str(amount)})
    tax = (subtotal * tax_rate).quantize(CENT)
    total = subtotal + tax
    document = json.dumps({
        "invoice": invoice_id, "customer": customer, "currency": CURRENCY, "lines": lines,
        "subtotal": str(subtotal), "tax_rate": str(tax_rate), "tax": str(tax), "total": str(total),
    }, separators=(",", ":"))
    return Invoice(invoice_id, customer, CURRENCY, subtotal, tax, total, document)


def process(invoice_id: int) -> Invoice:
    """Build the sample invoice for ``invoice_id``, then wait the configured processing delay."""
    invoice = build_invoice(invoice_id)
    if _delay_seconds > 0:
        time.sleep(_delay_seconds)
    return invoice
