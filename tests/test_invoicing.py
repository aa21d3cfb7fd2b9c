"""Invoices for orders of the built-in format: one rounding rule, exact amounts, the document."""

from __future__ import annotations

import decimal
import json
import threading
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invoicer.invoicing import invoice_for_order as build_invoice
from invoicer.orders import DEFAULT_MAX_ORDER_BYTES, check_order, demo_order
from invoicer.processing import Invoice

CENT = Decimal("0.01")


def order_of(*lines: tuple[Any, str, str], **fields: Any) -> dict[str, Any]:
    """An order of (quantity, unit_price, tax_rate) lines, checked as the pipeline would."""
    order = {"customer": "Acme", "currency": "EUR", **fields,
             "lines": [{"description": f"item {n}", "quantity": q, "unit_price": p, "tax_rate": r}
                       for n, (q, p, r) in enumerate(lines)]}
    return check_order(json.dumps(order), max_bytes=DEFAULT_MAX_ORDER_BYTES)


ROUNDING = [
    ("half-cent-line-rounds-up", [(1, "0.005", "0")], "0.01", "0.00"),
    ("decimal-quantity-half-cent", [("0.5", "0.01", "0")], "0.01", "0.00"),
    ("just-below-half-cent", [(1, "0.004999", "0")], "0.00", "0.00"),
    ("repeating-price", [(3, "0.3333", "0")], "1.00", "0.00"),
    ("half-cent-tax-rounds-up-not-to-even", [(1, "0.50", "0.17")], "0.50", "0.09"),
    ("tax-on-the-rate-total-not-per-line", [(1, "0.10", "0.05"), (1, "0.10", "0.05")], "0.20", "0.01"),
    ("tax-zero", [(7, "13.37", "0")], "93.59", "0.00"),
    ("two-rates", [(3, "120.00", "0.19"), ("1.5", "80.00", "0.19"), (2, "12.50", "0.07")], "505.00", "92.95"),
    ("one-rate-two-spellings", [(1, "0.50", "0.19"), (1, "0.50", "0.190")], "1.00", "0.19"),
    ("rate-one", [(2, "10.00", "1")], "20.00", "20.00"),
    ("electricity", [("1834.25", "0.3182", "0.19")], "583.66", "110.90"),
]


@pytest.mark.parametrize(("lines", "subtotal", "tax"), [(lines, s, t) for _, lines, s, t in ROUNDING],
                         ids=[case for case, _, _, _ in ROUNDING])
def test_rounding_rule_on_hand_computed_examples(lines: list[tuple[Any, str, str]], subtotal: str,
                                                 tax: str) -> None:
    """Line nets round half-up to cents; tax is per rate on the sum of its nets, half-up; total adds up."""
    invoice = build_invoice(1, order_of(*lines))
    assert (str(invoice.subtotal), str(invoice.tax)) == (subtotal, tax)
    assert invoice.total == Decimal(subtotal) + Decimal(tax)


def test_many_tiny_lines_are_taxed_on_their_sum() -> None:
    """10,000 lines of one cent at 19 % are taxed 19.00 in all (rounding per line would give 0.00)."""
    invoice = build_invoice(5, order_of(*[(1, "0.01", "0.19")] * 10_000))
    assert (str(invoice.subtotal), str(invoice.tax), str(invoice.total)) == ("100.00", "19.00", "119.00")


def test_largest_line_is_exact_whatever_the_thread_context() -> None:
    """The largest allowed product is computed exactly even in a thread whose context has 5 digits."""
    results: list[Invoice] = []

    def build_with_tiny_context() -> None:
        decimal.getcontext().prec = 5
        decimal.getcontext().rounding = decimal.ROUND_DOWN
        results.append(build_invoice(9, order_of((999_999_999, "999999999.999999", "0.999999"))))

    thread = threading.Thread(target=build_with_tiny_context)
    thread.start()
    thread.join()
    # 999,999,999 x 999,999,999.999999 = 999,999,999,000,000,000 - 999.999999
    expected_net = Decimal("999999998999999000.000001").quantize(CENT, ROUND_HALF_UP)
    assert results[0].subtotal == expected_net == Decimal("999999998999999000.00")
    assert results[0].tax == (expected_net * Decimal("0.999999")).quantize(CENT, ROUND_HALF_UP)


def test_document_lists_lines_taxes_and_totals() -> None:
    """The document is compact JSON with the number, customer, reference, lines with nets, taxes, totals."""
    order = order_of((3, "120.00", "0.19"), ("1.5", "80.00", "0.19"), (2, "12.50", "0.07"),
                     reference="PO-4711", metadata={"not": "copied"})
    invoice = build_invoice(42, order)
    assert invoice.id == 42
    assert (invoice.customer, invoice.currency) == ("Acme", "EUR")
    assert json.loads(invoice.document) == {
        "invoice": 42, "customer": "Acme", "currency": "EUR", "reference": "PO-4711",
        "lines": [
            {"description": "item 0", "quantity": 3, "unit_price": "120.00", "tax_rate": "0.19",
             "net": "360.00"},
            {"description": "item 1", "quantity": "1.5", "unit_price": "80.00", "tax_rate": "0.19",
             "net": "120.00"},
            {"description": "item 2", "quantity": 2, "unit_price": "12.50", "tax_rate": "0.07",
             "net": "25.00"},
        ],
        "taxes": [{"rate": "0.19", "base": "480.00", "tax": "91.20"},
                  {"rate": "0.07", "base": "25.00", "tax": "1.75"}],
        "subtotal": "505.00", "tax": "92.95", "total": "597.95",
    }
    assert ", " not in invoice.document
    assert ": " not in invoice.document


def test_document_escapes_texts() -> None:
    """Quotes, backslashes and non-ASCII text in the order come out as valid, equal JSON strings."""
    text = 'Müller "the best" \\ GmbH \u00a0 😀'
    order = order_of((1, "1", "0"), reference=text)
    order["customer"] = order["lines"][0]["description"] = text
    document = json.loads(build_invoice(1, order).document)
    assert document["customer"] == document["reference"] == document["lines"][0]["description"] == text


def test_build_is_idempotent_and_leaves_the_order_alone() -> None:
    """Building the same number and order twice gives equal invoices and does not change the order."""
    order = demo_order(77)
    before = json.dumps(order)
    assert build_invoice(77, order) == build_invoice(77, order)
    assert json.dumps(order) == before


def _decimal_text(places: int, whole_digits: int) -> st.SearchStrategy[str]:
    whole = st.integers(0, 10**whole_digits - 1)
    fraction = st.integers(0, places).flatmap(
        lambda n: st.just("") if n == 0 else st.integers(0, 10**n - 1).map(lambda f: "." + str(f).zfill(n)))
    return st.builds(lambda w, f: f"{w}{f}", whole, fraction)


QUANTITIES = st.one_of(st.integers(1, 10**9 - 1),
                       _decimal_text(6, 9).filter(lambda q: Decimal(q) > 0))
RATES = st.sampled_from(["0", "0.07", "0.19", "0.055", "0.2", "0.255", "1"]) | _decimal_text(6, 0)
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30).filter(
    lambda t: not t.isspace())
LINES = st.lists(st.fixed_dictionaries({"description": TEXT, "quantity": QUANTITIES,
                                        "unit_price": _decimal_text(6, 9), "tax_rate": RATES}),
                 min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(lines=LINES, customer=TEXT)
def test_totals_add_up_for_any_valid_order(lines: list[dict[str, Any]], customer: str) -> None:
    """For random valid orders: total = subtotal + tax, subtotal = sum of nets, all amounts in cents."""
    order = check_order(json.dumps({"customer": customer, "currency": "EUR", "lines": lines}),
                        max_bytes=DEFAULT_MAX_ORDER_BYTES)
    invoice = build_invoice(1, order)
    document = json.loads(invoice.document)
    nets = [Decimal(line["net"]) for line in document["lines"]]
    with decimal.localcontext(decimal.Context(prec=100)):
        exact = [Decimal(line["unit_price"]) * Decimal(line["quantity"]) for line in lines]
    assert nets == [net.quantize(CENT, ROUND_HALF_UP) for net in exact]
    assert invoice.subtotal == sum(nets) == Decimal(document["subtotal"])
    assert invoice.tax == sum(Decimal(t["tax"]) for t in document["taxes"]) == Decimal(document["tax"])
    assert invoice.total == invoice.subtotal + invoice.tax == Decimal(document["total"])
    amounts = [invoice.subtotal, invoice.tax, invoice.total, *nets,
               *(Decimal(t[k]) for t in document["taxes"] for k in ("base", "tax"))]
    assert all(amount.as_tuple().exponent == -2 for amount in amounts)
    assert document["customer"] == invoice.customer == customer
