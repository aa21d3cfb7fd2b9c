"""Operator commands on the database: ``invoicer failed`` and ``invoicer retry``."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TextIO

from invoicer import processing
from invoicer.config import Config, load_processor
from invoicer.pipeline import process_with_retries
from invoicer.storage import Storage, StorageError

EX_OK = 0
EX_STILL_FAILED = 1


def list_failed(config: Config, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the failed invoices: number, attempts, last error (or one JSON object per line)."""
    storage = Storage(config.database)
    storage.open_shared()
    try:
        failed = storage.failed()
    finally:
        storage.close()
    for invoice_id, attempts, error in failed:
        if as_json:
            print(json.dumps({"invoice": invoice_id, "attempts": attempts, "error": error}), file=out)
        else:
            print(f"{invoice_id}\t{attempts}\t{error}", file=out)
    return EX_OK


def retry_failed(config: Config, ids: Sequence[int], out: TextIO = sys.stdout) -> int:
    """Process failed invoices again (all, or ``ids``); 0 if every one is now stored ok, else 1.

    Needs the daemon stopped: it takes the same one-instance lock, so the two never race on a row.
    """
    processor = load_processor(config.processor)
    processing.set_delay_ms(config.processing_delay_ms)
    storage = Storage(config.database)
    try:
        storage.open()
    except StorageError as exc:
        if "another invoicer instance" in str(exc):
            raise StorageError(f"{exc}; stop the daemon (systemctl stop invoicer) before "
                               "`invoicer retry`", exc.exit_code) from None
        raise
    try:
        failed = storage.failed(ids)
        unknown = sorted(set(ids) - {row[0] for row in failed})
        if unknown:
            print(f"not failed invoices (skipped): {', '.join(map(str, unknown))}", file=out)
        fixed = 0
        for invoice_id, _, _ in failed:
            row = process_with_retries(processor, invoice_id, "retry")
            storage.replace_failed(row)
            fixed += row[1] == "ok"
    finally:
        storage.close()
    print(f"retried {len(failed)} failed invoices: {fixed} now ok, {len(failed) - fixed} still failed",
          file=out)
    return EX_OK if fixed == len(failed) and not unknown else EX_STILL_FAILED
