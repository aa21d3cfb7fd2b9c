"""The invoice for an order of the built-in format (:mod:`invoicer.orders`): exact amounts, one rounding rule.

What the built-in processor (:func:`invoicer.processing.process`) computes for each order it receives;
:class:`Invoice` is what every processor returns.
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Context, Decimal, DivisionByZero, InvalidOperation, Overflow, localcontext
from json.encoder import encode_basestring_ascii
from typing import Any

CENT = Decimal("0.01")
_ZERO = Decimal("0.00")
# Orders keep quantities and prices below 10**9 with at most 6 decimal places (invoicer.orders), so a
# product has at most 30 digits and a sum of 10,000 lines fewer still: 40 digits keep every step exact,
# whatever context the calling thread has set.
_ARITHMETIC = Context(prec=40, rounding=ROUND_HALF_UP, traps=[InvalidOperation, DivisionByZero, Overflow])
_quote = encode_basestring_ascii  # a str as a JSON string literal, non-ASCII escaped


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


def invoice_for_order(number: int, order: dict[str, Any]) -> Invoice:
    """Compute invoice ``number`` for a valid ``order`` (see :mod:`invoicer.orders`), without waiting.

    Rounding (as EN 16931, the EU e-invoicing standard, does it): each line's net amount, quantity times
    unit price, is rounded half-up to cents; the tax of each rate is the sum of the net amounts at that
    rate times the rate, rounded half-up to cents; subtotal = sum of line nets, tax = sum of per-rate
    taxes, total = subtotal + tax. Every amount has exactly two decimal places, whatever the currency.

    The document lists the lines with their ``net``, and ``taxes``: one ``{"rate", "base", "tax"}``
    per distinct rate, highest rate first. An order that did not pass validation raises (KeyError,
    TypeError, InvalidOperation, ...), which the pool records as a failed invoice.
    """
    lines = []
    bases: dict[str, Decimal] = {}  # by the rate as written: one Decimal() per distinct spelling
    subtotal = _ZERO
    # The document is formatted by hand, at a third of the cost of json's encoder: amounts are
    # str(Decimal) (digits and '.'), every value from the order goes through json's own escaping.
    with localcontext(_ARITHMETIC):
        for line in order["lines"]:
            quantity = line["quantity"]
            rate = line["tax_rate"]
            price = line["unit_price"]
            if type(quantity) is int:
                net = (Decimal(price) * quantity).quantize(CENT, ROUND_HALF_UP)
                shown = str(quantity)
            else:
                net = (Decimal(price) * Decimal(quantity)).quantize(CENT, ROUND_HALF_UP)
                shown = _quote(quantity)
            subtotal += net
            bases[rate] = bases.get(rate, _ZERO) + net
            lines.append(f'{{"description":{_quote(line["description"])},"quantity":{shown},'
                         f'"unit_price":{_quote(price)},"tax_rate":{_quote(rate)},"net":"{net!s}"}}')
        by_rate: dict[Decimal, Decimal] = {}  # "0.19" and "0.190" are one rate
        for written, base in bases.items():
            value = Decimal(written)
            by_rate[value] = by_rate.get(value, _ZERO) + base
        taxes = []
        tax = _ZERO
        for value in sorted(by_rate, reverse=True):
            base = by_rate[value]
            rate_tax = (base * value).quantize(CENT, ROUND_HALF_UP)
            tax += rate_tax
            taxes.append(f'{{"rate":"{value!s}","base":"{base!s}","tax":"{rate_tax!s}"}}')
        total = subtotal + tax
    customer = order["customer"]
    currency = order["currency"]
    reference = f',"reference":{_quote(order["reference"])}' if "reference" in order else ""
    document = (f'{{"invoice":{number:d},"customer":{_quote(customer)},"currency":{_quote(currency)}'
                f'{reference},"lines":[{",".join(lines)}],"taxes":[{",".join(taxes)}],'
                f'"subtotal":"{subtotal!s}","tax":"{tax!s}","total":"{total!s}"}}')
    return Invoice(number, customer, currency, subtotal, tax, total, document)
