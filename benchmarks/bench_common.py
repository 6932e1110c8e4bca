"""What the fleet benchmarks share, below all of them (bench_enroll, bench_clients, bench_hardening
and loadgen import it; it imports none of them): the bench firmware and policy, a `devid serve`
started for a run, and the CPU and memory counters of its processes read from /proc."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bench_cli
from devid.gateway.device.identity import Firmware

ROOT = Path(__file__).resolve().parent.parent

IMAGE = b"devid bench firmware 1.0.0\n"
FW_NAME, FW_VERSION = "bench-fw", "1.0.0"
DEVICE_TYPE = "bench-sensor"
POLICY = """version = 1
[device_types.{t}]
accept = "affirming"
[[device_types.{t}.firmware]]
name = "{name}"
version = "{version}"
digest = "sha-256:{digest}"
"""


def bench_firmware(digest_hex: str | None = None, name: str | None = None, version: str | None = None) -> Firmware:
    """The firmware the bench devices claim (the bench image, unless overridden)."""
    digest = bytes.fromhex(digest_hex) if digest_hex else hashlib.sha256(IMAGE).digest()
    return Firmware("sha-256", digest, name or FW_NAME, version or FW_VERSION)


def bench_policy() -> str:
    """An attestation policy that accepts the bench firmware for DEVICE_TYPE."""
    return POLICY.format(t=DEVICE_TYPE, name=FW_NAME, version=FW_VERSION, digest=hashlib.sha256(IMAGE).hexdigest())


# -- /proc counters ------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / ticks
        except OSError:
            pass
    return total


def peak_rss_kib(pids: list[int]) -> int:
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak


# -- the gateway of a run ------------------------------------------------------------------------------

@dataclass
class Served:
    """A `devid serve` started by the benchmark: its process, its URI, the pids whose CPU counts."""

    proc: subprocess.Popen
    uri: str
    pids: list[int]

    def stop(self) -> None:
        stop_process(self.proc)


def program(name: str) -> str | None:
    """An installed program's path (PATH, then /usr/sbin and /usr/bin), or None."""
    from devid.gateway.app.mosquitto import program as find
    return find(name)


def start_mosquitto(conf: Path, port: int, log: Path, wait: float = 30.0) -> subprocess.Popen:
    """Mosquitto on `conf` (as the mosquitto user when root: devid.gateway.app.mosquitto), back
    once it listens on `port`; RuntimeError with the log's tail if it does not."""
    from devid.gateway.app import mosquitto
    from devid.gateway.errors import ConfigError
    try:
        return mosquitto.start_mosquitto(conf, port, log, wait)
    except ConfigError as exc:
        raise RuntimeError(str(exc)) from None


def stop_process(proc: subprocess.Popen | None, grace: float = 30.0) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `grace` seconds; then reaped."""
    from devid.gateway.app.mosquitto import stop_process as stop
    stop(proc, grace)


def checkout_module(root: Path) -> tuple[str, str | None]:
    """How to run the CLI of the checkout at `root` (for `--server-root`, A/B runs against another
    checkout): the module, and a PYTHONPATH that makes it that checkout's. A checkout with the
    `devid` import root (its folders install as devid.gateway, devid.ca, devid.attestation) is
    reached through a directory `devid/` of links to its folders, which comes before this venv's
    editable install; an older one by its top-level `gateway` package, from its own directory."""
    if '"devid.gateway"' not in (root / "pyproject.toml").read_text():
        return "gateway.cli", None
    shim = Path(tempfile.mkdtemp(prefix="devid-checkout-")) / "devid"
    shim.mkdir()
    for name in ("gateway", "ca", "attestation"):
        (shim / name).symlink_to(root.resolve() / name, target_is_directory=True)
    return "devid.gateway.cli", str(shim.parent)


def start_gateway(data_path: Path, workers: int, server_root: Path, env: dict | None = None) -> Served:
    import bench_dtls
    port = bench_dtls.free_port()
    e = dict(os.environ, DEVID_DATA=str(data_path))
    e.update(env or {})
    flags = []
    cli_dir = server_root / "gateway" / "cli"
    sources = [*sorted(cli_dir.glob("*.py")), server_root / "gateway" / "cli.py"]
    if any("handshake_rate_per_address" in p.read_text() for p in sources if p.exists()):
        # every client is at 127.0.0.1: one address doing a fleet's handshakes (an older
        # --server-root has no per-address rate, and no such flag)
        flags = ["--handshake-burst-per-address", "1000000", "--handshake-rate-per-address", "1000000"]
    # a benchmark's extra serve flags (bench_metrics.py: the operator listener on one side only)
    flags += os.environ.get("DEVID_BENCH_SERVE_FLAGS", "").split()
    module, path = checkout_module(server_root)
    if path is not None:       # before a PYTHONPATH the caller gave (bench_scaling's --sql-cost)
        e["PYTHONPATH"] = os.pathsep.join([path, *([env["PYTHONPATH"]] if env and env.get("PYTHONPATH") else [])])
    bench_cli.REPORT.stage(f"starting devid serve --workers {workers} on 127.0.0.1:{port}"
                           + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", str(workers), "--log-level", "WARNING", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e, cwd=server_root)
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise SystemExit(f"devid serve did not start: {line}")
    pids = [proc.pid] + children(proc.pid) if workers > 1 else [proc.pid]
    return Served(proc, f"coaps://127.0.0.1:{port}", pids)


def bundle_dirs(directory: Path) -> list[str]:
    """The device bundles in a provisioning output directory (not its hidden entries)."""
    return sorted(str(p) for p in directory.iterdir() if not p.name.startswith(".") and p.is_dir())
