"""Terminal output: aligned tables, a progress bar on stderr, timestamps, certificate serials as
openssl prints them, and the one JSON document of `--json` (docs/cli.md).

The `--json` convention: a command run with `--json` prints exactly one JSON document on stdout,
one line, compact, success or failure: an object with `"ok": true` and the command's result, or
`{"ok": false, "error": "...", ...}` with the same exit code as without `--json`. The error line
(`devid: error: ...`) still goes to stderr, and progress never goes to stdout."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime
from typing import Any, Sequence, TextIO

from cryptography import x509

from devid.ca.identity import fingerprint, format_serial
from devid.gateway.errors import GatewayError

__all__ = ["CommandFailed", "Progress", "cert_json", "emit", "format_serial", "positive_int", "table", "ts"]


def ts(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> Any:
    """NaN and infinities are not JSON: written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def emit(doc: dict, out: TextIO | None = None) -> None:
    """The one JSON document of a command run with --json: compact, one line, on stdout."""
    out = out or sys.stdout
    out.write(json.dumps(_finite(doc), allow_nan=False) + "\n")
    out.flush()


class CommandFailed(GatewayError):
    """A command that fails with a result to show: one error line on stderr (the message), and
    with --json the document {"ok": false, "error": message, **details}; exit status `code`."""

    def __init__(self, message: str, details: dict | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.details = details or {}
        self.code = code


def cert_json(cert: x509.Certificate) -> dict:
    """A certificate as the JSON documents show it: subject (RFC 4514), serial (as openssl
    prints it), SHA-256 fingerprint (lower-case hex), validity."""
    return {"subject": cert.subject.rfc4514_string(), "serial": format_serial(cert.serial_number),
            "sha256_fingerprint": fingerprint(cert), "not_before": ts(cert.not_valid_before_utc),
            "not_after": ts(cert.not_valid_after_utc)}


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO = sys.stdout) -> None:
    cells = [[str(c) for c in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


class Progress:
    """A one-line bar on a terminal; on a pipe or a log, a line every few seconds."""

    def __init__(self, label: str, stream: TextIO = sys.stderr, every: float = 5.0) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.every = every
        self._last = self.started

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.tty:
            width = 30
            filled = int(width * done / total) if total else width
            eta = (total - done) / rate if rate > 0 else 0.0
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                              f"{rate:,.0f}/s ETA {eta:4.1f}s")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        elif now - self._last >= self.every and done < total:
            self._last = now
            self.stream.write(f"{self.label}: {done}/{total} ({rate:,.0f}/s)\n")
            self.stream.flush()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (one clear error line otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value
