"""SoftHSM2 tokens for the tests: one token directory for the whole session (SOFTHSM2_CONF is
set in this process's environment, so every `devid` subprocess sees the same tokens), a new
token per test, and pkcs11-tool as an independent reader of what a token holds."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _tool(name: str) -> str:
    for directory in ("/usr/bin", "/usr/local/bin"):
        if Path(directory, name).exists():
            return str(Path(directory, name))
    pytest.fail(f"required program {name!r} is not installed (run ./scripts/setup --test)")


@dataclass(frozen=True)
class TestToken:
    label: str
    pin: str
    so_pin: str

    @property
    def uri(self) -> str:
        """The token's RFC 7512 URI (no PIN in it: the tests pass it in $DEVID_PKCS11_PIN)."""
        return f"pkcs11:token={self.label}?module-path={MODULE}"

    @property
    def env(self) -> dict[str, str]:
        return {"DEVID_PKCS11_PIN": self.pin}

    def objects(self) -> str:
        """pkcs11-tool's listing of every object (logged in: private ones too)."""
        proc = subprocess.run([_tool("pkcs11-tool"), "--module", MODULE, "--token-label", self.label, "--login",
                               "--pin", self.pin, "--list-objects"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def private_keys(self) -> dict[str, str]:
        """label -> the 'Access:' line pkcs11-tool prints for each private key."""
        found, current = {}, None
        for line in self.objects().splitlines():
            if line.startswith("Private Key Object"):
                current = "?"
            elif re.match(r"\S", line):
                current = None
            elif current is not None and line.strip().startswith("label:"):
                current = line.split(":", 1)[1].strip()
            elif current is not None and line.strip().startswith("Access:"):
                found[current] = line.split(":", 1)[1].strip()
        return found


class SoftHSM:
    """A SoftHSM2 token directory for the test session."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="devid-softhsm-"))
        (self.root / "tokens").mkdir()
        self.conf = self.root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.root / 'tokens'}\nobjectstore.backend = file\n"
                             "log.level = ERROR\n")
        if not Path(MODULE).exists():
            pytest.fail(f"{MODULE} is missing: install Debian's softhsm2 (./scripts/setup --test)")

    def new_token(self, prefix: str = "t") -> TestToken:
        token = TestToken(f"{prefix}-{secrets.token_hex(4)}", secrets.token_hex(4), secrets.token_hex(6))
        proc = subprocess.run([_tool("softhsm2-util"), "--init-token", "--free", "--label", token.label,
                               "--so-pin", token.so_pin, "--pin", token.pin],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "SOFTHSM2_CONF": str(self.conf)})
        assert proc.returncode == 0, proc.stderr
        return token
