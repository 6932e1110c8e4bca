"""Query parameters of the operator API and pages: durations ('30d'), page limits, cursors.

A cursor is opaque to the client: the key of the last row of the page, as base64url JSON. It
names a position in a total order, not an offset, so it stays valid while rows come and go."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_DURATION = timedelta(days=3650)
MAX_CURSOR = 256            # characters: a cursor this listener gives out is far shorter
_DURATION = re.compile(r"(\d{1,6})([smhdw]?)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}


class BadParameter(ValueError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


def duration(text: str, name: str = "duration") -> timedelta:
    """'30d', '12h', '90m', '3600s', '2w'; a bare number is days."""
    m = _DURATION.fullmatch(text.strip())
    if not m:
        raise BadParameter(name, f"{text!r} is not a duration (a number with s, m, h, d or w, e.g. 30d)")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds > MAX_DURATION.total_seconds():      # (a date that far ahead would not exist)
        raise BadParameter(name, f"{text!r} is longer than {MAX_DURATION.days} days")
    return timedelta(seconds=seconds)


def limit(text: str | None) -> int:
    if text is None or text == "":
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise BadParameter("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


def encode_cursor(key: list) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(text: str | None, shape: tuple[type, ...]) -> list | None:
    """The key a cursor holds, checked against the types the list's order needs; None: first page."""
    if text is None or text == "":
        return None
    if len(text) > MAX_CURSOR:
        raise BadParameter("cursor", "not a cursor this list gave out")
    try:
        key = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, TypeError, RecursionError):
        raise BadParameter("cursor", "not a cursor this list gave out") from None
    if (not isinstance(key, list) or len(key) != len(shape)
            or not all(isinstance(k, t) and not isinstance(k, bool) for k, t in zip(key, shape))):
        raise BadParameter("cursor", "not a cursor this list gave out")
    return key
