"""Processor plugins for the tests: well-behaved, failing, poisoned, garbage, hanging, down, C, subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

from invoicer.processing import Invoice, InvoiceRequest, build_invoice


def echo(request: InvoiceRequest) -> Invoice:
    """Build the sample invoice without any delay."""
    invoice_id = request.number
    return build_invoice(invoice_id, request.order)


def poison_sevens(request: InvoiceRequest) -> Invoice:
    """Fail every time for numbers divisible by 7 (poison invoices); build the rest."""
    invoice_id = request.number
    if invoice_id % 7 == 0:
        raise ValueError(f"cannot process {invoice_id}")
    return build_invoice(invoice_id, request.order)


def garbage_for_fives(request: InvoiceRequest) -> object:
    """Return something that is not an Invoice for numbers divisible by 5."""
    invoice_id = request.number
    if invoice_id % 5 == 0:
        return {"id": invoice_id}
    return build_invoice(invoice_id, request.order)


_never = threading.Event()


def hang_after(request: InvoiceRequest) -> Invoice:
    """Work normally up to $HANG_AFTER, then block forever (a stuck external call)."""
    invoice_id = request.number
    if invoice_id > int(os.environ.get("HANG_AFTER", "100")):
        _never.wait()
    return build_invoice(invoice_id, request.order)


def _numbers(variable: str) -> frozenset[int]:
    return frozenset(int(part) for part in os.environ.get(variable, "").split(",") if part.strip())


_HANG_ON = _numbers("HANG_ON")


def hang_on(request: InvoiceRequest) -> Invoice:
    """Block forever for the numbers in $HANG_ON (a call made without a timeout); build the rest."""
    invoice_id = request.number
    if invoice_id in _HANG_ON:
        _never.wait()
    return build_invoice(invoice_id, request.order)


def hang_on_and_wait(request: InvoiceRequest) -> Invoice:
    """Like hang_on, and wait $PROCESSING_S seconds for every other invoice (slow external calls)."""
    invoice_id = request.number
    if invoice_id in _HANG_ON:
        _never.wait()
    time.sleep(float(os.environ.get("PROCESSING_S", "0.002")))
    return build_invoice(invoice_id, request.order)


def down_while_flagged(request: InvoiceRequest) -> Invoice:
    """Raise ConnectionError while the file $OUTAGE_FLAG exists (the service is down), else wait 2 ms."""
    invoice_id = request.number
    if os.path.exists(os.environ["OUTAGE_FLAG"]):
        raise ConnectionError("[Errno 111] Connection refused (the invoicing service is down)")
    time.sleep(0.002)
    return build_invoice(invoice_id, request.order)


_BLOCK = bytes(4 * 1024 * 1024)


def hash_4mib(request: InvoiceRequest) -> Invoice:
    """Burn CPU in C with the GIL released: SHA-256 over 4 MiB, as a renderer or compressor would."""
    invoice_id = request.number
    hashlib.sha256(_BLOCK).digest()
    return build_invoice(invoice_id, request.order)


def run_subprocess(request: InvoiceRequest) -> Invoice:
    """Start a real subprocess per invoice (a PDF renderer would), and record the CPUs it may use."""
    invoice_id = request.number
    allowed = subprocess.run(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
    record = os.environ.get("SUBPROCESS_CPUS")
    if record:
        with open(record, "a", encoding="ascii") as out:
            out.write(f"{allowed}\n")
    return build_invoice(invoice_id, request.order)


def bad_range(request: InvoiceRequest) -> Invoice:
    """Raise ValueError for the numbers in $BAD_FROM..$BAD_TO (a run of bad orders); build the rest."""
    invoice_id = request.number
    if int(os.environ["BAD_FROM"]) <= invoice_id <= int(os.environ["BAD_TO"]):
        raise ValueError(f"order for {invoice_id} is malformed")
    return build_invoice(invoice_id, request.order)
