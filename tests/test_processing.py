"""The built-in processor: deterministic, well-formed sample invoices; the delay stands in for I/O."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from invoicer import processing
from invoicer.processing import Invoice, build_invoice, process


@pytest.mark.parametrize("invoice_id", [1, 2, 3, 77, 10**6, 2**40])
def test_sample_invoice_is_consistent(invoice_id: int) -> None:
    """Lines add up to the subtotal, tax is rounded to cents, total = subtotal + tax, JSON agrees."""
    invoice = build_invoice(invoice_id)
    document = json.loads(invoice.document)
    assert document["invoice"] == invoice.id == invoice_id
    assert 1 <= len(document["lines"]) <= 5
    lines_total = sum(Decimal(line["amount"]) for line in document["lines"])
    assert lines_total == invoice.subtotal == Decimal(document["subtotal"])
    assert invoice.tax == (invoice.subtotal * Decimal(document["tax_rate"])).quantize(Decimal("0.01"))
    assert invoice.total == invoice.subtotal + invoice.tax == Decimal(document["total"])
    assert invoice.customer == document["customer"]


def test_same_number_same_invoice() -> None:
    """Building the same number twice gives an equal invoice."""
    assert build_invoice(4242) == build_invoice(4242)


def test_samples_vary() -> None:
    """Different numbers give a spread of customers and line counts."""
    invoices = [build_invoice(n) for n in range(1, 200)]
    assert len({i.customer for i in invoices}) >= 5
    assert {len(json.loads(i.document)["lines"]) for i in invoices} == {1, 2, 3, 4, 5}


def test_process_waits_the_configured_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """process() returns the invoice after at least the configured delay."""
    monkeypatch.setattr(processing, "_delay_seconds", 0.0)
    processing.set_delay_ms(30)
    started = time.monotonic()
    invoice = process(9)
    assert time.monotonic() - started >= 0.03
    assert isinstance(invoice, Invoice)
    assert invoice == build_invoice(9)
