"""JSON logs on stdout, one object per line, with sd-daemon(3) ``<N>`` prefixes under journald."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

try:  # python-json-logger >= 3.1
    from pythonjsonlogger.json import JsonFormatter as _JsonFormatter
except ImportError:  # python-json-logger 2.x, as in Debian 12 (python3-pythonjsonlogger 2.0.1)
    from pythonjsonlogger.jsonlogger import JsonFormatter as _JsonFormatter  # type: ignore[no-redef,attr-defined,unused-ignore]

LOGGER_NAME = "invoicer"

# syslog(3) priorities for sd-daemon(3) prefixes, so `journalctl -p` filters by level.
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
               logging.DEBUG: 7}


def syslog_priority(levelno: int) -> int:
    """Map a logging level number to a syslog priority."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITIES[level]
    return _PRIORITIES[logging.DEBUG]


def is_journal_stream(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Tell whether ``stream`` is the journald stream systemd named in ``JOURNAL_STREAM`` (device:inode)."""
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(stream.fileno())
        return (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (ValueError, OSError, AttributeError):
        return False


class JsonLineFormatter(_JsonFormatter):  # type: ignore[misc,unused-ignore]  # untyped in 2.x
    """One JSON object per record: timestamp, level, logger, message, the extras, and any traceback."""

    def __init__(self, *, journal_prefix: bool = False) -> None:
        super().__init__("%(message)s", json_ensure_ascii=False)
        self._journal_prefix = journal_prefix

    def add_fields(self, log_record: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_record["timestamp"] = datetime.datetime.fromtimestamp(
            record.created, tz=datetime.UTC).isoformat(timespec="milliseconds")
        log_record["level"] = record.levelname
        log_record["logger"] = record.name
        super().add_fields(log_record, record, message_dict)

    def format(self, record: logging.LogRecord) -> str:
        line = str(super().format(record))
        if self._journal_prefix:
            return f"<{syslog_priority(record.levelno)}>{line}"
        return line


def configure_logging(level: str | int = "INFO", stream: TextIO | None = None,
                      env: Mapping[str, str] | None = None) -> logging.Logger:
    """Send the ``invoicer`` logger's records to ``stream`` (stdout) as JSON lines; return the logger."""
    stream = sys.stdout if stream is None else stream
    env = os.environ if env is None else env
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter(journal_prefix=is_journal_stream(stream, env)))
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return logger
