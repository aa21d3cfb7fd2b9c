"""Processor plugins for the tests: well-behaved, failing, poisoned, garbage, hanging, down, C, subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

from invoicer.processing import Invoice, build_invoice


def echo(invoice_id: int) -> Invoice:
    """Build the sample invoice without any delay."""
    return build_invoice(invoice_id)


def poison_sevens(invoice_id: int) -> Invoice:
    """Fail every time for numbers divisible by 7 (poison invoices); build the rest."""
    if invoice_id % 7 == 0:
        raise ValueError(f"cannot process {invoice_id}")
    return build_invoice(invoice_id)


def garbage_for_fives(invoice_id: int) -> object:
    """Return something that is not an Invoice for numbers divisible by 5."""
    if invoice_id % 5 == 0:
        return {"id": invoice_id}
    return build_invoice(invoice_id)


_never = threading.Event()


def hang_after(invoice_id: int) -> Invoice:
    """Work normally up to $HANG_AFTER, then block forever (a stuck external call)."""
    if invoice_id > int(os.environ.get("HANG_AFTER", "100")):
        _never.wait()
    return build_invoice(invoice_id)


def _numbers(variable: str) -> frozenset[int]:
    return frozenset(int(part) for part in os.environ.get(variable, "").split(",") if part.strip())


_HANG_ON = _numbers("HANG_ON")


def hang_on(invoice_id: int) -> Invoice:
    """Block forever for the numbers in $HANG_ON (a call made without a timeout); build the rest."""
    if invoice_id in _HANG_ON:
        _never.wait()
    return build_invoice(invoice_id)


def hang_on_and_wait(invoice_id: int) -> Invoice:
    """Like hang_on, and wait $PROCESSING_S seconds for every other invoice (slow external calls)."""
    if invoice_id in _HANG_ON:
        _never.wait()
    time.sleep(float(os.environ.get("PROCESSING_S", "0.002")))
    return build_invoice(invoice_id)


def down_while_flagged(invoice_id: int) -> Invoice:
    """Raise ConnectionError while the file $OUTAGE_FLAG exists (the service is down), else wait 2 ms."""
    if os.path.exists(os.environ["OUTAGE_FLAG"]):
        raise ConnectionError("[Errno 111] Connection refused (the invoicing service is down)")
    time.sleep(0.002)
    return build_invoice(invoice_id)


_BLOCK = bytes(4 * 1024 * 1024)


def hash_4mib(invoice_id: int) -> Invoice:
    """Burn CPU in C with the GIL released: SHA-256 over 4 MiB, as a renderer or compressor would."""
    hashlib.sha256(_BLOCK).digest()
    return build_invoice(invoice_id)


def run_subprocess(invoice_id: int) -> Invoice:
    """Start a real subprocess per invoice (a PDF renderer would), and record the CPUs it may use."""
    allowed = subprocess.run(["/bin/sh", "-c", "grep Cpus_allowed_list /proc/self/status"],
                             capture_output=True, text=True, check=True).stdout.split()[-1]
    record = os.environ.get("SUBPROCESS_CPUS")
    if record:
        with open(record, "a", encoding="ascii") as out:
            out.write(f"{allowed}\n")
    return build_invoice(invoice_id)


def bad_range(invoice_id: int) -> Invoice:
    """Raise ValueError for the numbers in $BAD_FROM..$BAD_TO (a run of bad orders); build the rest."""
    if int(os.environ["BAD_FROM"]) <= invoice_id <= int(os.environ["BAD_TO"]):
        raise ValueError(f"order for {invoice_id} is malformed")
    return build_invoice(invoice_id)
