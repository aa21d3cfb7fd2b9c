"""The built-in order format: what is accepted, what is refused with which one-line message."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest

from invoicer.orders import (
    DEFAULT_MAX_ORDER_BYTES,
    DEMO_ORDER_COUNT,
    MAX_DEPTH,
    InvalidOrder,
    check_order,
    demo_order,
    parse_order,
    validate_order,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "orders.jsonl"
LIMIT = DEFAULT_MAX_ORDER_BYTES


def valid_order(**changes: Any) -> dict[str, Any]:
    """A typical three-line order, with top-level fields replaced by ``changes``."""
    order: dict[str, Any] = {
        "customer": "Acme Corporation", "currency": "EUR", "reference": "PO-4711",
        "lines": [
            {"description": "Consulting hour", "quantity": 3, "unit_price": "120.00", "tax_rate": "0.19"},
            {"description": "Travel", "quantity": "1.5", "unit_price": "80.00", "tax_rate": "0.19"},
            {"description": "Books", "quantity": 2, "unit_price": "12.50", "tax_rate": "0.07"},
        ],
    }
    order.update(changes)
    return order


def with_line(**changes: Any) -> dict[str, Any]:
    """The typical order with fields of its second line (lines[1]) replaced or, for ``None``, removed."""
    order = valid_order()
    line = order["lines"][1]
    for name, value in changes.items():
        if value is None:
            del line[name]
        else:
            line[name] = value
    return order


def test_typical_order_is_accepted_unchanged() -> None:
    """check_order returns the parsed payload as it is: strings stay strings."""
    order = valid_order(metadata={"channel": "webshop", "tags": ["a", {"b": 1}]})
    assert check_order(json.dumps(order), max_bytes=LIMIT) == order


def test_every_shipped_example_is_valid() -> None:
    """Every line of examples/orders.jsonl is a valid order, and there are about twenty."""
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 20
    for number, line in enumerate(lines, 1):
        try:
            check_order(line, max_bytes=LIMIT)
            parse_order(line, max_bytes=LIMIT)
        except InvalidOrder as exc:  # pragma: no cover - names the line on failure
            pytest.fail(f"examples/orders.jsonl line {number}: {exc}")


@pytest.mark.parametrize("order", [
    valid_order(lines=[{"description": "x", "quantity": 1, "unit_price": "0", "tax_rate": "0"}]),
    valid_order(lines=[{"description": "x", "quantity": 999_999_999, "unit_price": "999999999.999999",
                        "tax_rate": "1.000000"}]),
    valid_order(lines=[{"description": "x", "quantity": "0.000001", "unit_price": "0.000001",
                        "tax_rate": "0.000001"}]),
    valid_order(lines=[{"description": "x" * 500, "quantity": "007", "unit_price": "00012.50",
                        "tax_rate": "00.19"}]),
    valid_order(customer="Zürcher Grafik AG\u00a0\u200d", currency="CHF"),
    valid_order(customer="c" * 200, reference="r" * 200),
    valid_order(lines=(valid_order()["lines"] * 3334)[:10_000]),
], ids=["zero-price-and-rate", "largest", "smallest", "leading-zeros-and-long-text", "non-printable-space",
        "longest-texts", "10000-lines"])
def test_edge_orders_are_accepted(order: dict[str, Any]) -> None:
    """Orders at the limits of every field pass both check_order and parse_order + validate_order."""
    payload = json.dumps(order)
    assert check_order(payload, max_bytes=LIMIT) == order
    validate_order(parse_order(payload, max_bytes=LIMIT))


PARSE_REFUSALS = [
    ("malformed", '{"customer": "A",}',
     "malformed JSON: Expecting property name enclosed in double quotes: line 1 column 18 (char 17)"),
    ("empty", "", "malformed JSON: Expecting value: line 1 column 1 (char 0)"),
    ("trailing-data", '{"a": 1} {"b": 2}', "malformed JSON: Extra data: line 1 column 10 (char 9)"),
    ("array", "[1, 2]", "order must be a JSON object, not array"),
    ("string", '"order"', "order must be a JSON object, not string"),
    ("null", "null", "order must be a JSON object, not null"),
    ("nan", '{"x": NaN}', "NaN is not valid JSON (numbers must be finite)"),
    ("infinity", '{"x": -Infinity}', "-Infinity is not valid JSON (numbers must be finite)"),
    ("float-overflow", '{"x": 1e999}', "number 1e999 is out of range"),
    ("huge-integer", '{"x": ' + "9" * 5000 + "}", "malformed JSON: an integer with too many digits"),
    ("duplicate-field", '{"customer": "A", "customer": "B"}', "duplicate field 'customer' in an object"),
    ("17-deep", '{"x": ' + "[" * 16 + "]" * 16 + "}",
     f"order nests deeper than {MAX_DEPTH} levels of arrays and objects"),
    ("100000-deep", "[" * 100_000, f"order nests deeper than {MAX_DEPTH} levels of arrays and objects"),
    ("100000-deep-closed", '{"x": ' + "[" * 100_000 + "]" * 100_000 + "}",
     f"order nests deeper than {MAX_DEPTH} levels of arrays and objects"),
]


@pytest.mark.parametrize(("payload", "message"), [(p, m) for _, p, m in PARSE_REFUSALS],
                         ids=[case for case, _, _ in PARSE_REFUSALS])
def test_parse_refusals_name_the_problem(payload: str, message: str) -> None:
    """parse_order refuses each payload with exactly this one-line message."""
    with pytest.raises(InvalidOrder) as caught:
        parse_order(payload, max_bytes=LIMIT)
    assert str(caught.value) == message
    assert "\n" not in message


def test_sixteen_levels_are_allowed() -> None:
    """An object holding 15 nested arrays is 16 levels deep: the limit, still accepted."""
    payload = '{"x": ' + "[" * 15 + "]" * 15 + "}"
    assert parse_order(payload, max_bytes=LIMIT) == json.loads(payload)


def test_too_big_names_size_and_limit() -> None:
    """A payload over max_bytes (counted in UTF-8) is refused with its size and the limit."""
    payload = json.dumps(valid_order(customer="Ü" * 60), ensure_ascii=False)
    size = len(payload.encode())
    with pytest.raises(InvalidOrder) as caught:
        check_order(payload, max_bytes=size - 1)
    assert str(caught.value) == f"order is {size:,} bytes, over the limit of {size - 1:,} bytes"
    assert check_order(payload, max_bytes=size)["customer"] == "Ü" * 60


def test_absurd_nesting_is_refused_fast_without_recursion_error() -> None:
    """A 100,000-deep payload is refused by check_order too, cleanly and in well under a second."""
    started = time.monotonic()
    for payload in ("[" * 100_000, '{"metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"):
        with pytest.raises(InvalidOrder, match="nests deeper"):
            check_order(payload, max_bytes=LIMIT)
    assert time.monotonic() - started < 1.0


def test_deep_metadata_is_refused_by_check_order() -> None:
    """check_order refuses metadata nested past the limit, like parse_order does."""
    order = valid_order(metadata={"x": json.loads("[" * 15 + "]" * 15)})
    with pytest.raises(InvalidOrder, match="nests deeper than 16"):
        check_order(json.dumps(order), max_bytes=LIMIT)
    order["metadata"] = {"x": json.loads("[" * 14 + "]" * 14)}
    check_order(json.dumps(order), max_bytes=LIMIT)


@pytest.mark.parametrize("payload", [
    '{"customer": "A", "currency": "EUR", "lines": [{"description": "x", "quantity": 1, "unit_price": "1", '
    '"tax_rate": "0", "unit_price": "100"}]}',
    '{"customer": "A: the one", "customer": "B", "currency": "EUR", "lines": [{"description": "x", '
    '"quantity": 1, "unit_price": "1", "tax_rate": "0"}]}',
    '{"customer": "A", "currency": "EUR", "lines": [{"description": "x", "quantity": 1, "unit_price": "1", '
    '"tax_rate": "0"}], "metadata": {"a": 1, "a": 2}}',
], ids=["in-a-line", "colon-in-a-string", "in-metadata"])
def test_check_order_refuses_duplicate_fields(payload: str) -> None:
    """check_order refuses duplicate field names wherever they are, although it parses without the hook."""
    with pytest.raises(InvalidOrder, match=r"^duplicate field '(unit_price|customer|a)' in an object$"):
        check_order(payload, max_bytes=LIMIT)


def test_colons_in_strings_do_not_refuse_a_valid_order() -> None:
    """A valid order whose texts contain colons takes the strict parse and is accepted."""
    order = valid_order(customer="Acme: Berlin", reference="PO:1:2")
    assert check_order(json.dumps(order), max_bytes=LIMIT) == order


VALIDATION_REFUSALS = [
    ("missing-customer", {k: v for k, v in valid_order().items() if k != "customer"},
     "missing field 'customer'"),
    ("unknown-field", valid_order(discount="10%"),
     "unknown field 'discount' (allowed: currency, customer, lines, metadata, reference)"),
    ("customer-number", valid_order(customer=42), "customer: must be a string, not integer"),
    ("customer-blank", valid_order(customer="  "), "customer: is blank"),
    ("customer-empty", valid_order(customer=""), "customer: is blank"),
    ("customer-long", valid_order(customer="c" * 201), "customer: 201 characters, over the limit of 200"),
    ("customer-newline", valid_order(customer="Acme\nEvil"),
     "customer: contains the control character U+000A"),
    ("customer-surrogate", valid_order(customer="Acme\ud800"),
     "customer: contains the control character U+D800"),
    ("currency-lowercase", valid_order(currency="eur"),
     "currency: 'eur' is not three uppercase letters (ISO 4217, e.g. 'EUR')"),
    ("currency-symbol", valid_order(currency="€"),
     "currency: '€' is not three uppercase letters (ISO 4217, e.g. 'EUR')"),
    ("currency-non-ascii", valid_order(currency="ÄÖÜ"),
     "currency: 'ÄÖÜ' is not three uppercase letters (ISO 4217, e.g. 'EUR')"),
    ("currency-null", valid_order(currency=None),
     "currency: null is not three uppercase letters (ISO 4217, e.g. 'EUR')"),
    ("reference-number", valid_order(reference=4711), "reference: must be a string, not integer"),
    ("metadata-array", valid_order(metadata=[1]), "metadata: must be an object, not array"),
    ("lines-object", valid_order(lines={}), "lines: must be an array, not object"),
    ("lines-empty", valid_order(lines=[]), "lines: empty (an order needs at least one line)"),
    ("lines-too-many", valid_order(lines=valid_order()["lines"] * 3334),
     "lines: 10,002 lines, over the limit of 10,000"),
    ("line-not-object", valid_order(lines=[["x", 1, "1.00", "0.19"]]),
     "lines[0]: must be an object, not array"),
    ("line-missing-rate", with_line(tax_rate=None), "lines[1]: missing field 'tax_rate'"),
    ("line-unknown-field", with_line(unit="h"),
     "lines[1]: unknown field 'unit' (allowed: description, quantity, tax_rate, unit_price)"),
    ("description-blank", with_line(description=" "), "lines[1].description: is blank"),
    ("description-long", with_line(description="d" * 501),
     "lines[1].description: 501 characters, over the limit of 500"),
    ("description-tab", with_line(description="a\tb"),
     "lines[1].description: contains the control character U+0009"),
    ("quantity-zero", with_line(quantity=0), "lines[1].quantity: 0 is not positive"),
    ("quantity-negative", with_line(quantity=-2), "lines[1].quantity: -2 is not positive"),
    ("quantity-zero-string", with_line(quantity="0.000"), "lines[1].quantity: '0.000' is not positive"),
    ("quantity-negative-string", with_line(quantity="-1.5"), "lines[1].quantity: '-1.5' is not positive"),
    ("quantity-float", with_line(quantity=1.5),
     "lines[1].quantity: must be an integer or a decimal string (e.g. '12.50'), not number: "
     "JSON numbers are binary floats, write the exact decimal"),
    ("quantity-boolean", with_line(quantity=True),
     "lines[1].quantity: must be an integer or a decimal string (e.g. '12.50'), not boolean"),
    ("quantity-huge", with_line(quantity=10**9), "lines[1].quantity: 1000000000 is 1,000,000,000 or more"),
    ("quantity-places", with_line(quantity="1.0000001"),
     "lines[1].quantity: '1.0000001' has more than 6 decimal places"),
    ("price-comma", with_line(unit_price="12,50"),
     "lines[1].unit_price: '12,50' is not a decimal amount (digits with an optional '.', e.g. '12.50')"),
    ("price-exponent", with_line(unit_price="1e3"),
     "lines[1].unit_price: '1e3' is not a decimal amount (digits with an optional '.', e.g. '12.50')"),
    ("price-spaces", with_line(unit_price=" 12.50"),
     "lines[1].unit_price: ' 12.50' is not a decimal amount (digits with an optional '.', e.g. '12.50')"),
    ("price-arabic-digits", with_line(unit_price="١٢"),
     "lines[1].unit_price: '١٢' is not a decimal amount (digits with an optional '.', e.g. '12.50')"),
    ("price-nan", with_line(unit_price="NaN"),
     "lines[1].unit_price: 'NaN' is not a decimal amount (digits with an optional '.', e.g. '12.50')"),
    ("price-negative", with_line(unit_price="-1.00"), "lines[1].unit_price: '-1.00' is negative"),
    ("price-negative-zero", with_line(unit_price="-0"), "lines[1].unit_price: '-0' is negative"),
    ("price-number", with_line(unit_price=12.5),
     "lines[1].unit_price: must be a string (e.g. '12.50'), not number: "
     "JSON numbers are binary floats, write the exact decimal"),
    ("price-integer", with_line(unit_price=12),
     "lines[1].unit_price: must be a string (e.g. '12.50'), not integer"),
    ("price-places", with_line(unit_price="0.0000001"),
     "lines[1].unit_price: '0.0000001' has more than 6 decimal places"),
    ("price-huge", with_line(unit_price="1000000000.00"),
     "lines[1].unit_price: '1000000000.00' is 1,000,000,000 or more"),
    ("price-long", with_line(unit_price="1" * 50),
     "lines[1].unit_price: '1111111111111111111111111111111111111'... is 1,000,000,000 or more"),
    ("rate-over-one", with_line(tax_rate="1.5"),
     "lines[1].tax_rate: '1.5' is over 1 (a rate is a fraction: '0.19' is 19 %)"),
    ("rate-percent", with_line(tax_rate="19"),
     "lines[1].tax_rate: '19' is over 1 (a rate is a fraction: '0.19' is 19 %)"),
    ("rate-percent-sign", with_line(tax_rate="19%"),
     "lines[1].tax_rate: '19%' is not a decimal rate (digits with an optional '.', e.g. '12.50')"),
    ("rate-negative", with_line(tax_rate="-0.19"), "lines[1].tax_rate: '-0.19' is negative"),
]


@pytest.mark.parametrize(("order", "message"), [(o, m) for _, o, m in VALIDATION_REFUSALS],
                         ids=[case for case, _, _ in VALIDATION_REFUSALS])
def test_validation_refusals_name_the_field(order: dict[str, Any], message: str) -> None:
    """validate_order and check_order refuse each order with exactly this one-line message."""
    with pytest.raises(InvalidOrder) as caught:
        validate_order(copy.deepcopy(order))
    assert str(caught.value) == message
    assert "\n" not in message
    with pytest.raises(InvalidOrder) as caught:
        check_order(json.dumps(order), max_bytes=LIMIT)
    assert str(caught.value) == message


def test_the_first_bad_line_is_named() -> None:
    """With several bad lines, the message names the first one by its index."""
    order = valid_order()
    order["lines"] = order["lines"] * 5
    order["lines"][7] = dict(order["lines"][7], unit_price="x")
    order["lines"][9] = dict(order["lines"][9], unit_price="y")
    with pytest.raises(InvalidOrder, match=r"^lines\[7\]\.unit_price: 'x' is not"):
        validate_order(order)


def test_demo_orders_are_valid_deterministic_and_varied() -> None:
    """demo_order gives the same valid order for a number, and a spread of customers, sizes and rates."""
    orders = [demo_order(number) for number in range(1, 1000)]
    assert [demo_order(number) for number in range(1, 1000)] == orders
    for order in orders[:DEMO_ORDER_COUNT * 2]:
        validate_order(order)
        check_order(json.dumps(order), max_bytes=LIMIT)
    assert len({order["customer"] for order in orders}) >= 8
    assert {len(order["lines"]) for order in orders} == {1, 2, 3, 4, 5}
    assert {line["tax_rate"] for order in orders for line in order["lines"]} == {"0.19", "0.07", "0"}
    assert {type(line["quantity"]) for order in orders for line in order["lines"]} == {int, str}
    assert len({id(order) for order in orders[:200]}) > DEMO_ORDER_COUNT // 2
