"""Log lines that machines read: one JSON object per line (docs/gateway.md#logs).

Every line is `{"time", "level", "logger", "event", ["worker"], ...fields}`; modules log
`log.info("handshake", extra={"result": "ok", ...})`: the message is the event name, the
`extra` fields follow it. Fields whose value is None are left out.

The formatter is python-json-logger's `JsonFormatter`: it stays a stdlib `logging.Formatter`, so
aiocoap's loggers (which log through stdlib logging) go through the same handler and come out
as the same JSON lines, and no call site needs another logger type (structlog would have
wrapped every logger and still needed a stdlib bridge for aiocoap).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# LogRecord attributes that are not fields ("taskName" is one from Python 3.12)
_SKIP = frozenset(RESERVED_ATTRS) | {"taskName", "message", "asctime"}


class LineFormatter(JsonFormatter):
    """One JSON object per record: time (ISO 8601, UTC), level, logger, event, worker, fields."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__(json_ensure_ascii=False)
        self.worker = worker

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        log_data["time"] = (datetime.fromtimestamp(record.created, timezone.utc)
                            .isoformat(timespec="milliseconds").replace("+00:00", "Z"))
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["event"] = record.message
        if self.worker is not None:
            log_data["worker"] = self.worker
        for key, value in record.__dict__.items():
            if key not in _SKIP and key not in log_data and value is not None:
                log_data[key] = value
        log_data.update(message_dict)       # exc_info / stack_info, when the record has them


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The JSON object `record` is written as (for tests and tools reading records in-process)."""
    return json.loads(LineFormatter().format(record))


def configure_logging(level: str = "INFO", worker: int | None = None, log_file: str | Path | None = None) -> None:
    """devid's loggers at `level`, every other logger (aiocoap) at WARNING, all through one
    handler: stderr, or `log_file` (appended to)."""
    if log_file is None:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    handler.setFormatter(LineFormatter(worker))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("devid").setLevel(level)
    logging.getLogger("devid.coap").setLevel(logging.WARNING)
