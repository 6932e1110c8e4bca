"""Shared by tests/test_agent*.py: a running gateway with enrolled devices, the agent as a
subprocess, its JSON log lines, and a UDP relay that breaks the path between device and gateway."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.identity import load_bundle

from .conftest import free_port, ok, run_devid
from .gateway_helpers import FW
from .serve_helpers import serve

FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]
OP_FILES = ("op-key.pem", "op-cert.pem", "op-chain.pem", "config.cbor")


def policy(validity_days: int, threshold_days: int) -> str:
    return f"""
version = 1
[device_types.temperature-sensor]
certificate_validity_days = {validity_days}
renewal_threshold_days = {threshold_days}
[[device_types.temperature-sensor.firmware]]
name = "{FW.name}"
version = "{FW.version}"
digest = "sha-256:{FW.digest.hex()}"
"""


def files(bundle: Path) -> dict[str, bytes]:
    return {name: (bundle / name).read_bytes() for name in OP_FILES}


def certificate(bundle: Path) -> x509.Certificate:
    leaf, _, key, _ = load_bundle(bundle, "op-chain.pem", "op-key.pem")     # usable: the key matches
    return leaf


def validity(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def agent(uri: str, bundle: Path, *extra) -> subprocess.CompletedProcess:
    return run_devid("agent", "--gateway", uri, "--device", bundle, "--timeout", "5", *extra)


def wait_for(predicate, what: str, deadline: float = 90.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def log_lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def events(path: Path, name: str) -> list[dict]:
    return [line for line in log_lines(path) if line.get("event") == name]


@contextmanager
def enrolled_gateway(data, bundles, tmp_path):
    """Three temperature sensors enrolled at a running gateway whose policy gives their type 40-day
    certificates and a 12-day renewal threshold."""
    (data.path / POLICY_FILE).write_text(policy(40, 12))
    port = free_port()
    served = serve(data.path, tmp_path / "serve.log", port=port)
    try:
        ok(run_devid("simulate", "--gateway", served.uri, "--devices", bundles, "--timeout", "20", *FIRMWARE))
        yield data, bundles, served
    finally:
        assert served.stop() == 0
        assert "Traceback" not in (tmp_path / "serve.log").read_text()


class Relay:
    """A UDP relay on loopback in front of the gateway: it passes the DTLS handshake and, from the
    first application-data record the device sends (the renewal request), drops everything: a
    gateway that vanished between the handshake and its answer."""

    cut_requests = True       # after the cut, the device's datagrams are dropped too (False: passed on)

    def __init__(self, gateway_port: int) -> None:
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", gateway_port))
        self.port = self.front.getsockname()[1]
        self.cut = threading.Event()
        self.handshake_records = 0
        self.client = None
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._forward, daemon=True),
                        threading.Thread(target=self._backward, daemon=True)]
        for sock in (self.front, self.back):
            sock.settimeout(0.2)
        for t in self.threads:
            t.start()

    def _forward(self) -> None:
        while not self._stop.is_set():
            try:
                data, self.client = self.front.recvfrom(65536)
            except (socket.timeout, OSError):
                continue
            if data[:1] == b"\x17":               # DTLS content type 23: application data
                self.cut.set()
            if self.cut.is_set() and self.cut_requests:
                continue
            self.handshake_records += 1
            self.back.send(data)

    def _backward(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.back.recv(65536)
            except (socket.timeout, OSError):
                continue
            if not self.cut.is_set() and self.client is not None:
                self.front.sendto(data, self.client)

    def close(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(5)
        self.front.close()
        self.back.close()
