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
from pathlib import Path

import pytest

from .serve_helpers import bench_common


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        try:
            self.proc = bench_common.start_mosquitto(self.directory / "mosquitto.conf", self.port, self.log)
        except RuntimeError as exc:
            pytest.fail(str(exc))
        return self

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
