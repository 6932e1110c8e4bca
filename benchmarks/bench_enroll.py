#!/usr/bin/env python3
"""Fleet enrollment benchmark (`devid bench`): the full zero-touch flow against a real gateway.

    devid bench [--devices 200] [--concurrency 16] [--clients 2] [--workers N] [--renew]
                [--client lean|script] [--workdir DIR] [--no-baselines] [--quiet | --json]
    devid [--data DIR] bench --gateway coaps://HOST:PORT [--data DIR] ...   against a running gateway
    devid bench --durability [--rounds 2] [--devices N ...]    the cost of durable commits
    devid bench --flood [--rounds 2] [--devices N ...]         enrollment latency under a nonce flood

Starts `devid serve --workers N` on loopback with a CA of its own (in --workdir, by default a
temporary directory removed afterwards), provisions the devices, and runs each through the
zero-touch flow (nonce, signed evidence, EST /sen, configuration, in one DTLS session) with C
devices in flight from client processes separate from the server. With --gateway it targets a
running gateway instead and provisions the devices into that gateway's data directory: --data
DIR, as for every devid command (default: $DEVID_DATA, else ./devid-data); --data means nothing
else here and needs --gateway. `--client lean` (default) is benchmarks/loadgen.py: the same
protocol and checks on the sans-I/O DTLS engine with a small CoAP codec, so the client costs a
few ms of CPU per enrollment; `--client script` runs the field engineer's script per device
(gateway/device/simulator.py, 16-30 ms of client CPU each, which caps the rate on a small
machine).

Progress goes to stderr: each stage as it starts, and how many devices are done (counted in the
registry once a second); --quiet or --json silence it. The result is one JSON document on
stdout (docs/cli.md), with "ok" false and "error" when an enrollment failed:

  enrollments/s, latency p50/p95/p99 end to end and per step (connect = the DTLS handshake),
  server CPU per enrollment (from the server processes' own counters), client CPU per
  enrollment (process time of the client processes over the timed part), peak RSS of the
  server processes,
  errors (must be 0), and, in the same run, two baselines:
    libcoap   coap-server-openssl in PKI mode: DTLS handshake + one GET, rate and server CPU
    crypto    the cryptographic operations one attested enrollment needs on the server
              (2 ECDSA signs, 5 verifies, 1 key generation, 1 ECDH), timed with
              `cryptography` alone: the floor.

`--durability` and `--flood` replace the plain run with the two measurements of issue 10
(benchmarks/bench_hardening.py): server CPU per enrollment with and without durable commits,
and the p95 of well-behaved enrollments with and without another identity flooding nonce
requests, each side by side in alternating rounds of one run. benchmarks/README.md has the
figures and how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_cli  # noqa: E402


def _report() -> bench_cli.Reporter:
    """The progress reporter main() set up (quiet when run otherwise, e.g. by bench_ab.py)."""
    return bench_cli.REPORT

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


def _children(pid: int) -> list[int]:
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


def _cpu(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / ticks
        except OSError:
            pass
    return total


def _hwm_kib(pids: list[int]) -> int:
    peak = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except OSError:
            pass
    return peak


def _client(gateway: str, bundles: list[str], concurrency: int, renew: bool, q, go) -> None:
    """--client script: the field engineer's script per device (gateway/device/simulator.py)."""
    from devid.gateway.device.enroll import Firmware
    from devid.gateway.device.simulator import simulate
    fw = Firmware("sha-256", hashlib.sha256(IMAGE).digest(), FW_NAME, FW_VERSION)
    q.put(("ready", None))
    go.wait()
    cpu0 = time.process_time()
    report = asyncio.run(simulate(gateway, [Path(b) for b in bundles], lambda b: fw, concurrency=concurrency,
                                  renew_only=renew))
    q.put(("done", {"latencies": report.latencies, "failures": report.failures,
                    "steps": [r.steps for r in report.results], "cpu": time.process_time() - cpu0}))


def _client_lean(gateway: str, bundles: list[str], concurrency: int, renew: bool, q, go) -> None:
    """--client lean: benchmarks/loadgen.py. Bundles are loaded, the CA certificates fetched and
    the client Context built before the timed part; the operational identities are saved after it."""
    import loadgen
    from devid.gateway.device.enroll import Firmware
    fw = Firmware("sha-256", hashlib.sha256(IMAGE).digest(), FW_NAME, FW_VERSION)
    target = loadgen.Target.parse(gateway)
    devices, failures = loadgen.load_devices([Path(b) for b in bundles], operational=renew)

    def started() -> None:
        q.put(("ready", None))
        go.wait()
    if not devices:
        started()
        q.put(("done", {"latencies": [], "failures": failures, "steps": [], "cpu": 0.0}))
        return
    trust = loadgen.Trust(devices[0].root, target.host)
    try:
        report = asyncio.run(loadgen.run(target, devices, trust, renew=renew, firmware=fw, concurrency=concurrency,
                                         started=started))
    except loadgen.Failed as exc:             # the set-up (CA certificates) failed: every device fails
        q.put(("done", {"latencies": [], "failures": {d.serial: str(exc) for d in devices}, "steps": [],
                        "cpu": 0.0}))
        return
    report.failures.update(failures)
    q.put(("done", {"latencies": [o.seconds for o in report.outcomes], "failures": report.failures,
                    "steps": [o.steps for o in report.outcomes], "cpu": report.cpu_seconds,
                    "counters": report.counters}))
    loadgen.save_operational(devices, report)       # after the timed part (for --renew)


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000, 1)


def crypto_floor(seconds: float = 1.5) -> dict:
    """Server-side crypto of one attested enrollment, with `cryptography` alone."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    sig = key.sign(b"m" * 64, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    n = 0
    t0 = time.process_time()
    while time.process_time() - t0 < seconds:
        for _ in range(2):
            key.sign(b"m" * 64, ec.ECDSA(hashes.SHA256()))
        for _ in range(5):
            pub.verify(sig, b"m" * 64, ec.ECDSA(hashes.SHA256()))
        eph = ec.generate_private_key(ec.SECP256R1())
        eph.exchange(ec.ECDH(), peer)
        n += 1
    per = (time.process_time() - t0) / n
    return {"ms_per_enrollment": round(per * 1000, 3), "enrollments_per_s_per_core": round(1 / per, 1)}


def libcoap_baseline(work: Path, data, seconds: float, inflight: int, clients: int) -> dict:
    import bench_dtls
    bundles = bundle_dirs(work / "factory")[:16]
    port = bench_dtls.free_port()
    proc = bench_dtls.start_libcoap(work, data, port)
    try:
        res = bench_dtls.run_load(bundles, port, proc.pid, seconds, inflight, clients, False)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    return {"handshake_get_per_s": round(res["ops_per_s"], 1),
            "server_cpu_ms_per_op": round(res["server_cpu_ms_per_op"], 3), "failed": res["failed"]}


@dataclass
class Served:
    """A `devid serve` started by the benchmark: its process, its URI, the pids whose CPU counts."""

    proc: subprocess.Popen
    uri: str
    pids: list[int]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


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
    cli = next(p for p in (server_root / "gateway" / "cli" / "dispatch.py", server_root / "gateway" / "cli.py") if p.exists())
    if "handshake_rate_per_address" in cli.read_text():
        # every client is at 127.0.0.1: one address doing a fleet's handshakes (an older
        # --server-root has no per-address rate, and no such flag)
        flags = ["--handshake-burst-per-address", "1000000", "--handshake-rate-per-address", "1000000"]
    module, path = checkout_module(server_root)
    if path is not None:
        e["PYTHONPATH"] = path
    _report().stage(f"starting devid serve --workers {workers} on 127.0.0.1:{port}"
                    + (f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""))
    proc = subprocess.Popen([sys.executable, "-m", module, "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", str(workers), "--log-level", "WARNING", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=e, cwd=server_root)
    line = proc.stdout.readline().decode()
    if "listening" not in line:
        proc.kill()
        raise SystemExit(f"devid serve did not start: {line}")
    pids = [proc.pid] + _children(proc.pid) if workers > 1 else [proc.pid]
    return Served(proc, f"coaps://127.0.0.1:{port}", pids)


def bundle_dirs(directory: Path) -> list[str]:
    """The device bundles in a provisioning output directory (not its hidden entries)."""
    return sorted(str(p) for p in directory.iterdir() if not p.name.startswith(".") and p.is_dir())


def run_clients(gateway: str, bundles: list[str], pids: list[int], *, clients: int, concurrency: int,
                client: str = "lean", renew: bool = False) -> dict:
    """Enroll (or renew) `bundles` from `clients` processes; the JSON summary of one mode."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    shares = [bundles[i::clients] for i in range(clients)]
    per = max(1, concurrency // clients)
    target = _client_lean if client == "lean" else _client
    procs = [ctx.Process(target=target, args=(gateway, s, per, renew, q, go)) for s in shares if s]
    mode = "renew" if renew else "enroll"
    _report().stage(f"{mode}: {len(bundles)} devices, {concurrency} in flight from {len(procs)} {client} "
                    f"client process(es) against {gateway}")
    for p in procs:
        p.start()
    # the timed part starts when every client has loaded what it needs (process start-up,
    # imports and, for the lean client, bundles and CA certificates are not timed)
    for _ in procs:
        kind, _payload = q.get(timeout=600)
        if kind != "ready":
            raise SystemExit(f"a client process failed to start: {kind}")
    progress = _report().progress(f"{mode}ing") if _report().issued is not None else None
    issued0 = _report().issued() if progress else 0
    cpu0 = _cpu(pids)
    t0 = time.perf_counter()
    go.set()
    results = []
    deadline = time.monotonic() + 3600
    while len(results) < len(procs):
        try:
            results.append(q.get(timeout=1.0 if progress else max(0.0, deadline - time.monotonic()))[1])
        except queue.Empty:
            if time.monotonic() >= deadline:
                raise SystemExit("the client processes did not finish within an hour") from None
            if progress:
                progress(min(len(bundles), _report().issued() - issued0), len(bundles))
    wall = time.perf_counter() - t0
    cpu1 = _cpu(pids)
    for p in procs:
        p.join(300)        # the lean client saves the operational identities before it exits
    lat = [x for r in results for x in r["latencies"]]
    failures = {k: v for r in results for k, v in r["failures"].items()}
    steps = [s for r in results for s in r["steps"]]
    client_cpu = sum(r["cpu"] for r in results)
    done = len(lat)
    _report().finished(progress, mode, done, len(bundles), len(failures), wall)
    out = {"mode": "renew" if renew else "enroll", "client": client, "devices": len(bundles),
           "done": done, "errors": len(failures), "seconds": round(wall, 2),
           "per_s": round(done / wall, 1) if wall else None,
           "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99)},
           "server_cpu_ms_per_op": round((cpu1 - cpu0) * 1000 / done, 3) if done and pids else None,
           "client_cpu_ms_per_op": round(client_cpu * 1000 / done, 3) if done else None,
           "server_peak_rss_kib": _hwm_kib(pids) if pids else None}
    counters = [r["counters"] for r in results if "counters" in r]
    if counters:      # lean client: retransmissions seen (lost datagrams or a slow gateway)
        out["client_retransmissions"] = {k: sum(c[k] for c in counters) for k in counters[0]}
    if steps:
        names = ("connect", "renew") if renew else ("connect", "nonce", "evidence", "enroll", "config")
        out["step_latency_ms"] = {name: {"p50": _pct([s[name] for s in steps if name in s], 50),
                                         "p95": _pct([s[name] for s in steps if name in s], 95),
                                         "p99": _pct([s[name] for s in steps if name in s], 99)}
                                  for name in names}
    if failures:
        out["first_failures"] = dict(list(failures.items())[:5])
    out["_latencies"] = lat          # for pooled figures across rounds; removed before printing
    return out


def main(argv: list[str] | None = None, parser_class: type = argparse.ArgumentParser) -> int:
    ap = bench_cli.build_parser(parser_class, __doc__)
    args = ap.parse_args(argv)
    bench_cli.check(ap, args)
    from devid.gateway.app.datadir import DataDir, resolve_data_dir
    from devid.gateway.factory.provisioning import provision
    bench_cli.REPORT = bench_cli.Reporter(quiet=args.quiet or args.json)
    data = DataDir(resolve_data_dir(args.data)) if args.gateway else None
    if data is not None:
        data.require()
    work, temporary = bench_cli.workdir(ap, args.workdir)
    served: Served | None = None
    registry = None
    try:
        now = lambda: datetime.now(timezone.utc)  # noqa: E731
        if data is None:
            data = DataDir(work / "data")
            _report().stage(f"creating a CA in {data.path}")
            data.init(now())
        data.require()
        digest = hashlib.sha256(IMAGE).hexdigest()
        policy = data.path / "attestation-policy.toml"
        if not args.gateway:
            policy.write_text(POLICY.format(t=DEVICE_TYPE, name=FW_NAME, version=FW_VERSION, digest=digest))
        count = args.devices
        if args.durability:
            import bench_hardening
            count = args.devices * len(bench_hardening.SYNC_MODES) * args.rounds
        elif args.flood:
            count = args.devices * 2 * args.rounds + 1          # and one identity to flood with
        _report().stage(f"provisioning {count} devices into {work / 'factory'}")
        reg = data.open_registry()
        provision(data.authority(reg), count=count, device_type=DEVICE_TYPE, out=work / "factory",
                  manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  serial_prefix=f"B{os.getpid()}", now=now, progress=_report().progress("provisioning"))
        reg.close()
        if not _report().quiet:
            registry = data.open_registry(readonly=True)
            _report().issued = lambda: registry.count_certificates("operational")
        bundles = bundle_dirs(work / "factory")
        summary = {"machine": {"python": platform.python_version(), "nproc": os.cpu_count(),
                               "load": os.getloadavg()},
                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        if args.durability or args.flood:
            import bench_hardening
            if args.durability:
                summary["durability"] = bench_hardening.durability(args, data, bundles, work)
            else:
                summary["flood"] = bench_hardening.flood(args, data, bundles)
            section = summary.get("durability") or summary.get("flood")
            return bench_cli.emit(summary, f"{section['errors']} enrollment(s) failed" if section["errors"] else None)
        gateway = args.gateway
        pids: list[int] = []
        if not gateway:
            served = start_gateway(data.path, args.workers, args.server_root)
            gateway, pids = served.uri, served.pids

        def run(renew: bool) -> dict:
            out = run_clients(gateway, bundles, pids, clients=args.clients, concurrency=args.concurrency,
                              client=args.client, renew=renew)
            out.pop("_latencies")
            return out

        summary["enroll"] = run(False)
        if args.renew:
            summary["renew"] = run(True)
        if served is not None:
            served.stop()
            served = None
        if not args.no_baselines:
            _report().stage("baseline: the crypto floor of one enrollment (1.5 s)")
            summary["crypto_floor"] = crypto_floor()
            _report().stage(f"baseline: libcoap coap-server-openssl, handshake + GET ({args.baseline_seconds:g} s)")
            summary["libcoap"] = libcoap_baseline(work, data, args.baseline_seconds, 16, 2)
            cpu = summary["enroll"]["server_cpu_ms_per_op"]
            if cpu:
                summary["ratios"] = {
                    "server_cpu_vs_crypto_floor": round(cpu / summary["crypto_floor"]["ms_per_enrollment"], 2),
                    "server_cpu_vs_libcoap_handshake_get": round(cpu / summary["libcoap"]["server_cpu_ms_per_op"], 2)
                    if summary["libcoap"]["server_cpu_ms_per_op"] == summary["libcoap"]["server_cpu_ms_per_op"] else None}
        errors = summary["enroll"]["errors"] + summary.get("renew", {}).get("errors", 0)
        return bench_cli.emit(summary, f"{errors} enrollment(s) or renewal(s) failed" if errors else None)
    finally:
        if registry is not None:
            registry.close()
        if served is not None:
            served.stop()
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            _report().stage(f"kept {work}")


if __name__ == "__main__":
    sys.exit(main())
