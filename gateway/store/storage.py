"""What a failed registry write says about the storage under it, and the one log line per burst.

A full disk (SQLITE_FULL, ENOSPC), a read-only database or file system (SQLITE_READONLY, EROFS)
and an I/O error are the operator's to fix, not a lock to wait for: they are told apart from a
busy database (SQLITE_BUSY / SQLITE_LOCKED) so that devices get "storage full" rather than
"registry busy", and the log gets one warning when writes start failing and one line when they
work again, not one per refused request. Nothing is kept open or retried: the next write after
space returns simply succeeds (SQLite rolls the failed transaction back).
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time
from typing import Callable

from devid.gateway.errors import RegistryError

FULL = "full"
READ_ONLY = "read-only"
FAILED = "unavailable"
BUSY = "busy"

# SQLite primary result codes (the low byte of an extended code)
_SQLITE_KINDS = {5: BUSY, 6: BUSY, 8: READ_ONLY, 10: FAILED, 13: FULL, 14: FAILED}
_ERRNO_KINDS = {errno.ENOSPC: FULL, errno.EDQUOT: FULL, errno.EROFS: READ_ONLY, errno.EIO: FAILED}


class StorageError(RegistryError):
    """A registry write or read failed for a reason of the storage under it (`kind`: FULL,
    READ_ONLY, FAILED or BUSY), with a message that names no secret. The PostgreSQL backend
    raises it for the server's errors of that kind (gateway/store/postgres.py); SQLite's are
    told apart by their result code instead."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Duplicate(RegistryError):
    """A unique key already held (PostgreSQL's unique_violation), naming the table; the
    registry turns it into its own errors as it does SQLite's IntegrityError."""

    def __init__(self, table: str | None) -> None:
        super().__init__(f"duplicate key in {table or 'the registry'}")
        self.table = table


def storage_kind(exc: BaseException) -> str | None:
    """FULL, READ_ONLY, FAILED or BUSY for a storage error, else None."""
    if isinstance(exc, StorageError):
        return exc.kind
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            return None
        return _SQLITE_KINDS.get(code & 0xFF)
    if isinstance(exc, OSError):
        return _ERRNO_KINDS.get(exc.errno)
    return None


class StorageHealth:
    """Tracks registry writes that fail for a storage reason (not BUSY). `failed` logs a warning
    when a burst starts (or its kind changes); `succeeded` logs once when writes work again,
    with how many were refused in between."""

    def __init__(self, log: logging.Logger, path: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.path = path
        self.clock = clock
        self.failing: str | None = None
        self.refused = 0
        self.since = 0.0

    def failed(self, kind: str, exc: BaseException) -> None:
        if kind == BUSY:
            return
        if kind != self.failing:
            self.failing, self.refused, self.since = kind, 0, self.clock()
            self.log.warning("storage", extra={"result": kind, "path": self.path, "error": str(exc),
                                               "effect": "requests that write are answered 5.03 until this clears"})
        self.refused += 1

    def succeeded(self) -> None:
        if self.failing is None:
            return
        self.log.warning("storage", extra={"result": "recovered", "path": self.path,
                                           "after": self.failing, "refused": self.refused,
                                           "seconds": round(self.clock() - self.since, 1)})
        self.failing = None
