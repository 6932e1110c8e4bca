"""`devid serve --http` as a subprocess with enrolled devices, and HTTP requests to its operator
listener, for tests/test_operator*.py and tests/test_web*.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devid.gateway.app.datadir import DataDir
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.enroll import enroll
from devid.gateway.factory.provisioning import provision

from .conftest import NOW, free_port, run_devid
from .gateway_helpers import FW, POLICY

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    data: DataDir
    proc: subprocess.Popen
    port: int
    url: str
    log: Path
    factory: Path
    token: str = ""
    rest: str = ""              # stdout after the two "listening" lines, read at stop()
    enrolled: list[str] = field(default_factory=list)

    @property
    def coap(self) -> str:
        return f"coaps://127.0.0.1:{self.port}"

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(60)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait(30)
        finally:
            self.rest = self.proc.stdout.read().decode() if self.proc.poll() is not None else ""
            self.proc.stdout.close()


def make_fleet(root: Path, count: int = 7) -> tuple[DataDir, Path]:
    """A data directory with the test policy and `count` temperature sensors provisioned."""
    data = DataDir(root / "data")
    data.init(NOW, hostnames=["gw.example.net"])
    (data.path / POLICY_FILE).write_text(POLICY)
    out = root / "factory"
    reg = data.open_registry()
    try:
        provision(data.authority(reg), count=count, device_type="temperature-sensor", out=out, serial_prefix="TS",
                  now=lambda: NOW, manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  workers=1)
    finally:
        reg.close()
    return data, out


def start(data: DataDir, factory: Path, log: Path, *flags: str, workers: int = 1) -> Served:
    """`devid serve --http 127.0.0.1:0 FLAGS`; waits for both "listening" lines."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    with open(log, "ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                 "--workers", str(workers), "--http", "127.0.0.1:0", *flags], stdout=subprocess.PIPE,
                                stderr=err, env=env, cwd=ROOT)
    url = None
    for _ in range(2):
        line = proc.stdout.readline().decode()
        if "devid operator listening on " in line:
            url = line.split("listening on ", 1)[1].strip()
        elif "listening" not in line:
            proc.kill()
            raise AssertionError(f"devid serve did not start: {line!r}\n{log.read_text()}")
    assert url, "no operator listener line"
    served = Served(data, proc, port, url, log, factory)
    served.token = run_devid("operator", "token", data_dir=data.path, check=True).stdout.decode().strip()
    return served


def enroll_devices(served: Served, *serials: str) -> None:
    async def main():
        for serial in serials:
            await enroll(served.factory / serial, served.coap, FW)
    asyncio.run(main())
    served.enrolled += serials


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0]


def call(url: str, method: str = "GET", *, token: str | None = None, body: dict | bytes | None = None,
         content_type: str = "application/json", headers: dict | None = None,
         context: ssl.SSLContext | None = None) -> Answer:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h["Content-Type"] = content_type
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as resp:
            return Answer(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())
