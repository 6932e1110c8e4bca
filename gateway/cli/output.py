"""Terminal output: aligned tables, a progress bar on stderr, timestamps."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime
from typing import Sequence, TextIO


def ts(t: datetime | None) -> str:
    return "-" if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


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
