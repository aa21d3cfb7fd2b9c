"""A processor plugin that pauses its own process (SIGSTOP) at a chosen point of a PostgreSQL commit.

Importing it (as the daemon does with INVOICER_PROCESSOR) wraps, in this process only, the point named
by $PAUSE_AT: ``before-commit`` (outside any transaction) or ``in-copy`` (inside the commit's
transaction, after the fence locked its blocks, while the server waits for COPY data). It pauses once,
when $PAUSE_FLAG exists (and removes it): a real pause, which only a real SIGCONT ends.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import psycopg

from invoicer.processing import Invoice, InvoiceRequest, build_invoice
from invoicer.storage.postgresql import PostgresLedger


def _pause_if_asked(where: str) -> None:
    flag = os.environ.get("PAUSE_FLAG", "")
    if os.environ.get("PAUSE_AT") == where and flag and os.path.exists(flag):
        os.unlink(flag)
        os.kill(os.getpid(), signal.SIGSTOP)


_commit = PostgresLedger._commit


def _commit_pausing_first(self: PostgresLedger, *args: Any) -> None:
    _pause_if_asked("before-commit")
    _commit(self, *args)


_write = psycopg.Copy.write


def _write_pausing_first(self: psycopg.Copy, buffer: Any) -> None:
    _pause_if_asked("in-copy")
    _write(self, buffer)


PostgresLedger._commit = _commit_pausing_first  # type: ignore[method-assign,assignment]
psycopg.Copy.write = _write_pausing_first  # type: ignore[method-assign]


def process(request: InvoiceRequest) -> Invoice:
    """Build the invoice of the request's order (the demo order for demo numbers)."""
    return build_invoice(request.number, request.order)
