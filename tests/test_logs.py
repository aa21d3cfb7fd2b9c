"""JSON log lines: fields, tracebacks inside the record, sd-daemon priority prefixes under journald."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from invoicer import logs
from invoicer.logs import configure_logging, is_journal_stream, syslog_priority


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """Put the invoicer logger back as it was after each test."""
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_record_is_one_json_object_per_line() -> None:
    """A record with extras becomes one JSON line with timestamp, level, logger, message and the extras."""
    stream = io.StringIO()
    log = configure_logging("INFO", stream, env={})
    log.info("throughput", extra={"rate": 12.5, "workers": 8})
    log.debug("hidden at INFO")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["message"] == "throughput"
    assert (record["level"], record["logger"], record["rate"], record["workers"]) == ("INFO", "invoicer",
                                                                                       12.5, 8)
    assert record["timestamp"].endswith("+00:00")


def test_traceback_stays_inside_the_record() -> None:
    """An exception's traceback is a field of the one-line record, not extra lines."""
    stream = io.StringIO()
    log = configure_logging("INFO", stream, env={})
    try:
        raise ValueError("bad invoice")
    except ValueError:
        log.exception("invoice %d failed", 17, extra={"invoice": 17})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["invoice"] == 17
    assert "ValueError: bad invoice" in record["exc_info"]
    assert "Traceback" in record["exc_info"]


@pytest.mark.parametrize(("level", "priority"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3), (logging.CRITICAL, 2)])
def test_syslog_priority(level: int, priority: int) -> None:
    """Logging levels map to syslog priorities for journald."""
    assert syslog_priority(level) == priority


def test_journal_prefix_only_when_journal_stream_matches_stdout(tmp_path: Path) -> None:
    """With JOURNAL_STREAM naming the stream's device:inode, lines start with <N>; otherwise not."""
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        info = os.fstat(stream.fileno())
        matching = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert is_journal_stream(stream, matching)
        assert not is_journal_stream(stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino + 1}"})
        log = configure_logging("INFO", stream, env=matching)
        log.warning("disk almost full")
        configure_logging("INFO", stream, env={}).warning("plain")
    first, second = path.read_text().splitlines()
    assert first.startswith("<4>{")
    assert json.loads(first[3:])["message"] == "disk almost full"
    assert json.loads(second)["message"] == "plain"
