"""Commands on the database: ``invoicer submit``, ``failed``, ``retry`` and ``rejected``."""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, BinaryIO, TextIO

from invoicer import processing
from invoicer.config import Config, load_processor
from invoicer.intake import recheck, refusal
from invoicer.orders import InvalidOrder
from invoicer.pipeline import failed_row, process_with_retries
from invoicer.processing import InvoiceRequest, demo_request, order_checker
from invoicer.storage import Row, Storage, StorageError, open_storage, submit_orders

EX_OK = 0
EX_STILL_FAILED = 1


def list_failed(config: Config, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the failed invoices: number, attempts, last error (or one JSON object per line)."""
    _print_rows(_read_shared(config, lambda storage: storage.failed()), ("invoice", "attempts", "error"),
                as_json, out)
    return EX_OK


def _read_shared(config: Config, read: Callable[[Any], list[Any]]) -> list[Any]:
    """Run ``read`` on the database opened read-only beside a running daemon."""
    storage = open_storage(config)
    storage.open_shared()
    try:
        return read(storage)
    finally:
        storage.close()


def _print_rows(rows: Iterable[Sequence[object]], names: Sequence[str], as_json: bool, out: TextIO) -> None:
    """Print rows tab-separated, or as one JSON object per line with ``names`` as keys."""
    for row in rows:
        if as_json:
            print(json.dumps(dict(zip(names, row, strict=True))), file=out)
        else:
            print("\t".join(map(str, row)), file=out)


def retry_failed(config: Config, ids: Sequence[int], out: TextIO = sys.stdout) -> int:
    """Process failed invoices again (all, or ``ids``); 0 if every one is now stored ok, else 1.

    Needs the daemon stopped: it takes the same one-instance lock, so the two never race on a row.
    """
    processor = load_processor(config.processor)
    processing.set_delay_ms(config.processing_delay_ms)
    storage = open_storage(config)
    try:
        storage.open_shared() if config.postgresql else storage.open()
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
        check = order_checker(processor)
        for invoice_id, _, _ in failed:
            row = _retry_one(storage, processor, check, invoice_id)
            storage.replace_failed(row)
            fixed += row[1] == "ok"
    finally:
        storage.close()
    print(f"retried {len(failed)} failed invoices: {fixed} now ok, {len(failed) - fixed} still failed",
          file=out)
    return EX_OK if fixed == len(failed) and not unknown else EX_STILL_FAILED


def _retry_one(storage: Storage, processor: Callable[[InvoiceRequest], object],
               check: Callable[..., dict[str, object]], number: int) -> Row:
    """Process invoice ``number`` again with its order (the demo order if it has none)."""
    paired = storage.order_of(number)
    if paired is None:
        return process_with_retries(processor, demo_request(number), "retry")
    order_id, payload = paired
    try:
        order = recheck(check, order_id, payload)
    except InvalidOrder as error:  # the check changed since: the invoice stays failed, saying why
        return failed_row(number, error, 0, order_id)
    return process_with_retries(processor, InvoiceRequest(number, order_id, order), "retry")


LINE_SLACK = 64   # bytes a submitted line may hold beyond its order: line end, BOM, spaces
EX_DATAERR = 65   # sysexits.h: the input data was incorrect
EX_NOINPUT = 66   # sysexits.h: the input file cannot be opened


class SubmitError(Exception):
    """A submission refused as a whole; the message is one line, ``exit_code`` the process's."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def read_orders(stream: BinaryIO, source: str, check: Callable[..., object],
                max_bytes: int) -> list[str]:
    """Check JSON lines (blank ones skipped); return the payloads, or raise SubmitError naming the line.

    A line is read up to the size limit only: an over-long one is refused before it takes the memory.
    A UTF-8 byte order mark before the first line is skipped.
    """
    payloads = []
    for number, raw in enumerate(_lines(stream, max_bytes), 1):
        if raw is None:
            raise SubmitError(f"{source}, line {number}: order is over the limit of {max_bytes:,} bytes",
                              EX_DATAERR)
        line = raw[len(codecs.BOM_UTF8):] if number == 1 and raw.startswith(codecs.BOM_UTF8) else raw
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise SubmitError(f"{source}, line {number}: not UTF-8 ({exc.reason} at byte {exc.start})",
                              EX_DATAERR) from None
        if not text:
            continue
        try:
            check(text, max_bytes=max_bytes)
        except Exception as exc:  # a broken check refuses the line, in one line
            raise SubmitError(f"{source}, line {number}: {refusal(exc)}", EX_DATAERR) from None
        payloads.append(text)
    return payloads


def _lines(stream: BinaryIO, max_bytes: int) -> Iterator[bytes | None]:
    """Yield the lines of ``stream``; None for one that cannot be an order of ``max_bytes``.

    Room is left for a line end, a byte order mark and some spaces around the order (the check judges
    the order itself); beyond that a line is not read further.
    """
    most = max_bytes + LINE_SLACK
    while line := stream.readline(most + 1):
        if len(line) > most:
            yield None
            return
        yield line


def submit(config: Config, path: str, out: TextIO = sys.stdout) -> int:
    """Submit the orders of a JSON-lines file (``-``: standard input) in one transaction; print the count."""
    check = order_checker(load_processor(config.processor))
    source = "standard input" if path == "-" else path
    try:
        if path == "-":
            if sys.stdin is None:  # started with standard input closed
                raise SubmitError("standard input is closed; name a FILE", EX_NOINPUT)
            payloads = read_orders(sys.stdin.buffer, source, check, config.order_max_bytes)
        else:
            with open(path, "rb") as file:
                payloads = read_orders(file, source, check, config.order_max_bytes)
    except OSError as exc:
        raise SubmitError(f"cannot read {source} ({exc.strerror or exc})", EX_NOINPUT) from None
    if not payloads:
        print(f"no orders in {source}: nothing submitted", file=out)
        return EX_OK
    if config.postgresql:
        from invoicer.storage import postgresql  # noqa: PLC0415  # psycopg is optional

        first, last = postgresql.submit_orders(config.postgresql, payloads)
    else:
        first, last = submit_orders(config.database, payloads)
    noun = "order" if len(payloads) == 1 else "orders"
    print(f"submitted {len(payloads)} {noun} (ids {first}..{last}) to {config.database_name}", file=out)
    return EX_OK


def list_rejected(config: Config, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print the orders rejected before numbering: id, submitted at, reason (or JSON lines)."""
    _print_rows(_read_shared(config, lambda storage: storage.rejected_orders()),
                ("order", "submitted_at", "reason"), as_json, out)
    return EX_OK
