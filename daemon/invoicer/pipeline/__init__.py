"""The moving parts: the producer, the consumer pool and the storage writer, one module each.

Each owns its thread(s): built without side effects, ``start()`` starts, ``stop()`` asks to stop,
``join(timeout)`` waits. Invoice numbers travel through the bounded work queue in small chunks so the
per-invoice cost of queueing stays far below the cost of processing one invoice. This module holds what
they share: the part a consumer hands the writer, chunk sizing, and turning a processor's answer into a
row.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from invoicer.intake import weight_of
from invoicer.processing import Invoice, InvoiceRequest
from invoicer.storage import Batch, OkValues, Row
from invoicer.workqueue import Chunk

log = logging.getLogger("invoicer")

MAX_ATTEMPTS = 3
RETRY_BACKOFF_S = 0.05          # doubled after each failed attempt
MAX_CHUNK = 64                  # invoice numbers per work-queue item, at most
# ... and about this much processing: slow invoices travel one by one (docs/performance.md, "chunks").
CHUNK_TARGET_S = 0.05
WRITER_BATCH = 2048             # rows per transaction at most
POLL_S = 0.1                    # how often a blocked put re-checks its stop event
# Parts the results queue holds beyond two per worker: room for two full writer batches, so consumers
# do not block on it while the writer waits for the GIL between its SQLite calls.
RESULTS_ROOM = 2 * WRITER_BATCH // MAX_CHUNK
CPU_SAMPLE_EVERY = 4            # chunks per CPU-share sample for the concurrency gate
HANDOFF_S = 0.1                 # a consumer hands finished rows to the writer at least this often, so
                                # slow invoices still commit one by one

FatalHandler = Callable[[str, BaseException], None]


def max_chunk(queue_size: int) -> int:
    """Return the largest chunk for a queue of ``queue_size`` numbers: it still holds several chunks."""
    return max(1, min(MAX_CHUNK, queue_size // 8))


def chunk_for(invoice_seconds: float, largest: int) -> int:
    """Numbers per chunk so that one chunk is about CHUNK_TARGET_S of processing (1..largest).

    Small chunks keep the drain and the commit latency short when invoices are slow; large ones keep
    the queueing cost per invoice small when they are fast. Before any invoice has been timed, one
    number: an invoice could take a second, and a consumer would then hold a minute of work.
    """
    if invoice_seconds <= 0:
        return 1
    return max(1, min(largest, int(CHUNK_TARGET_S / invoice_seconds)))


@dataclasses.dataclass(frozen=True, slots=True)
class Part:
    """What a consumer hands the writer: ``numbers``, a slice of its chunk in order, and their rows.

    Every number gets a row in ``batch``: processed invoices as flat values, failed ones as full rows.
    """

    numbers: Chunk
    batch: Batch

    @property
    def weight(self) -> int:
        """Payload bytes its orders hold in the byte budget (0 for demo numbers)."""
        return weight_of(self.numbers)


WAKE_UP = Part(range(0), Batch())  # the empty part StorageWriter.stop() sends


def invoice_values(invoice_id: int, invoice: Any, attempts: int, order_id: int = 0) -> OkValues:
    """Check what a processor returned; return its OK_WIDTH stored values. ValueError if it is unusable.

    ``order_id`` is the order's id, 0 for a demo invoice (stored as NULL).
    """
    if not isinstance(invoice, Invoice):
        raise ValueError(f"processor returned {type(invoice).__name__}, expected Invoice")
    customer, currency, document = invoice.customer, invoice.currency, invoice.document
    subtotal, tax, total = invoice.subtotal, invoice.tax, invoice.total
    # One combined test on the hot path; the loop below only runs to name what is wrong.
    if not (invoice.id == invoice_id and type(customer) is str and type(currency) is str
            and type(document) is str and type(subtotal) is Decimal and type(tax) is Decimal
            and type(total) is Decimal):
        _explain_bad_invoice(invoice_id, invoice)
    return invoice_id, customer, currency, str(subtotal), str(tax), str(total), document, attempts, order_id


def invoice_row(invoice_id: int, invoice: Any, attempts: int, order_id: int | None = None) -> Row:
    """Check what a processor returned and turn it into a table row; ValueError if it is not usable."""
    number, customer, currency, subtotal, tax, total, document, _, _ = invoice_values(
        invoice_id, invoice, attempts)
    return number, "ok", customer, currency, subtotal, tax, total, document, None, attempts, order_id


def _explain_bad_invoice(invoice_id: int, invoice: Invoice) -> None:
    if invoice.id != invoice_id:
        raise ValueError(f"processor returned invoice {invoice.id!r} for number {invoice_id}")
    for name in ("customer", "currency", "document"):
        if not isinstance(getattr(invoice, name), str):
            raise ValueError(f"processor returned an Invoice whose {name} is not a str")
    for name in ("subtotal", "tax", "total"):
        if not isinstance(getattr(invoice, name), Decimal):
            raise ValueError(f"processor returned an Invoice whose {name} is not a Decimal")


def failed_row(invoice_id: int, exc: BaseException, attempts: int, order_id: int | None = None) -> Row:
    """Build the row that records an invoice which kept failing, so the numbering stays gap-free."""
    return (invoice_id, "failed", None, None, None, None, None, None,
            f"{type(exc).__name__}: {exc}"[:2000], attempts, order_id or None)


def process_with_retries(processor: Callable[[InvoiceRequest], Any], request: InvoiceRequest,
                         worker: int | str) -> Row:
    """Call the processor, retrying with backoff; an invoice that keeps failing becomes a failed row.

    For ``invoicer retry``, one invoice at a time with the daemon stopped; the daemon's consumers have
    their own loop, which also watches for outages and deadlines.
    """
    attempt = 1
    invoice_id = request.number
    while True:
        try:
            return invoice_row(invoice_id, processor(request), attempt, request.order_id)
        except Exception as exc:  # one bad invoice never kills the pool
            backoff = retry_backoff(invoice_id, exc, attempt, worker)
            if backoff is None:
                return failed_row(invoice_id, exc, attempt, request.order_id)
        time.sleep(backoff)
        attempt += 1


def retry_backoff(invoice_id: int, exc: Exception, attempt: int, worker: int | str) -> float | None:
    """Log a failed attempt; return how long to wait before the next one, or None if none is due."""
    context = {"invoice": invoice_id, "worker": worker, "attempt": attempt}
    if attempt >= MAX_ATTEMPTS:
        log.error("invoice %d failed %d times; stored as failed", invoice_id, attempt,
                  exc_info=exc, extra=context)
        return None
    log.warning("invoice %d failed (attempt %d of %d); retrying", invoice_id, attempt, MAX_ATTEMPTS,
                exc_info=exc, extra=context)
    return RETRY_BACKOFF_S * (1 << (attempt - 1))


from invoicer.pipeline.consumers import ConsumerPool  # noqa: E402  # they import the helpers above
from invoicer.pipeline.producer import Producer  # noqa: E402
from invoicer.pipeline.writer import StorageWriter  # noqa: E402

__all__ = [
    "MAX_ATTEMPTS", "RESULTS_ROOM", "WAKE_UP", "ConsumerPool", "FatalHandler", "Part", "Producer",
    "StorageWriter", "chunk_for", "failed_row", "invoice_row", "invoice_values", "max_chunk",
    "process_with_retries", "retry_backoff",
]
