"""What every command group shares: the parser that errs in one line, a hidden deprecated flag,
the data directory named by --data, input and output files, the clock."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from devid.gateway.app.datadir import DataDir, resolve_data_dir
from devid.gateway.cli import output
from devid.gateway.errors import CLIError
from devid.gateway.system.fs import write_atomic


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Parser(argparse.ArgumentParser):
    """Errs in one line, not usage + error; with --json on the command line (`json_errors`, set
    by `dispatch.main` before parsing) also as the JSON document of a failure."""

    json_errors = False

    def error(self, message: str) -> None:
        line = f"{message} (see '{self.prog} --help')"
        sys.stderr.write(f"{self.prog}: error: {line}\n")
        if Parser.json_errors:
            output.emit({"ok": False, "error": line})
        raise SystemExit(2)


def wants_json(argv: list[str]) -> bool:
    """--json among the options (before a `--`)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


class Deprecated(argparse.Action):
    """A hidden old name of a flag: stores into the new one's dest, with a warning on stderr."""

    def __init__(self, option_strings, dest, new: str, **kw) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stderr.write(f"devid: warning: {option_string} is deprecated, use {self.new}\n")
        setattr(namespace, self.dest, values)


def data_dir(args) -> DataDir:
    return DataDir(resolve_data_dir(args.data))


def read_input(path: str, what: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path}: {exc.strerror}") from None


def write_output(path: str | None, data: bytes) -> None:
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror}") from None
