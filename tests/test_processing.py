"""The built-in processor: the order's invoice, demo samples, order checks; the delay stands in for I/O."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import pytest

from invoicer import processing
from invoicer.invoicing import invoice_for_order
from invoicer.orders import DEFAULT_MAX_ORDER_BYTES, InvalidOrder, check_order, demo_order, parse_order
from invoicer.processing import (
    Invoice,
    InvoiceRequest,
    build_invoice,
    demo_request,
    order_checker,
    process,
    sample_invoice,
)

ORDER = {"customer": "Globex GmbH", "currency": "CHF", "reference": "PO-17",
         "lines": [{"description": "Audit", "quantity": 2, "unit_price": "1450.00", "tax_rate": "0.081"},
                   {"description": "Consulting hour", "quantity": "1.5", "unit_price": "120.00",
                    "tax_rate": "0"}]}


@pytest.mark.parametrize("invoice_id", [1, 2, 3, 77, 10**6, 2**40])
def test_sample_invoice_is_consistent(invoice_id: int) -> None:
    """Line nets add up to the subtotal, taxes to the tax, total = subtotal + tax, the JSON agrees."""
    invoice = sample_invoice(invoice_id)
    document = json.loads(invoice.document)
    assert document["invoice"] == invoice.id == invoice_id
    assert 1 <= len(document["lines"]) <= 5
    lines_total = sum(Decimal(line["net"]) for line in document["lines"])
    assert lines_total == invoice.subtotal == Decimal(document["subtotal"])
    assert invoice.tax == sum(Decimal(tax["tax"]) for tax in document["taxes"]) == Decimal(document["tax"])
    assert invoice.total == invoice.subtotal + invoice.tax == Decimal(document["total"])
    assert invoice.customer == document["customer"]
    assert invoice == invoice_for_order(invoice_id, demo_order(invoice_id))  # the demo order's invoice


def test_same_number_same_invoice() -> None:
    """Building the same number twice gives an equal invoice."""
    assert sample_invoice(4242) == sample_invoice(4242)


def test_samples_vary() -> None:
    """Different numbers give a spread of customers and line counts."""
    invoices = [sample_invoice(n) for n in range(1, 200)]
    assert len({i.customer for i in invoices}) >= 5
    assert {len(json.loads(i.document)["lines"]) for i in invoices} == {1, 2, 3, 4, 5}


def test_build_invoice_is_the_order_invoice() -> None:
    """build_invoice(number, order) is the order's invoice (invoicer.invoicing), without any wait."""
    assert build_invoice is invoice_for_order
    order = check_order(json.dumps(ORDER), max_bytes=DEFAULT_MAX_ORDER_BYTES)
    invoice = build_invoice(12, order)
    assert (invoice.id, invoice.customer, invoice.currency) == (12, "Globex GmbH", "CHF")
    assert (str(invoice.subtotal), str(invoice.tax), str(invoice.total)) == ("3080.00", "234.90", "3314.90")


def test_process_computes_the_order_invoice_and_waits_the_configured_delay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """process() returns the invoice of the request's order under its number, after at least the delay."""
    monkeypatch.setattr(processing, "_delay_seconds", 0.0)
    processing.set_delay_ms(30)
    order = check_order(json.dumps(ORDER), max_bytes=DEFAULT_MAX_ORDER_BYTES)
    before = json.dumps(order)
    started = time.monotonic()
    invoice = process(InvoiceRequest(9, 4, order))
    assert time.monotonic() - started >= 0.03
    assert isinstance(invoice, Invoice)
    assert invoice == build_invoice(9, order)
    assert invoice.customer == "Globex GmbH"  # the order's, not a sample's
    assert json.dumps(order) == before  # the order may be shared: it is left alone


def test_demo_request_carries_the_demo_order_and_no_order_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """demo_request(n) is n with no order id and the demo order; processed, it gives sample_invoice(n)."""
    monkeypatch.setattr(processing, "_delay_seconds", 0.0)
    request = demo_request(31)
    assert request == InvoiceRequest(31, None, demo_order(31))
    assert (request.number, request.order_id, request.order) == (31, None, demo_order(31))
    assert process(request) == sample_invoice(31)


def test_built_in_processor_checks_the_built_in_format() -> None:
    """process.check_order is invoicer.orders.check_order, and order_checker(process) returns it."""
    assert getattr(process, "check_order", None) is check_order
    assert order_checker(process) is check_order


def _no_check(request: InvoiceRequest) -> Invoice:
    return build_invoice(request.number, request.order)


def _own_check(payload: str, *, max_bytes: int) -> dict[str, Any]:
    raise InvalidOrder("refused by the processor")


def _with_own_check(request: InvoiceRequest) -> Invoice:
    return build_invoice(request.number, request.order)


_with_own_check.check_order = _own_check  # type: ignore[attr-defined]


def _with_a_check_that_is_no_function(request: InvoiceRequest) -> Invoice:
    return build_invoice(request.number, request.order)


_with_a_check_that_is_no_function.check_order = "strict"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("processor", "expected"), [
    (_no_check, parse_order),
    (_with_own_check, _own_check),
    (_with_a_check_that_is_no_function, parse_order),
], ids=["none", "own", "not-callable"])
def test_order_checker_is_the_processor_check_or_the_generic_parse(processor: Any, expected: Any) -> None:
    """A processor's callable check_order is used; without one, any JSON object parse_order accepts."""
    assert order_checker(processor) is expected


def test_a_processor_without_a_check_accepts_any_json_object() -> None:
    """The generic check refuses what is no JSON object but not an order of another format."""
    check = order_checker(_no_check)
    assert check('{"sku": "A-1", "count": 3}', max_bytes=1024) == {"sku": "A-1", "count": 3}
    with pytest.raises(InvalidOrder):
        check("[1, 2]", max_bytes=1024)
