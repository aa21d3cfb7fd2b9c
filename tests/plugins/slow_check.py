"""A processor whose order check is slow ($CHECK_S seconds an order): a claim holds its orders longer."""

from __future__ import annotations

import os
import time
from typing import Any

from invoicer.orders import check_order as _check_order
from invoicer.processing import Invoice, InvoiceRequest, build_invoice


def process(request: InvoiceRequest) -> Invoice:
    """Build the invoice of the request's order."""
    return build_invoice(request.number, request.order)


def _slow_check(payload: str, *, max_bytes: int) -> dict[str, Any]:
    time.sleep(float(os.environ.get("CHECK_S", "0.02")))
    return _check_order(payload, max_bytes=max_bytes)


process.check_order = _slow_check  # type: ignore[attr-defined]
