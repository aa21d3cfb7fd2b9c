"""The order format of the built-in processor: parse, validate, and make demo orders.

An order is one JSON object::

    {"customer": "Acme Corporation", "currency": "EUR", "reference": "PO-4711",
     "lines": [{"description": "Consulting hour", "quantity": 3, "unit_price": "120.00",
                "tax_rate": "0.19"}]}

``customer``
    string, 1 to 200 characters, not blank, no control characters.
``currency``
    three uppercase ASCII letters (ISO 4217 style, e.g. ``EUR``); amounts are always in 2 decimal places.
``lines``
    array of 1 to 10,000 objects with exactly these fields:
    ``description`` (string, 1 to 500 characters, not blank, no control characters);
    ``quantity`` (a JSON integer, or a decimal string, greater than 0, below 1,000,000,000,
    at most 6 decimal places); ``unit_price`` (a decimal string, 0 or more, below 1,000,000,000,
    at most 6 decimal places); ``tax_rate`` (a decimal string from 0 to 1, at most 6 decimal places:
    ``"0.19"`` is 19 %).
``reference`` (optional)
    string, 1 to 200 characters, no control characters: the submitter's own order number, copied into
    the invoice document.
``metadata`` (optional)
    any JSON object: passed to the processor untouched, not read by the built-in one, not copied.

A decimal string is ASCII digits with an optional ``.`` and more digits (``"12.50"``, ``"3"``): no sign,
exponent, spaces or ``,``. Money and rates must be strings: a JSON number is a binary float to most
parsers (Python's included), so ``0.1`` arrives as 0.1000000000000000055…; a string says exactly what the
submitter meant. Integer quantities are exact in JSON and may be numbers.

Unknown fields are refused, at the top level and in lines: the built-in processor would otherwise
silently drop a misspelt ``"referense"`` or a ``"discount"`` it does not understand from a legal document.
``metadata`` is the place for anything else. Duplicate field names are refused too: JSON leaves their
meaning open (Python keeps the last, other parsers the first), and a price must not depend on the parser.

:func:`check_order` is what the pipeline calls for each submitted payload: :func:`parse_order` (size,
JSON, nesting, NaN) then :func:`validate_order` (the fields above). Both raise :class:`InvalidOrder`
with a one-line message; field problems start with the field's path (``lines[3].unit_price: ...``).
"""

from __future__ import annotations

import json
import math
import re
from decimal import Decimal
from typing import Any

MAX_DEPTH = 16
"""Deepest nesting of arrays and objects in a payload (the format itself needs 3)."""
DEFAULT_MAX_ORDER_BYTES = 4 * 1024 * 1024
"""A sensible ``max_bytes``: 10,000 lines with long descriptions fit."""
MAX_LINES = 10_000
MAX_TEXT = {"customer": 200, "reference": 200, "description": 500}
"""Longest text, in characters, per field."""
AMOUNT_LIMIT = 1_000_000_000
"""Quantities and unit prices are below this, so that every product is exact (see invoicing.py)."""
DECIMAL_PLACES = 6
"""Most decimal places in a quantity, a unit price or a tax rate."""


class InvalidOrder(ValueError):  # noqa: N818  # the name the pipeline and plugins catch; reads as a verdict
    """A payload that is not a valid order; the message is one line naming the problem."""


_ORDER_REQUIRED = frozenset(("customer", "currency", "lines"))
_ORDER_FIELDS = _ORDER_REQUIRED | {"reference", "metadata"}
_LINE_FIELDS = frozenset(("description", "quantity", "unit_price", "tax_rate"))
# The fast path's accepted spellings; the slow path (_decimal_problem) says what is wrong otherwise.
_is_amount = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?").fullmatch
_is_rate = re.compile(r"0(?:\.[0-9]{1,6})?|1(?:\.0{1,6})?").fullmatch
_DECIMAL_SYNTAX = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_FORBIDDEN_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def _refuse_constant(name: str) -> Any:
    raise InvalidOrder(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise InvalidOrder(f"number {text[:40]} is out of range")
    return value


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise InvalidOrder(f"duplicate field {_show(name)} in an object")
            seen.add(name)
    return fields


# Decoders built once: json.loads() with hooks would build a new one per call. The strict one also
# refuses duplicate names, which costs a Python call per object; check_order() mostly does without it.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_unique_fields, parse_constant=_refuse_constant,
                                   parse_float=_finite_float)
_TOO_DEEP = f"order nests deeper than {MAX_DEPTH} levels of arrays and objects"


def parse_order(payload: str, *, max_bytes: int) -> dict[str, Any]:
    """Parse ``payload`` into a JSON object, refusing what no order can be.

    Refused with :class:`InvalidOrder`: more than ``max_bytes`` bytes of UTF-8, malformed JSON (with its
    position), anything but an object at the top, arrays and objects nested deeper than
    :data:`MAX_DEPTH`, ``NaN``/``Infinity`` and numbers beyond a float's range, duplicate field names.
    Absurd nesting never costs more than about a thousand levels of parsing: the parser stops at the
    interpreter's recursion limit and that is reported as too deep.
    """
    order = _decode(payload, max_bytes, _STRICT_DECODER)
    # There are at most as many levels as opening brackets (some may sit in strings), so a typical
    # order skips the walk; the walk stops at the first branch that is too deep.
    if payload.count("[") + payload.count("{") > MAX_DEPTH and _too_deep(order, MAX_DEPTH - 1):
        raise InvalidOrder(_TOO_DEEP)
    return order


def check_order(payload: str, *, max_bytes: int) -> dict[str, Any]:
    """Parse and validate one submitted payload; return the order the processor will receive.

    Refuses exactly what :func:`parse_order` then :func:`validate_order` refuse (a payload with several
    problems may have another one named first), at about half the cost of calling both.
    """
    order = _decode(payload, max_bytes, _DECODER)
    validate_order(order)
    # A valid order's own fields are 3 levels deep; only metadata can nest further.
    metadata = order.get("metadata")
    if metadata is not None and _too_deep(metadata, MAX_DEPTH - 2):
        raise InvalidOrder(_TOO_DEEP)
    # Each field name is followed by a colon, so a payload with no more colons than the order has
    # distinct names (4 per line) has no duplicate; otherwise the strict parse decides.
    if payload.count(":") != len(order) + 4 * len(order["lines"]):
        _decode(payload, max_bytes, _STRICT_DECODER)
    return order


def _decode(payload: str, max_bytes: int, decoder: json.JSONDecoder) -> dict[str, Any]:
    """Decode ``payload`` to a JSON object with ``decoder``, or raise InvalidOrder (parse_order)."""
    size = len(payload) if payload.isascii() else len(payload.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidOrder(f"order is {size:,} bytes, over the limit of {max_bytes:,} bytes")
    try:
        order = decoder.decode(payload)
    except InvalidOrder:
        raise
    except json.JSONDecodeError as exc:
        raise InvalidOrder(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidOrder(_TOO_DEEP) from None
    except ValueError:  # only int() is left: more digits than sys.get_int_max_str_digits()
        raise InvalidOrder("malformed JSON: an integer with too many digits") from None
    if type(order) is not dict:
        raise InvalidOrder(f"order must be a JSON object, not {_json_type(order)}")
    return order


def _too_deep(container: dict[str, Any] | list[Any], levels_left: int) -> bool:
    """Whether ``container`` holds arrays or objects more than ``levels_left`` levels further down."""
    for value in container.values() if type(container) is dict else container:
        if (type(value) is dict or type(value) is list) and (
                levels_left == 0 or _too_deep(value, levels_left - 1)):
            return True
    return False


def validate_order(order: dict[str, Any]) -> None:
    """Check that ``order`` is in the built-in processor's format (module docstring), else raise.

    The message of :class:`InvalidOrder` starts with the path of the first bad field, e.g.
    ``lines[3].unit_price: '12,50' is not a decimal amount ...``.
    """
    keys = order.keys()
    if not (keys >= _ORDER_REQUIRED and keys <= _ORDER_FIELDS):
        _field_problem("", keys, _ORDER_REQUIRED, _ORDER_FIELDS)
    customer = order["customer"]
    if not (type(customer) is str and 0 < len(customer) <= MAX_TEXT["customer"] and customer.isprintable()
            and not customer.isspace()):
        _check_text("customer", customer)
    currency = order["currency"]
    if not (type(currency) is str and len(currency) == 3 and currency.isascii() and currency.isalpha()
            and currency.isupper()):
        detail = _show(currency) if type(currency) is str else _json_type(currency)
        raise InvalidOrder(f"currency: {detail} is not three uppercase letters (ISO 4217, e.g. 'EUR')")
    if "reference" in order:
        reference = order["reference"]
        if not (type(reference) is str and 0 < len(reference) <= MAX_TEXT["reference"]
                and reference.isprintable() and not reference.isspace()):
            _check_text("reference", reference)
    if "metadata" in order and type(order["metadata"]) is not dict:
        raise InvalidOrder(f"metadata: must be an object, not {_json_type(order['metadata'])}")
    lines = order["lines"]
    if type(lines) is not list:
        raise InvalidOrder(f"lines: must be an array, not {_json_type(lines)}")
    if not lines:
        raise InvalidOrder("lines: empty (an order needs at least one line)")
    if len(lines) > MAX_LINES:
        raise InvalidOrder(f"lines: {len(lines):,} lines, over the limit of {MAX_LINES:,}")
    line_limit = MAX_TEXT["description"]
    for index, line in enumerate(lines):
        # One combined test for the common case; _check_line names the problem otherwise.
        if type(line) is dict and line.keys() == _LINE_FIELDS:
            description = line["description"]
            quantity = line["quantity"]
            price = line["unit_price"]
            rate = line["tax_rate"]
            if (((type(quantity) is int and 0 < quantity < AMOUNT_LIMIT)
                 or (type(quantity) is str and _is_amount(quantity) and quantity.strip("0.")))
                    and type(description) is str and 0 < len(description) <= line_limit
                    and description.isprintable() and not description.isspace()
                    and type(price) is str and _is_amount(price) and type(rate) is str and _is_rate(rate)):
                continue
        _check_line(f"lines[{index}]", line)


def _check_line(path: str, line: object) -> None:
    """Raise InvalidOrder naming the first problem of ``line``; return if it is valid after all."""
    if type(line) is not dict:
        raise InvalidOrder(f"{path}: must be an object, not {_json_type(line)}")
    _field_problem(path, line.keys(), _LINE_FIELDS, _LINE_FIELDS)
    _check_text(f"{path}.description", line["description"], MAX_TEXT["description"])
    quantity = line["quantity"]
    if type(quantity) is int:
        if not 0 < quantity < AMOUNT_LIMIT:
            problem = "is not positive" if quantity <= 0 else f"is {AMOUNT_LIMIT:,} or more"
            raise InvalidOrder(f"{path}.quantity: {quantity} {problem}")
    else:
        _check_decimal(f"{path}.quantity", quantity, "quantity", positive=True)
    _check_decimal(f"{path}.unit_price", line["unit_price"], "amount")
    _check_decimal(f"{path}.tax_rate", line["tax_rate"], "rate")


def _check_decimal(path: str, value: object, kind: str, *, positive: bool = False) -> None:
    """Raise InvalidOrder if ``value`` is not a decimal string within the limits of ``kind``."""
    if type(value) is not str:
        allowed = "an integer or a decimal string" if kind == "quantity" else "a string"
        reason = ": JSON numbers are binary floats, write the exact decimal" if type(value) is float else ""
        raise InvalidOrder(f"{path}: must be {allowed} (e.g. '12.50'), not {_json_type(value)}{reason}")
    shown = _show(value)
    if not _DECIMAL_SYNTAX.fullmatch(value):
        raise InvalidOrder(f"{path}: {shown} is not a decimal {kind} (digits with an optional '.', "
                           "e.g. '12.50')")
    if value.startswith("-") or (positive and not value.strip("0.")):
        raise InvalidOrder(f"{path}: {shown} is {'not positive' if positive else 'negative'}")
    if len(value.partition(".")[2]) > DECIMAL_PLACES:
        raise InvalidOrder(f"{path}: {shown} has more than {DECIMAL_PLACES} decimal places")
    if kind == "rate" and Decimal(value) > 1:
        raise InvalidOrder(f"{path}: {shown} is over 1 (a rate is a fraction: '0.19' is 19 %)")
    if Decimal(value) >= AMOUNT_LIMIT:
        raise InvalidOrder(f"{path}: {shown} is {AMOUNT_LIMIT:,} or more")


def _check_text(path: str, value: object, limit: int | None = None) -> None:
    """Raise InvalidOrder unless ``value`` is a non-blank string within its limit, without controls."""
    limit = MAX_TEXT[path] if limit is None else limit
    if type(value) is not str:
        raise InvalidOrder(f"{path}: must be a string, not {_json_type(value)}")
    if not value or value.isspace():
        raise InvalidOrder(f"{path}: is blank")
    if len(value) > limit:
        raise InvalidOrder(f"{path}: {len(value):,} characters, over the limit of {limit:,}")
    forbidden = _FORBIDDEN_CHARACTER.search(value)
    if forbidden:
        raise InvalidOrder(f"{path}: contains the control character U+{ord(forbidden.group()):04X}")


def _field_problem(path: str, keys: Any, required: frozenset[str], allowed: frozenset[str]) -> None:
    """Raise InvalidOrder for the first missing or unknown field name, in a stable order."""
    prefix = f"{path}: " if path else ""
    missing = sorted(required - keys)
    if missing:
        raise InvalidOrder(f"{prefix}missing field {_show(missing[0])}")
    unknown = sorted(keys - allowed)
    if unknown:
        allowed_names = ", ".join(sorted(allowed))
        raise InvalidOrder(f"{prefix}unknown field {_show(unknown[0])} (allowed: {allowed_names})")


def demo_order(number: int) -> dict[str, Any]:
    """Return the synthetic order for invoice ``number`` (the demo source): deterministic, valid, shared.

    One of :data:`DEMO_ORDER_COUNT` orders built at import, chosen by a multiplicative hash of the
    number, so that consecutive numbers get varied customers, 1 to 5 lines and the three rates. The same
    dict is returned for many numbers: like every order a processor receives, it must not be changed.
    """
    return _DEMO_ORDERS[(number * 0x9E3779B1 & 0xFFFFFFFF) >> _DEMO_SHIFT]


DEMO_ORDER_COUNT = 64
_DEMO_SHIFT = 32 - DEMO_ORDER_COUNT.bit_length() + 1
_DEMO_CUSTOMERS = (
    "Acme Corporation", "Globex GmbH", "Initech Ltd", "Umbrella SA", "Stark Industries",
    "Wayne Enterprises", "Hooli Inc", "Vandelay Industries", "Soylent BV", "Tyrell Oy",
)
_DEMO_PRODUCTS = (  # description, unit price, whether it is sold in fractions (hours, days)
    ("Consulting hour", "120.00", True), ("Support plan", "49.90", False), ("Licence seat", "15.00", False),
    ("Training day", "890.00", True), ("Hosting month", "23.75", False), ("Audit", "1450.00", False),
    ("Integration", "310.40", False), ("Spare part", "7.35", False), ("Storage TB-month", "23.0450", True),
)
_DEMO_RATES = ("0.19", "0.07", "0")


def _demo_orders() -> tuple[dict[str, Any], ...]:
    orders = []
    for index in range(DEMO_ORDER_COUNT):
        seed = index * 0x2545F4914F6CDD1D + 0x9E3779B97F4A7C15  # spread the table's bits
        lines = []
        for position in range(1 + index % 5):
            product = _DEMO_PRODUCTS[(seed >> (8 * position + 3)) % len(_DEMO_PRODUCTS)]
            description, price, fractional = product
            count = 1 + (seed >> (8 * position + 40)) % 9
            lines.append({"description": description,
                          "quantity": f"{count / 2:.1f}" if fractional else count, "unit_price": price,
                          "tax_rate": _DEMO_RATES[(index + position) % len(_DEMO_RATES)]})
        customer = _DEMO_CUSTOMERS[(seed >> 20) % len(_DEMO_CUSTOMERS)]
        order: dict[str, Any] = {"customer": customer, "currency": "EUR", "lines": lines}
        if index % 3 == 0:
            order["reference"] = f"DEMO-{index:04d}"
        orders.append(order)
    return tuple(orders)


_DEMO_ORDERS = _demo_orders()


def _json_type(value: object) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _show(value: str) -> str:
    """Quote ``value`` for a message: its repr, cut short, so that the message stays one line."""
    return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
