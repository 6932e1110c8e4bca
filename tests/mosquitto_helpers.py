"""A real Mosquitto broker for the tests: started by a fixture as the `mosquitto` user (setpriv,
in the foreground, so the pid is the broker's), on a free loopback port, from the files
`devid mqtt broker-config` writes; reloaded with SIGHUP; stopped at the end. A broker that does
not start fails the test, never skips it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from .serve_helpers import bench_common


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(name: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    pytest.fail(f"required program {name!r} is not installed (run ./scripts/setup --test)")


class Mosquitto:
    """One broker process on `directory`/mosquitto.conf (a directory outside pytest's 0700 tmp,
    which the mosquitto user could not enter)."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="devid-mosquitto-"))
        os.chmod(self.directory, 0o755)
        self.port = free_tcp_port()
        self.log = self.directory / "broker.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        cmd = [_program("setpriv"), "--reuid=mosquitto", "--regid=mosquitto", "--init-groups",
               _program("mosquitto"), "-c", str(self.directory / "mosquitto.conf")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        pytest.fail(f"mosquitto did not listen on {self.port} within 30 s: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def reloads(self) -> int:
        """How many times the broker has reloaded its configuration so far (its log says so)."""
        return self.log.read_text(errors="replace").count("Reloading config")

    def stop(self) -> None:
        bench_common.stop_process(self.proc)
        shutil.rmtree(self.directory, ignore_errors=True)
