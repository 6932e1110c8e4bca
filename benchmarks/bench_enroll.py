#!/usr/bin/env python3
"""Fleet enrollment benchmark (`devid bench`): the full zero-touch flow against a real gateway.

    devid bench [--devices 200] [--concurrency 16] [--clients 2] [--workers N] [--renew]
                [--client lean|script] [--probe-devices 10] [--workdir DIR] [--no-baselines]
                [--quiet | --json]
    devid [--data DIR] bench --gateway coaps://HOST:PORT [--data DIR] ...   against a running gateway
    devid bench --durability [--rounds 2] [--devices N ...]    the cost of durable commits
    devid bench --flood [--rounds 2] [--devices N ...]         enrollment latency under a nonce flood
    devid bench --registry URL|auto [--rounds 2] [--devices N ...]   SQLite and PostgreSQL, 1 and 2 workers
    devid bench --workers-scaling [--workers 2] [--rounds 2] [--devices N ...]   1 worker against N
    devid bench --pkcs11 [--rounds 2] [--issue-count 1000] [--provision-count 200] [--devices N ...]
                                                         keys in a SoftHSM2 token against keys in files
    devid bench --mqtt [--rounds 2] [--seconds 5] [--devices 20] [--workers N] [--concurrency 16]
                                                         TLS connects/s against Mosquitto beside DTLS handshakes/s

Starts `devid serve --workers N` on loopback with a CA of its own (in --workdir, by default a
temporary directory removed afterwards), provisions the devices, and runs each through the
zero-touch flow (by --flow: one-request, the default, is evidence inside the CSR of one EST /sen
whose answer carries the configuration; classic is nonce, signed evidence, EST /sen,
configuration; one DTLS session either way) with C
devices in flight from client processes separate from the server. With --gateway it targets a
running gateway instead and provisions the devices into that gateway's data directory: --data
DIR, as for every devid command (default: $DEVID_DATA, else ./devid-data); --data means nothing
else here and needs --gateway. Both clients run the device client's flows
(gateway/device/flow.py). `--client lean` (default) is benchmarks/loadgen.py: the flows on the
sans-I/O DTLS engine with a small CoAP codec, so the client costs a few ms of CPU per enrollment;
`--client script` runs the field engineer's script per device (gateway/device/simulator.py, 16-30
ms of client CPU each, which caps the rate on a small machine); the client processes are
benchmarks/bench_clients.py.

Progress goes to stderr: each stage as it starts, how many devices are done (counted in the
registry once a second) and, at the end, the main figures of the summary in a few lines
(benchmarks/bench_report.py); --quiet or --json silence it. The result is one JSON document on
stdout (docs/cli.md), with "ok" false and "error" when an enrollment failed:

  enrollments/s, latency p50/p95/p99 end to end and per step (connect = the DTLS handshake),
  server CPU per enrollment (from the server processes' own counters), client CPU per
  enrollment (process time of the client processes over the timed part), peak RSS of the
  server processes, errors (must be 0);
  what the flow costs, per enrollment and per renewal: datagrams each way (the handshake's
  apart) and CoAP exchanges, counted by the lean client's sessions over the timed run
  (benchmarks/bench_counts.py), and write transactions on the registry, counted as commits in
  its WAL while --probe-devices more devices enroll (renew) one at a time before the timed runs
  (benchmarks/bench_wal.py); the summary's "counting" says so too;
  and, in the same run, two baselines:
    libcoap   coap-server-openssl in PKI mode: DTLS handshake + one GET, rate and server CPU
    crypto    the cryptographic operations one attested enrollment needs on the server
              (2 ECDSA signs, 5 verifies, 1 key generation, 1 ECDH), timed with
              `cryptography` alone: the floor. Server CPU per enrollment (and per
              renewal) is given as a ratio to it.

`--durability` and `--flood` replace the plain run with the two measurements of issue 10
(benchmarks/bench_hardening.py): server CPU per enrollment with and without durable commits,
and the p95 of well-behaved enrollments with and without another identity flooding nonce
requests, each side by side in alternating rounds of one run. benchmarks/README.md has the
figures and how to read them. `--workers-scaling` (issue 14, benchmarks/bench_scaling.py) replaces
it with alternating rounds of `devid serve --workers 1` and `--workers N`: enrollments/s and
server CPU per enrollment side by side, with their paired ratios. `--pkcs11` (issue 15,
benchmarks/bench_pkcs11.py) with alternating rounds of keys in a SoftHSM2 token against keys in
files: issuance from a CSR, factory provisioning and enrollment server CPU, with their ratios.
`--mqtt` (issue 16, benchmarks/bench_mqtt.py) with alternating rounds of TLS connects (MQTT 5 CONNECT,
CONNACK, DISCONNECT) with the devices' operational certificates against a real Mosquitto and DTLS
handshakes (+ one CoAP GET) with the same identities against `devid serve`: handshakes/s and each
server's CPU per handshake, with their ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# shared with the other fleet benchmarks and the tests (bench_common is below every one of them)
from bench_common import (DEVICE_TYPE, FW_NAME, FW_VERSION, IMAGE, POLICY, Served, bench_policy,  # noqa: E402,F401
                          bundle_dirs, checkout_module, start_gateway)
from bench_clients import run_clients  # noqa: E402
from bench_wal import WriteProbe  # noqa: E402
from devid.gateway.device.stats import finite  # noqa: E402
import bench_cli  # noqa: E402
import bench_report  # noqa: E402


def _report() -> bench_cli.Reporter:
    """The progress reporter main() set up (quiet when run otherwise, e.g. by bench_ab.py)."""
    return bench_cli.REPORT


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
    return {"handshake_get_per_s": round(res["ops_per_s"], 1),          # no handshake done: null, not NaN
            "server_cpu_ms_per_op": finite(res["server_cpu_ms_per_op"], 3), "failed": res["failed"]}


def ratios(summary: dict) -> dict:
    """Server CPU per enrollment (and per renewal) against the baselines of the same run; None
    where a figure is missing (no server pids with --gateway; too few operations for the
    processes' CPU clock, which counts in 10 ms ticks, to move)."""
    def ratio(a, b):
        return round(a / b, 2) if a and b else None
    cpu = summary["enroll"]["server_cpu_ms_per_op"]
    out = {"server_cpu_vs_crypto_floor": ratio(cpu, summary["crypto_floor"]["ms_per_enrollment"]),
           "server_cpu_vs_libcoap_handshake_get": ratio(cpu, summary["libcoap"]["server_cpu_ms_per_op"])}
    if "renew" in summary:
        out["renew_server_cpu_vs_crypto_floor"] = ratio(summary["renew"]["server_cpu_ms_per_op"],
                                                        summary["crypto_floor"]["ms_per_enrollment"])
    return out


def write_probe(gateway: str, bundles: list[str], pids: list[int], db_path: Path, renew: bool,
                flow: str = "one-request") -> dict:
    """Before the timed runs: `bundles` enroll (and renew) one at a time from one lean client while
    the registry's WAL counts the committed write transactions (bench_wal.py)."""
    out: dict = {"devices": len(bundles), "concurrency": 1}
    for mode in ("enroll", "renew") if renew else ("enroll",):
        r = run_clients(gateway, bundles, pids, clients=1, concurrency=1, client="lean", renew=mode == "renew",
                        probe=WriteProbe(db_path), label="write probe: ", flow=flow)
        out[mode] = {"done": r["done"], "errors": r["errors"], **r["write_probe"],
                     **({"first_failures": r["first_failures"]} if r.get("first_failures") else {})}
    return out


def main(argv: list[str] | None = None, parser_class: type = argparse.ArgumentParser) -> int:
    ap = bench_cli.build_parser(parser_class, __doc__)
    args = ap.parse_args(argv)
    bench_cli.check(ap, args)
    from devid.gateway.app.datadir import DataDir, resolve_data_dir
    from devid.gateway.factory.provisioning import provision
    bench_cli.REPORT = bench_cli.Reporter(quiet=args.quiet or args.json)
    if args.registry:
        import bench_engines
        return bench_engines.main(ap, args)
    if args.pkcs11:
        import bench_pkcs11
        return bench_pkcs11.main(ap, args)
    if args.mqtt:
        import bench_mqtt
        return bench_mqtt.main(ap, args)
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
        policy = data.path / "attestation-policy.toml"
        if not args.gateway:
            policy.write_text(bench_policy())
        count = args.devices
        if args.durability:
            import bench_hardening
            count = args.devices * len(bench_hardening.SYNC_MODES) * args.rounds
        elif args.flood:
            count = args.devices * 2 * args.rounds + 1          # and one identity to flood with
        elif args.workers_scaling:
            count = args.devices * 2 * args.rounds
        else:
            count += args.probe_devices
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
        if args.workers_scaling:
            import bench_scaling
            section = summary["workers_scaling"] = bench_scaling.workers_scaling(args, data, bundles, _report())
            for line in bench_scaling.lines(section):
                _report().stage(line)
            return bench_cli.emit(summary, f"{section['errors']} enrollment(s) failed" if section["errors"] else None)
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

        probe_bundles, bundles = bundles[:args.probe_devices], bundles[args.probe_devices:]

        def run(renew: bool) -> dict:
            out = run_clients(gateway, bundles, pids, clients=args.clients, concurrency=args.concurrency,
                              client=args.client, renew=renew, loop=args.client_loop, flow=args.flow)
            out.pop("_latencies")
            return out

        if probe_bundles:
            summary["write_probe"] = write_probe(gateway, probe_bundles, pids, data.db_path, args.renew, args.flow)
        summary["enroll"] = run(False)
        if args.renew:
            summary["renew"] = run(True)
        bench_report.flow_costs(summary, len(probe_bundles))
        if served is not None:
            served.stop()
            served = None
        if not args.no_baselines:
            _report().stage("baseline: the crypto floor of one enrollment (1.5 s)")
            summary["crypto_floor"] = crypto_floor()
            _report().stage(f"baseline: libcoap coap-server-openssl, handshake + GET ({args.baseline_seconds:g} s)")
            summary["libcoap"] = libcoap_baseline(work, data, args.baseline_seconds, 16, 2)
            summary["ratios"] = ratios(summary)
        bench_report.show(_report(), summary)
        errors = (summary["enroll"]["errors"] + summary.get("renew", {}).get("errors", 0)
                  + sum(p["errors"] for p in summary.get("write_probe", {}).values() if isinstance(p, dict)))
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
