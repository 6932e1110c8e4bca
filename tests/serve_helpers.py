"""`devid serve` as a subprocess (optionally under strace) and a device that enrolls step by step
over the lean transport of benchmarks/loadgen.py with the device client's requests, for the
durability and disk-full tests."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_common  # noqa: E402
import loadgen  # noqa: E402
from devid.gateway.app.server import POLICY_FILE  # noqa: E402
from devid.gateway.device.identity import device_csr  # noqa: E402
from devid.gateway.device.protocol import CT_PKIX_CERT, EVIDENCE, NONCE, SEN, Endpoint  # noqa: E402
from devid.gateway.factory.provisioning import provision  # noqa: E402

from .conftest import NOW, free_port  # noqa: E402

FW = bench_common.bench_firmware()


def fleet(data, out: Path, count: int, prefix: str = "DU") -> list[Path]:
    """A policy that accepts the bench firmware, and `count` provisioned devices."""
    (data.path / POLICY_FILE).write_text(bench_common.bench_policy())
    reg = data.open_registry()
    try:
        provision(data.authority(reg), count=count, device_type=bench_common.DEVICE_TYPE, out=out,
                  serial_prefix=prefix, now=lambda: NOW, manufacturing_pem=data.cert_pem("manufacturing"),
                  root_pem=data.cert_pem("root"), workers=1)
    finally:
        reg.close()
    return sorted(p for p in out.iterdir() if p.name.startswith(prefix))


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def uri(self) -> str:
        return f"coaps://127.0.0.1:{self.port}"

    def gateway_pid(self) -> int:
        """The gateway's pid: the process started, or its child when it runs under strace."""
        if os.path.basename(self.proc.args[0]) != "strace":
            return self.proc.pid
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                            return int(entry)
                except OSError:
                    continue
        raise AssertionError("the gateway under strace is gone")

    def stop(self) -> int:
        """SIGTERM to the gateway (under strace: strace ends with it); its exit status. One that
        does not stop within a minute is killed, under strace too (not only strace)."""
        if self.proc.poll() is None:
            pid = self.gateway_pid()
            os.kill(pid, signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                for victim in {pid, self.proc.pid}:
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        return self.proc.wait(30)


def serve(data_dir: Path, log: Path, *, port: int | None = None, prefix: list[str] = (),
          workers: int = 1, env: dict | None = None, args: list = ()) -> Served:
    """Start `devid serve` (behind `prefix`, e.g. strace) and wait for its "listening" line."""
    port = port or free_port()
    e = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    e["DEVID_DATA"] = str(data_dir)
    e.update(env or {})
    proc = subprocess.Popen([*prefix, sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", str(workers), *map(str, args)], stdout=subprocess.PIPE, stderr=open(log, "ab"), env=e,
                            cwd=ROOT)
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise AssertionError(f"devid serve did not start: {line!r}\n{log.read_text()}")
    return Served(proc, port, log)


@contextmanager
def serving(data_dir: Path, log: Path):
    """`serve` for the length of a block: at its end the gateway must stop cleanly (exit 0) and
    its log hold no traceback."""
    served = serve(data_dir, log)
    try:
        yield served
    finally:
        assert served.stop() == 0
        assert "Traceback" not in log.read_text()


def evidence_token(dev: loadgen.Device, nonce: bytes) -> bytes:
    """Acceptable evidence (the bench firmware) for `nonce`, signed with the factory key."""
    return dev.identity.evidence(nonce, FW)


class Device:
    """One device's DTLS session, driven one request at a time."""

    def __init__(self, bundle: Path, uri: str) -> None:
        self.dev = loadgen.load_device(bundle)
        self.target = loadgen.Target.parse(uri)
        self.trust = loadgen.Trust(self.dev.root, self.target.host, full_chain=True)
        self.session: loadgen.Session | None = None

    async def connect(self, timeout: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        self.session = loadgen.Session(loop, self.target.peer, self.target.family, self.trust.context(self.dev),
                                       self.dev, self.trust, timeout)
        await self.session.connect(timeout)

    async def request(self, endpoint: Endpoint, payload: bytes = b"", timeout: float = 30.0):
        """The raw answer (not checked: the tests look at refusals too)."""
        return await self.session.request(endpoint.method, endpoint.options, payload, timeout)

    async def nonce(self):
        return await self.request(NONCE)

    async def evidence(self, nonce: bytes):
        return await self.request(EVIDENCE, evidence_token(self.dev, nonce))

    async def enroll(self, key):
        return await self.request(SEN[CT_PKIX_CERT], device_csr(key, self.dev.serial))

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


def problem(response) -> dict:
    import cbor2
    assert response.content_format == loadgen.CT_PROBLEM, response.code_text
    return cbor2.loads(response.payload)


# -- strace ------------------------------------------------------------------------------------------

@dataclass
class Call:
    index: int          # line where the call completed (its "resumed" line if it was interrupted)
    start: int          # line where it started
    pid: int
    time: float         # at its start
    name: str
    args: str
    result: str

    @property
    def fd_path(self) -> str | None:
        """The path strace -y shows for a call's first (file descriptor) argument."""
        m = re.match(r"\d+<(.*?)>", self.args)
        return m.group(1) if m else None

    @property
    def strings(self) -> list[str]:
        return re.findall(r'"((?:[^"\\]|\\.)*)"', self.args)


_LINE = re.compile(r"(\d+)\s+(\d+\.\d+)\s+(.*)$")
_FULL = re.compile(r"(\w+)\((.*)\)\s+=\s+(.*)$")
_UNFINISHED = re.compile(r"(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.*)$")


def strace_prefix(trace: Path, calls: str) -> list[str]:
    from .conftest import tool
    return [tool("strace"), "-f", "-y", "-qq", "-ttt", "-s", "4096", "-e", "signal=none", "-e", f"trace={calls}",
            "-o", str(trace)]


def parse_strace(trace: Path) -> list[Call]:
    pending: dict[int, tuple[int, float, str, str]] = {}
    calls: list[Call] = []
    for i, line in enumerate(trace.read_text(errors="replace").splitlines()):
        m = _LINE.match(line)
        if not m:
            continue
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if (r := _RESUMED.match(rest)) and pid in pending:
            start, t0, name, args = pending.pop(pid)
            calls.append(Call(i, start, pid, t0, name, args + r.group(2), r.group(3)))
        elif u := _UNFINISHED.match(rest):
            pending[pid] = (i, t, u.group(1), u.group(2))
        elif f := _FULL.match(rest):
            calls.append(Call(i, i, pid, t, f.group(1), f.group(2), f.group(3)))
    return sorted(calls, key=lambda c: c.index)
