"""A processor plugin that also breaks the disk on demand: commits fail while $COMMIT_FAILS_FLAG exists.

Importing it (as the daemon does with INVOICER_PROCESSOR) wraps Storage.save_batch in this process only.
"""

from __future__ import annotations

import os
import time
from typing import Any

from invoicer.processing import Invoice, InvoiceRequest, build_invoice
from invoicer.storage import Storage, StorageError

_save_batch = Storage.save_batch


def _failing_save_batch(self: Storage, *args: Any, **kwargs: Any) -> None:
    if os.path.exists(os.environ["COMMIT_FAILS_FLAG"]):
        raise StorageError(f"database {self.path}: disk I/O error (injected by the test)")
    _save_batch(self, *args, **kwargs)


Storage.save_batch = _failing_save_batch  # type: ignore[method-assign]


def process(request: InvoiceRequest) -> Invoice:
    """Wait $PROCESSING_S seconds (so a drain lasts a while), then build the sample invoice."""
    invoice_id = request.number
    time.sleep(float(os.environ.get("PROCESSING_S", "0.05")))
    return build_invoice(invoice_id, request.order)
