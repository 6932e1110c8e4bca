"""Every command has a --help, and every flag the docs show exists in it (docs cannot drift
from the command line)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
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


DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _documented_invocations() -> list[list[str]]:
    """Every `$ devid ...` line of the README, benchmarks/README.md and docs/, as arguments; an
    optional flag in brackets (`[--devices 200]`) counts as shown."""
    lines = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            m = re.match(r"\s*\$ (?:\.venv/bin/)?devid (.*)", line)
            if m:
                text = m.group(1).split("  #")[0].split(" # ")[0].rstrip("\\ ")
                text = re.sub(r"[\[\]|]", " ", text.split(" | ")[0])
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
    checked, bench = 0, 0
    helps: dict[tuple[str, ...], str] = {}
    for args in _documented_invocations():
        path = _command_of(args)
        if not path:
            continue
        text = helps.setdefault(path, _help(path))
        for flag in (a.split("=")[0] for a in args if a.startswith("--")):
            assert re.search(rf"{re.escape(flag)}\b", text), f"devid {' '.join(path)}: {flag} is documented, not in --help"
            checked += 1
            bench += path == ("bench",)
    assert checked > 30 and bench > 10          # devid bench's own flags are checked too


# flags this issue added or renamed: in --help, and shown in the docs
NEW_FLAGS = {("init",): ["--json"], ("ca", "cert"): ["--json"], ("ca", "sign-csr"): ["--json"],
             ("revoke",): ["--json"], ("crl",): ["--json"], ("provision",): ["--json"], ("renew",): ["--json"],
             ("demo",): ["--json"], ("bench",): ["--workdir", "--data", "--quiet", "--json"]}


@pytest.mark.parametrize("path", sorted(NEW_FLAGS), ids=" ".join)
def test_new_flags_are_in_help_and_documented(path):
    text = _help(path)
    docs = "\n".join(d.read_text() for d in DOCS)
    for flag in NEW_FLAGS[path]:
        assert re.search(rf"{re.escape(flag)}\b", text), f"devid {' '.join(path)}: {flag} not in --help"
        assert flag in docs
    assert "--json" in (ROOT / "docs" / "cli.md").read_text()


def test_every_data_command_documents_data():
    from devid.gateway.cli.device import is_device_path
    for path in COMMANDS:
        if is_device_path(path):
            assert "--data" not in _help(path), path
        elif path != ("bench",):
            assert "--data DIR" in _help(path) and "DEVID_DATA" in _help(path), path
    assert "with --gateway" in _help(("bench",))


def _repository_files() -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return set(files) | {Path(f).name for f in files}


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_cites_only_files_in_the_repository(path):
    """A file a command's help names (docs/cli.md, benchmarks/loadgen.py, bench_ab.py ...) is in
    the repository (issue 12, item 18: bench's help cited one that is not)."""
    files = _repository_files()
    text = re.sub(r"\s+", " ", _help(path))
    cited = set(re.findall(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w-]+\.(?:md|py|toml))\b", text))
    for name in cited:
        if name.startswith(("DATA/", "devid-data/")) or name in ("devid.toml", "attestation-policy.toml"):
            continue                                            # files of a data directory
        assert name in files, f"devid {' '.join(path)} --help cites {name}, which is not in the repository"


def test_every_serve_flag_in_the_gateway_docs_exists():
    table = (ROOT / "docs" / "gateway.md").read_text().split("## Flags", 1)[1].split("\n## ", 1)[0]
    flags = re.findall(r"^\| `(--[a-z0-9-]+)", table, flags=re.M)
    text = _help(("serve",))
    assert len(flags) > 10
    for flag in flags:
        assert re.search(rf"{re.escape(flag)}\b", text), flag
