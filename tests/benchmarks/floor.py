"""Processors for the orders benchmark's floor: the built-in one, with checks that cost less than its own.

Each payload is checked for real the first time it is seen; after that (the benchmark's backlog repeats
the demo source's 64 orders):

``shared``
    the check hands back the same parsed order again: what the claim, the pairing and the order ids
    cost, with no parsing, no checking and no new objects.
``fresh``
    the check hands back a new copy of the parsed order (``marshal.loads``, about 3 us here): what it
    costs only to give each invoice an order of its own, as any parser must, in any thread of the
    daemon.
"""

from __future__ import annotations

import marshal
from typing import Any

from invoicer.orders import check_order
from invoicer.processing import process as _process

_parsed: dict[str, dict[str, Any]] = {}
_copies: dict[str, bytes] = {}


def _shared_check(payload: str, *, max_bytes: int) -> dict[str, Any]:
    order = _parsed.get(payload)
    if order is None:
        order = _parsed[payload] = check_order(payload, max_bytes=max_bytes)
    return order


def _fresh_check(payload: str, *, max_bytes: int) -> dict[str, Any]:
    copy = _copies.get(payload)
    if copy is None:
        copy = _copies[payload] = marshal.dumps(check_order(payload, max_bytes=max_bytes))
    order: dict[str, Any] = marshal.loads(copy)  # noqa: S302  # our own bytes, made just above
    return order


def shared(request: Any) -> Any:
    """The built-in processor; its check returns the one parsed order per distinct payload."""
    return _process(request)


def fresh(request: Any) -> Any:
    """The built-in processor; its check returns a new copy of the parsed order each time."""
    return _process(request)


shared.check_order = _shared_check  # type: ignore[attr-defined]
fresh.check_order = _fresh_check  # type: ignore[attr-defined]
