#!/usr/bin/env python3
"""A lean load generator for the gateway's zero-touch enrollment and renewal.

    python benchmarks/loadgen.py --gateway coaps://127.0.0.1:PORT --bundles DIR [--concurrency C] [--renew]
                                 [--flow one-request|classic]

Per device, ONE DTLS 1.2 session (mutual X.509 authentication, the gateway's certificate
checked) and, over it, the flows of the device client (`devid.gateway.device.flow`,
`flow_one`), the very code the field engineer's script runs (`devid enroll`):

    enroll   factory identity, by `--flow`:
             one-request (the default): POST /.well-known/est/sen with Accept 62, the CSR of a
               new P-256 key carrying an EAT signed with the factory key for the session's
               exporter value (its own, `Session.exporter`) and bound to the new key; the
               multipart answer holds the certificate, the configuration and the verdict
             classic: GET /attest/nonce, POST /attest/evidence, POST /.well-known/est/sen (a DER
               CSR, Accept 287), GET /config (Accept 60)
    renew    operational identity:  POST /.well-known/est/sren (Accept 287: the certificate alone)

Every answer is checked by the same code as the script's: response codes and content formats,
the nonce, an acceptable verdict, the issued certificate (for the new key, the device's serial,
validated to the operational CA) and the configuration (CBOR, for this device).

What makes it lean is the transport alone, compared with the script (gateway/device/simulator.py):
- the sans-I/O DTLS client engine on one non-blocking UDP socket per session, no aiocoap Context;
  CoAP through a small codec (loadgen_dtls.py, loadgen_coap.py: CON requests with piggybacked or
  separate responses, Block2 for large answers, retransmission after ACK_TIMEOUT);
- one pyOpenSSL Context per process for all devices (each connection gets its device's
  certificate and key), bundles loaded and keys converted before the timed run (loadgen_trust.py);
- trust: before the timed run, each process validates the gateway's chain to the root and gets
  the CA certificates from EST /crts (each checked to be issued by the root). The operational CA
  is then a trust anchor for the handshakes and the issued certificates, so the P-384 root
  signature (0.7 ms here) is not checked again per device (the gateway does the same with its
  issuing CAs). `--full-chain` checks every chain up to the root instead;
- no files written during the run; operational identities are saved afterwards (op-key.pem,
  op-cert.pem, op-chain.pem, as the script does) so that --renew can use them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from devid.gateway.device.flow import crts_flow, drive, enroll_flow, renew_flow  # noqa: E402
from devid.gateway.device.flow_one import one_request_flow  # noqa: E402
from devid.gateway.device.identity import Firmware, operational_files  # noqa: E402
from devid.gateway.device.protocol import (CHANGED, CLASSIC, CONTENT, CT_CBOR, CT_PKCS7_CERTS,  # noqa: E402,F401
                                           CT_PKCS10, CT_PKIX_CERT, CT_PROBLEM, DEFAULT_FLOW, FLOWS, GET, POST,
                                           EnrollFailed, parse_gateway, problem_text)
from devid.gateway.device.stats import latency_ms, step_latency_ms  # noqa: E402
# the transport, and the names tests and the flood benchmark reach through this module
from loadgen_coap import ACK, CON, RST, Response, decode_message, encode_message, encode_options  # noqa: E402,F401
from loadgen_dtls import Session, connect, exchange  # noqa: E402
from loadgen_trust import Device, Trust, load_device, load_devices  # noqa: E402,F401

Failed = EnrollFailed        # one device's failure: the step it failed at and why


@dataclass
class Target:
    uri: str
    host: str
    peer: tuple
    family: int

    @classmethod
    def parse(cls, uri: str) -> "Target":
        """coaps://HOST[:PORT], resolved (EnrollFailed at step `gateway` for another URI)."""
        gateway = parse_gateway(uri)
        info = socket.getaddrinfo(gateway.host, gateway.port, type=socket.SOCK_DGRAM)[0]
        return cls(uri, gateway.host, info[4][:2], info[0])


@dataclass
class Outcome:
    serial: str
    seconds: float
    steps: dict[str, float]
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]      # after the leaf, for op-chain.pem
    verdict: str | None = None


async def _session(target: Target, dev: Device, trust: Trust, timeout: float) -> Session:
    loop = asyncio.get_running_loop()
    return await connect(Session(loop, target.peer, target.family, trust.context(dev), dev, trust, timeout), timeout)


async def enroll_device(target: Target, dev: Device, trust: Trust, firmware: Firmware | None, timeout: float,
                        secure_boot: bool = True, dbgstat: int = 2, bootcount: int = 1,
                        flow: str = DEFAULT_FLOW) -> Outcome:
    clock = time.perf_counter
    started = clock()
    sess = await _session(target, dev, trust, timeout)
    try:
        connected = clock()
        claims = dict(secure_boot=secure_boot, dbgstat=dbgstat, bootcount=bootcount)
        if flow == CLASSIC:
            steps_of = enroll_flow(dev.identity, firmware, trust.verify_issued, cert_format=CT_PKIX_CERT, **claims)
        else:
            steps_of = one_request_flow(dev.identity, firmware, trust.verify_issued, session_nonce=sess.exporter,
                                        **claims)
        done, steps = await drive(steps_of, exchange(sess, timeout), clock=clock, started=connected)
        end = clock()
    finally:
        sess.close()
    cert = done.issued.certificate
    return Outcome(dev.serial, end - started, {"connect": connected - started, **steps}, cert, done.issued.key,
                   trust.issuers_of(cert), done.verdict.tier if done.verdict else None)


async def renew_device(target: Target, dev: Device, trust: Trust, timeout: float) -> Outcome:
    clock = time.perf_counter
    started = clock()
    sess = await _session(target, dev, trust, timeout)
    try:
        connected = clock()
        issued, steps = await drive(renew_flow(dev.serial, trust.verify_issued, cert_format=CT_PKIX_CERT),
                                    exchange(sess, timeout), clock=clock, started=connected)
        end = clock()
    finally:
        sess.close()
    cert = issued.certificate
    return Outcome(dev.serial, end - started, {"connect": connected - started, **steps}, cert, issued.key,
                   trust.issuers_of(cert))


async def fetch_ca_certs(target: Target, dev: Device, trust: Trust, timeout: float = 30.0) -> None:
    """Before the timed run: one session with the full chain check to the root, EST /crts, and
    the operational CA pinned as an anchor (unless --full-chain)."""
    sess = await _session(target, dev, trust, timeout)
    try:
        certs, _ = await drive(crts_flow(), exchange(sess, timeout))
    finally:
        sess.close()
    trust.pin(certs, datetime.now(timezone.utc))


# -- a run ----------------------------------------------------------------------------------------------

STEPS = ("connect", "nonce", "evidence", "enroll", "config", "renew")


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)     # serial -> "step: reason"
    seconds: float = 0.0
    cpu_seconds: float = 0.0          # this process, over the run
    counters: dict = field(default_factory=dict)   # Session.counters over the run

    def summary(self) -> dict:
        lat = [o.seconds for o in self.outcomes]
        steps = [o.steps for o in self.outcomes]
        return {"done": len(self.outcomes), "errors": len(self.failures), "seconds": round(self.seconds, 3),
                "per_s": round(len(lat) / self.seconds, 1) if self.seconds else None,
                "latency_ms": latency_ms(lat),
                "step_latency_ms": step_latency_ms(steps, [n for n in STEPS if any(n in s for s in steps)]),
                "client_cpu_ms_per_op": round(self.cpu_seconds * 1000 / len(lat), 3) if lat else None,
                **self.counters,
                "first_failures": dict(list(self.failures.items())[:5])}


async def run(target: Target, devices: list[Device], trust: Trust, *, renew: bool = False,
              firmware: Firmware | Callable[[Device], Firmware] | None = None, concurrency: int = 16,
              timeout: float = 30.0, started: Callable[[], None] | None = None, flow: str = DEFAULT_FLOW) -> Report:
    """Enroll (or renew) every device, `concurrency` at a time, enrolling by `flow` (FLOWS).
    `started` is called right before the timed part (after the trust set-up)."""
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r} (one of: {', '.join(FLOWS)})")
    if not trust.cas and devices:
        for i, dev in enumerate(devices[:3]):     # a device the gateway refuses must not stop the run
            try:
                await fetch_ca_certs(target, dev, trust, timeout)
                break
            except EnrollFailed:
                if i == min(2, len(devices) - 1):
                    raise
    for dev in devices:                    # Contexts built before the timed part
        trust.context(dev)
    fw_of = firmware if callable(firmware) else (lambda dev: firmware)
    report = Report()
    queue = iter(devices)

    async def worker() -> None:
        for dev in queue:
            try:
                if renew:
                    outcome = await renew_device(target, dev, trust, timeout)
                else:
                    outcome = await enroll_device(target, dev, trust, fw_of(dev), timeout, flow=flow)
                report.outcomes.append(outcome)
            except EnrollFailed as exc:
                report.failures[dev.serial] = str(exc)
            except Exception as exc:           # a load generator reports, it does not crash
                report.failures[dev.serial] = f"unexpected: {exc!r}"

    if started is not None:
        started()
    before = dict(Session.counters)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(devices))))))
    report.seconds = time.perf_counter() - t0
    report.cpu_seconds = time.process_time() - cpu0
    report.counters = {k: v - before[k] for k, v in Session.counters.items()}
    return report


def save_operational(devices: list[Device], report: Report) -> None:
    """After the run: op-key.pem (0600), op-cert.pem, op-chain.pem in each device's bundle (the
    script's files; replaced atomically, without the script's fsync: a benchmark's scratch)."""
    by_serial = {d.serial: d for d in devices}
    for o in report.outcomes:
        directory = by_serial[o.serial].directory
        for name, data, mode in operational_files(o.key, [o.cert, *o.chain]):
            tmp = directory / f".{name}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", required=True, help="coaps://HOST:PORT")
    ap.add_argument("--bundles", required=True, type=Path, help="directory of device bundles (devid provision --out)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--renew", action="store_true", help="renew (EST /sren) with the operational identities")
    ap.add_argument("--flow", choices=FLOWS, default=DEFAULT_FLOW,
                    help="the enrollment flow (default one-request; classic: nonce, evidence, /sen, /config)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per step (default 30 s)")
    ap.add_argument("--full-chain", action="store_true", help="check every chain up to the root (P-384) per device")
    ap.add_argument("--firmware-name"), ap.add_argument("--firmware-version")
    ap.add_argument("--firmware-digest", help="sha-256 hex (default: the bench firmware of bench_common.py)")
    ap.add_argument("--no-save", action="store_true", help="do not save the operational identities afterwards")
    ap.add_argument("--profile", type=Path, help="write a cProfile of the timed part to this file")
    args = ap.parse_args(argv)
    from bench_common import bench_firmware
    fw = bench_firmware(args.firmware_digest, args.firmware_name, args.firmware_version)
    try:
        target = Target.parse(args.gateway)
    except EnrollFailed as exc:
        ap.error(exc.reason)
    bundles = sorted(p for p in args.bundles.iterdir() if (p / "chain.pem").exists())
    devices, failures = load_devices(bundles, args.renew)
    if not devices:
        print(json.dumps({"error": "no loadable device bundles", "failures": dict(list(failures.items())[:5])}))
        return 1
    trust = Trust(devices[0].root, target.host, args.full_chain)
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    try:
        report = asyncio.run(run(target, devices, trust, renew=args.renew, firmware=fw,
                                 concurrency=args.concurrency, timeout=args.timeout,
                                 started=prof.enable if prof else None, flow=args.flow))
    except EnrollFailed as exc:
        print(json.dumps({"error": f"set-up failed: {exc}"}))
        return 1
    if prof:
        prof.disable()
        prof.dump_stats(str(args.profile))
    report.failures.update(failures)
    if not args.no_save:
        save_operational(devices, report)
    print(json.dumps(dict(mode="renew" if args.renew else "enroll", devices=len(bundles), client="lean",
                          **({} if args.renew else {"flow": args.flow}), **report.summary()), indent=2))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
