"""Every command has a --help, and every flag the docs show exists in it (docs cannot drift
from the command line)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from devid.gateway.cli.dispatch import build_parser

from .conftest import run_devid

ROOT = Path(__file__).parent.parent


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


COMMANDS = sorted(_commands(build_parser()))


def _help(path: tuple[str, ...]) -> str:
    if path == ("bench",):            # its own option parser (benchmarks/bench_enroll.py)
        proc = run_devid("bench", "--help")
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def test_the_command_tree_is_what_the_docs_describe():
    assert {" ".join(p) for p in COMMANDS} >= {
        "init", "ca cert", "ca sign-csr", "ca verify", "revoke", "crl", "devices list", "devices show",
        "provision", "serve", "enroll", "renew", "simulate", "bench", "demo", "attest log", "attest log rotate",
        "attest verify-log", "attest policy check"}


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path):
    text = _help(path)
    assert text.startswith("usage:") and ("--help" in text or path == ("bench",))


def _documented_invocations() -> list[list[str]]:
    """Every `$ devid ...` line of the README and docs/, as arguments."""
    lines = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            m = re.match(r"\s*\$ (?:\.venv/bin/)?devid (.*)", line)
            if m:
                text = m.group(1).split("  #")[0].split(" # ")[0].rstrip("\\ ")
                try:
                    lines.append(shlex.split(text))
                except ValueError:
                    continue
    return lines


def _command_of(args: list[str]) -> tuple[str, ...]:
    known = {p for p in COMMANDS}
    path: tuple[str, ...] = ()
    for word in args:
        if (*path, word) in known:
            path = (*path, word)
        elif not word.startswith("-"):
            continue
    return path


def test_every_flag_the_docs_show_exists():
    checked = 0
    for args in _documented_invocations():
        path = _command_of(args)
        if not path or path == ("bench",):
            continue
        text = _help(path)
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"devid {' '.join(path)}: {flag} is documented, not in --help"
            checked += 1
    assert checked > 30


def test_every_serve_flag_in_the_gateway_docs_exists():
    table = (ROOT / "docs" / "gateway.md").read_text().split("## Flags", 1)[1].split("\n## ", 1)[0]
    flags = re.findall(r"^\| `(--[a-z0-9-]+)", table, flags=re.M)
    text = _help(("serve",))
    assert len(flags) > 10
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", text), flag
