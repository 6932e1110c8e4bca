"""The `devid` command line."""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca.errors import CAError
from devid.ca.hierarchy import CA_NAMES
from devid.ca.revocation import REASONS, build_crl, revoke_certificate, revoke_device
from devid.ca.store import DeviceState
from devid.ca.validation import DeviceVerifier
from devid.ca.identity import check_serial
from devid.attestation.errors import AttestationError

from devid.gateway.cli import attest as attest_cli
from devid.gateway.cli import output
from devid.gateway.app.datadir import ENV_DATA, DataDir, resolve_data_dir
from devid.gateway.system.fs import write_atomic
from devid.gateway.factory.provisioning import DEFAULT_PREFIX, provision
from devid.gateway.errors import CLIError, GatewayError


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # one line, not usage + error
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


class _Deprecated(argparse.Action):
    """A hidden old name of a flag: stores into the new one's dest, with a warning on stderr."""

    def __init__(self, option_strings, dest, new: str, **kw) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        sys.stderr.write(f"devid: warning: {option_string} is deprecated, use {self.new}\n")
        setattr(namespace, self.dest, values)


def _data(args) -> DataDir:
    return DataDir(resolve_data_dir(args.data))


def _read_input(path: str, what: str) -> bytes:
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as exc:
        raise CLIError(f"cannot read {what} {path}: {exc.strerror}") from None


def _write_output(path: str | None, data: bytes) -> None:
    if path is None or path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise CLIError(f"cannot write {path}: {exc.strerror}") from None


def _device_dict(dev, certs=None) -> dict:
    d = {"serial": dev.serial, "device_type": dev.device_type, "state": dev.state.value,
         "created_at": output.ts(dev.created_at), "updated_at": output.ts(dev.updated_at),
         "enrolled_at": output.ts(dev.enrolled_at) if dev.enrolled_at else None,
         "revoked_at": output.ts(dev.revoked_at) if dev.revoked_at else None,
         "revocation_reason": dev.revocation_reason}
    if certs is not None:
        d["certificates"] = [{
            "serial": format(c.serial, "x"), "profile": c.profile, "issuer": c.issuer, "status": c.status.value,
            "not_before": output.ts(c.not_before), "not_after": output.ts(c.not_after),
            "sha256_fingerprint": c.fingerprint,
            "revoked_at": output.ts(c.revoked_at) if c.revoked_at else None,
            "revocation_reason": c.revocation_reason} for c in certs]
    return d


# -- commands --------------------------------------------------------------------------------------

def cmd_init(args) -> int:
    data = _data(args)
    data.init(utcnow(), hostnames=args.hostname or (), organization=args.org)
    data.require()
    print(f"created CA in {data.path}")
    for name in (*CA_NAMES, "gateway"):
        cert = data.cert(name)
        print(f"  {name:<14} {cert.subject.rfc4514_string():<48} until {output.ts(cert.not_valid_after_utc)}")
    if data.secret_path.exists():
        print(f"  CA keys are encrypted with the generated passphrase in {data.secret_path} (mode 0600)")
    else:
        print("  CA keys are encrypted with $DEVID_CA_PASSPHRASE")
    return 0


def cmd_ca_cert(args) -> int:
    data = _data(args).require()
    sys.stdout.buffer.write(data.cert_pem(args.name))
    return 0


def cmd_ca_sign_csr(args) -> int:
    data = _data(args).require()
    csr = _read_input(args.csr, "CSR")
    registry = data.open_registry()
    ca = data.authority(registry)
    if args.profile == "factory":
        if not args.device_type:
            raise CLIError("--profile factory registers a new device: give its --device-type")
        issued = ca.issue_factory_from_csr(csr, args.device, args.device_type, utcnow())
    else:
        if args.device_type:
            raise CLIError("--device-type is only for --profile factory (the registry knows the type)")
        issued = ca.issue_operational(csr, args.device, utcnow(), profile_name=args.profile)
    _write_output(args.out, issued.pem)
    if args.out and args.out != "-":
        print(f"issued {args.profile} certificate {issued.cert.serial_number:x} for device {args.device} "
              f"-> {args.out}", file=sys.stderr)
    return 0


def cmd_ca_verify(args) -> int:
    data = _data(args).require()
    pem = _read_input(args.cert, "certificate")
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(pem)]
        except ValueError:
            raise CLIError(f"{args.cert}: not a PEM or DER certificate") from None
    registry = data.open_registry(readonly=True)
    leaf, intermediates = certs[0], certs[1:]
    anchor = "manufacturing" if args.profile == "factory" else "operational"
    verifier = DeviceVerifier(data.cert(anchor), args.profile, data.config.identity, registry)
    identity = verifier.verify(leaf, intermediates, now=utcnow())
    if args.json:
        print(json.dumps({"valid": True, "profile": args.profile, **identity.as_dict()}))
    else:
        print(f"OK: {args.profile} identity of device {identity.serial} ({identity.device_type}), "
              f"certificate {identity.certificate_serial:x}")
    return 0


def cmd_revoke(args) -> int:
    data = _data(args).require()
    registry = data.open_registry()
    if args.certificate is not None:
        done = revoke_certificate(registry, args.certificate, args.reason, utcnow())
        c = done.certificate
        what = f"certificate {c.serial:x} ({c.profile}, device {c.device_serial})"
        if not done.newly:
            print(f"{what} was already revoked"
                  + (f" on {output.ts(c.revoked_at)} ({c.revocation_reason})" if c.revoked_at else "")
                  + "; nothing changed")
            return 0
        device = registry.get_device(c.device_serial)
        print(f"{what} revoked ({args.reason}); device {c.device_serial} stays {device.state.value}")
        print("run 'devid crl' to publish new CRLs")
        return 0
    revoked = revoke_device(registry, args.serial, args.reason, utcnow())
    print(f"device {args.serial} revoked ({args.reason}); {len(revoked)} certificate(s) newly revoked"
          + ("".join(f"\n  {c.serial:x} {c.profile}" for c in revoked)))
    print("run 'devid crl' to publish new CRLs")
    return 0


def cmd_crl(args) -> int:
    data = _data(args).require()
    registry = data.open_registry()
    now = utcnow()
    names = [args.ca] if args.ca else list(CA_NAMES)
    infos = [build_crl(data.issuer(n), registry, now, validity=timedelta(days=data.config.crl_days)) for n in names]
    data.crl_dir.mkdir(exist_ok=True)
    bundle = b""
    for info in infos:
        pem = info.crl.public_bytes(serialization.Encoding.PEM)
        _write_output(str(data.crl_dir / f"{info.issuer}.crl.pem"), pem)
        bundle += pem
    if args.out:
        _write_output(args.out, bundle)
    rows = [(i.issuer, i.number, i.entries, output.ts(i.this_update), output.ts(i.next_update),
             data.crl_dir / f"{i.issuer}.crl.pem") for i in infos]
    out = sys.stderr if args.out == "-" else sys.stdout
    output.table(["ca", "crl number", "revoked", "this update", "next update", "file"], rows, out)
    return 0


def cmd_devices_list(args) -> int:
    data = _data(args).require()
    registry = data.open_registry(readonly=True)
    state = DeviceState(args.state) if args.state else None
    devices = registry.list_devices(state, limit=args.limit)
    if args.json:
        for d in devices:
            print(json.dumps(_device_dict(d)))
        return 0
    output.table(["serial", "type", "state", "created", "enrolled", "revoked"],
                 [(d.serial, d.device_type, d.state.value, output.ts(d.created_at),
                   output.ts(d.enrolled_at), output.ts(d.revoked_at)) for d in devices])
    counts = registry.count_devices()
    print(f"{len(devices)} shown; registry: " + ", ".join(f"{counts.get(s.value, 0)} {s.value}" for s in DeviceState))
    return 0


def cmd_devices_show(args) -> int:
    data = _data(args).require()
    registry = data.open_registry(readonly=True)
    dev = registry.get_device(check_serial(args.serial))
    if dev is None:
        raise CLIError(f"unknown device {args.serial}")
    certs = registry.certificates_for_device(dev.serial)
    d = _device_dict(dev, certs)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    for key in ("serial", "device_type", "state", "created_at", "updated_at", "enrolled_at", "revoked_at",
                "revocation_reason"):
        print(f"{key.replace('_', ' '):<18} {d[key] if d[key] is not None else '-'}")
    print()
    output.table(["certificate", "profile", "issuer", "status", "not before", "not after"],
                 [(c["serial"], c["profile"], c["issuer"], c["status"], c["not_before"], c["not_after"])
                  for c in d["certificates"]])
    return 0


def cmd_provision(args) -> int:
    data = _data(args).require()
    registry = data.open_registry()
    ca = data.authority(registry)
    progress = output.Progress("provisioning") if not args.quiet else None
    result = provision(ca, count=args.count, device_type=args.device_type, out=Path(args.out),
                       manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                       serial_prefix=args.serial_prefix, now=utcnow, progress=progress, workers=args.workers)
    if result.recovered or result.discarded:
        print(f"recovered {result.recovered} and discarded {result.discarded} bundle(s) left by an interrupted run")
    print(f"provisioned {len(result.serials)} factory identities ({result.serials[0]} .. {result.serials[-1]}) "
          f"of type {args.device_type} in {result.seconds:.2f} s: {result.rate:,.0f} identities/s -> {args.out}")
    return 0


# serve flags that set a ServerLimits field (default: devid.toml [gateway], else the field's default)
_LIMIT_FLAGS = ("max_sessions", "max_half_open", "max_half_open_per_address", "max_sessions_per_device",
                "handshake_timeout", "idle_timeout", "mtu", "ipv6_prefix_length", "max_half_open_per_ipv6_network",
                "ipv6_network_prefix_length", "handshake_burst_per_address",
                "handshake_rate_per_address")


def cmd_serve(args) -> int:
    import asyncio
    from devid.gateway.dtls.engine import LimitError, ServerLimits
    from devid.gateway.coap.transport import parse_listen
    from devid.gateway.system.logs import configure_logging
    from devid.gateway.app.server import GatewayConfig, serve
    listen = []
    for item in args.listen or []:
        try:
            listen.append(parse_listen(item))
        except ValueError as exc:
            raise CLIError(f"--listen {item}: {exc}") from None
    data = _data(args)
    flags = {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name) is not None}
    try:
        limits = ServerLimits(**{**data.config.gateway, **flags})     # flags win over devid.toml [gateway]
    except LimitError as exc:
        where = ("--" + exc.field.replace("_", "-")) if exc.field in flags else f"{data.config_path}: gateway.{exc.field}"
        print(f"devid: error: {where} must be {exc.allowed} (got {exc.value})", file=sys.stderr)
        return 2
    data.require()
    config = GatewayConfig(limits=limits)        # budgets from devid.toml
    if listen:
        config.listen = listen
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise CLIError("--workers must be at least 1")
    if args.log_file is not None:
        try:
            open(args.log_file, "a").close()        # one clear error here, not a traceback per worker
        except OSError as exc:
            raise CLIError(f"--log-file {args.log_file}: {exc.strerror}") from None
    if workers > 1:
        from devid.gateway.app.server import serve_workers
        data.issuer("gateway")          # a wrong passphrase is one clear error here, not N in the workers
        return serve_workers(data, config, workers, args.log_level, args.log_file)
    configure_logging(args.log_level, log_file=args.log_file)
    try:
        asyncio.run(serve(data, config))
        return 0
    except OSError as exc:
        raise CLIError(f"cannot listen: {exc.strerror or exc}") from None


def _firmware(args, directory):
    from devid.gateway.device.enroll import Firmware
    return Firmware.from_options(Path(directory), Path(args.firmware) if args.firmware else None,
                                 args.firmware_digest, args.firmware_name, args.firmware_version)


def cmd_enroll(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import EnrollFailed, enroll
    steps = ["nonce", "evidence", "enroll", "config"]

    def report(step, text):
        if not args.json:
            print(f"[{steps.index(step) + 1}/{len(steps)}] {step:<9} {text}", flush=True)
    try:
        firmware = _firmware(args, args.device)
        if firmware is None and not args.json:
            print("no firmware given: enrolling without attestation evidence (only for device types whose "
                  "policy waives it)", flush=True)
        result = asyncio.run(enroll(Path(args.device), args.gateway, firmware, timeout=args.timeout,
                                    report=report))
    except EnrollFailed as exc:
        raise CLIError(f"enrollment failed at step {exc.step}: {exc.reason}") from None
    if args.json:
        print(json.dumps({"serial": result.serial, "certificate_serial": format(result.certificate.serial_number, "x"),
                          "not_after": output.ts(result.certificate.not_valid_after_utc), "verdict": result.verdict,
                          "seconds": round(result.seconds, 3),
                          "steps_ms": {k: round(v * 1000, 1) for k, v in result.steps.items()}}))
    else:
        print(f"OK: device {result.serial} holds operational certificate {result.certificate.serial_number:x} "
              f"(op-key.pem, op-cert.pem, op-chain.pem, config.cbor, config.json in {args.device}) "
              f"in {result.seconds:.2f} s")
    return 0


def cmd_renew(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import EnrollFailed, renew
    try:
        cert = asyncio.run(renew(Path(args.device), args.gateway, timeout=args.timeout,
                                 report=lambda step, text: print(f"{step}: {text}", flush=True)))
    except EnrollFailed as exc:
        raise CLIError(f"renewal failed at step {exc.step}: {exc.reason}") from None
    print(f"OK: renewed; operational certificate {cert.serial_number:x} until {output.ts(cert.not_valid_after_utc)}")
    return 0


def cmd_simulate(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import EnrollFailed
    from devid.gateway.device.simulator import simulate
    root = Path(args.devices)
    bundles = sorted(p for p in root.iterdir() if (p / "cert.pem").exists()) if root.is_dir() else []
    if not bundles:
        raise CLIError(f"no device bundles in {root} (make some with 'devid provision')")
    if args.limit:
        bundles = bundles[:args.limit]
    try:
        firmware = {b: _firmware(args, b) for b in bundles}
    except EnrollFailed as exc:
        raise CLIError(f"{exc.step}: {exc.reason}") from None
    progress = output.Progress("simulating") if not args.json else None
    report = asyncio.run(simulate(args.gateway, bundles, firmware.get, concurrency=args.concurrency,
                                  timeout=args.timeout, renew_only=args.renew, progress=progress))
    summary = report.summary()
    if args.json:
        print(json.dumps(dict(summary, failures=report.failures)))
    else:
        print(f"{report.enrolled}/{report.devices} devices {'renewed' if args.renew else 'enrolled'} in "
              f"{report.seconds:.2f} s ({summary['enrollments_per_s']}/s); latency p50 "
              f"{summary['latency_ms']['p50']} ms, p95 {summary['latency_ms']['p95']} ms, "
              f"p99 {summary['latency_ms']['p99']} ms; {len(report.failures)} failed")
        for serial, reason in list(report.failures.items())[:10]:
            print(f"  {serial}: {reason}")
    return 0 if not report.failures else 1


def cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (bench_dir / "bench_enroll.py").exists():
        raise CLIError(f"the benchmarks are not here ({bench_dir}): run devid bench from a source checkout")
    sys.path.insert(0, str(bench_dir))
    import bench_enroll
    forwarded = list(args.bench_args)
    if args.data:
        forwarded += ["--data", args.data]
    return bench_enroll.main(forwarded)


def cmd_demo(args) -> int:
    from devid.gateway.cli.demo import run_demo
    return run_demo(_data(args), count=args.count)


# -- parser ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"data directory (default: ${ENV_DATA} or ./devid-data)")
    p = _Parser(prog="devid", parents=[common],
                description="devid: device identity gateway. Factory identities, attested enrollment over "
                            "CoAP/DTLS, operational certificates, revocation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    s = sub.add_parser("init", parents=[common], help="create the CA hierarchy, config and registry")
    s.add_argument("--hostname", action="append", metavar="NAME",
                   help="extra DNS name or IP address for the gateway certificate (repeatable)")
    s.add_argument("--org", metavar="NAME", help="organisation name in every subject (default: devid Example Org)")
    s.set_defaults(func=cmd_init)

    ca = sub.add_parser("ca", parents=[common], help="CA certificates and offline issuance")
    casub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True, parser_class=_Parser)
    s = casub.add_parser("cert", parents=[common], help="print a CA or gateway certificate as PEM")
    s.add_argument("name", choices=[*CA_NAMES, "gateway"])
    s.set_defaults(func=cmd_ca_cert)
    s = casub.add_parser("sign-csr", parents=[common], help="issue a certificate from a CSR (PEM or DER)")
    s.add_argument("--profile", required=True, choices=["operational", "factory"])
    s.add_argument("--device", required=True, metavar="SERIAL", help="device serial")
    s.add_argument("--device-type", metavar="TYPE", help="device type (only for --profile factory, which registers a new device)")
    s.add_argument("--csr", required=True, metavar="FILE", help="CSR file, PEM or DER ('-' for stdin)")
    s.add_argument("--out", metavar="FILE", help="write the certificate (PEM) here instead of stdout")
    s.set_defaults(func=cmd_ca_sign_csr)
    s = casub.add_parser("verify", parents=[common],
                         help="validate a device certificate: path to the CA, then revocation in the registry")
    s.add_argument("cert", metavar="FILE", help="PEM file: the device certificate, optionally followed by its chain")
    s.add_argument("--profile", choices=["factory", "operational"], default="factory")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ca_verify)

    s = sub.add_parser("revoke", parents=[common],
                       help="revoke a device and all its certificates, or one certificate (--certificate)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("serial", metavar="SERIAL", nargs="?", help="device serial: the device and all its certificates")
    g.add_argument("--certificate", metavar="SERIAL_OR_FINGERPRINT",
                   help="only this certificate: its serial (hex, as 'devid devices show' prints it) or its "
                        "SHA-256 fingerprint (hex), or a unique prefix of at least 8 digits; the device stays as it is")
    s.add_argument("--reason", default="unspecified", choices=list(REASONS))
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser("crl", parents=[common], help="sign a fresh CRL for each CA (written to DATA/crl/)")
    s.add_argument("--out", metavar="FILE", help="also write all CRLs as one PEM bundle here ('-' for stdout)")
    s.add_argument("--ca", choices=list(CA_NAMES), help="only this CA (default: root, manufacturing, operational)")
    s.set_defaults(func=cmd_crl)

    dv = sub.add_parser("devices", parents=[common], help="inspect the device registry")
    dvsub = dv.add_subparsers(dest="devices_command", metavar="ACTION", required=True, parser_class=_Parser)
    s = dvsub.add_parser("list", parents=[common], help="list devices")
    s.add_argument("--state", choices=[st.value for st in DeviceState])
    s.add_argument("--limit", type=output.positive_int, metavar="N")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_devices_list)
    s = dvsub.add_parser("show", parents=[common], help="one device with its certificates")
    s.add_argument("serial", metavar="SERIAL")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices_show)

    s = sub.add_parser("provision", parents=[common], help="create factory identities (IDevID) for new devices")
    s.add_argument("--count", type=int, required=True, metavar="N")
    s.add_argument("--device-type", required=True, metavar="TYPE", help="e.g. temperature-sensor")
    s.add_argument("--out", required=True, metavar="DIR", help="one bundle directory per device is made here")
    s.add_argument("--serial-prefix", default=DEFAULT_PREFIX, metavar="P",
                   help=f"serials are P followed by a sequence number (default: {DEFAULT_PREFIX})")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes building and writing bundles (default: one per CPU)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.set_defaults(func=cmd_provision)

    s = sub.add_parser("serve", parents=[common], help="run the CoAP/DTLS gateway (coaps://, default port 5684)",
                       description="Run the gateway. Each limit flag overrides the same key of devid.toml's "
                                   "[gateway] section (docs/configuration.md).")
    s.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (repeatable; default: 0.0.0.0:5684 and [::]:5684)")
    s.add_argument("--max-sessions", type=int, metavar="N", help="cap on DTLS sessions (default 20000)")
    s.add_argument("--max-half-open", type=int, metavar="N", help="cap on handshakes in progress (default 1000)")
    s.add_argument("--max-half-open-per-address", type=int, metavar="N",
                   help="cap on handshakes in progress from one IP address (default 100, at most --max-half-open)")
    s.add_argument("--max-sessions-per-device", type=int, metavar="N",
                   help="cap on sessions of one device, all its certificates together; a new one closes its "
                        "oldest (default 8)")
    s.add_argument("--max-sessions-per-identity", type=int, dest="max_sessions_per_device",
                   action=_Deprecated, new="--max-sessions-per-device", help=argparse.SUPPRESS)
    s.add_argument("--handshake-timeout", type=float, metavar="S", help="seconds (default 30)")
    s.add_argument("--idle-timeout", type=float, metavar="S", help="seconds (default 600)")
    s.add_argument("--mtu", type=int, help="largest datagram sent (default 1280)")
    s.add_argument("--ipv6-prefix-length", type=int, metavar="BITS",
                   help="IPv6 peers in one prefix of this length count as one address (default 64)")
    s.add_argument("--max-half-open-per-ipv6-network", type=int, metavar="N",
                   help="cap on handshakes in progress from one IPv6 network, all its /64s together (default 300)")
    s.add_argument("--ipv6-network-prefix-length", type=int, metavar="BITS",
                   help="the IPv6 network of that cap (default 48)")
    s.add_argument("--handshake-burst-per-address", type=int, metavar="N",
                   help="new handshakes one address may start at once (default 1000)")
    s.add_argument("--handshake-rate-per-address", type=float, metavar="R",
                   help="new handshakes per second one address may start after its burst (default 100)")
    s.add_argument("--workers", type=output.positive_int, metavar="N",
                   help="gateway processes sharing the port (SO_REUSEPORT) and the registry (default: one per core)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--log-file", metavar="PATH",
                   help="append the log lines (one JSON object each) to PATH instead of stderr")
    s.set_defaults(func=cmd_serve)

    def device_flags(s, firmware=True):
        s.add_argument("--gateway", required=True, metavar="coaps://HOST[:PORT]", help="the gateway to talk to")
        s.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per step (default 30)")
        if firmware:
            g = s.add_mutually_exclusive_group()
            g.add_argument("--firmware", metavar="FILE", help="the running firmware image (hashed with SHA-256)")
            g.add_argument("--firmware-digest", metavar="HEX", help="its digest, hex (sha-256/384/512 by length)")
            s.add_argument("--firmware-name", metavar="NAME", help="firmware name for the evidence (swname)")
            s.add_argument("--firmware-version", metavar="V", help="firmware version for the evidence (swversion)")

    s = sub.add_parser("enroll", help="enroll a device: attest, get an operational identity "
                                                       "and its configuration (field engineer's script)")
    device_flags(s)
    s.add_argument("--device", required=True, metavar="DIR", help="the device's bundle from 'devid provision'")
    s.add_argument("--json", action="store_true", help="print one JSON summary instead of the steps")
    s.set_defaults(func=cmd_enroll)

    s = sub.add_parser("renew", help="renew a device's operational certificate (EST /sren)")
    device_flags(s, firmware=False)
    s.add_argument("--device", required=True, metavar="DIR")
    s.set_defaults(func=cmd_renew)

    s = sub.add_parser("simulate", help="run many simulated devices through enrollment")
    device_flags(s)
    s.add_argument("--devices", required=True, metavar="DIR", help="directory of bundles from 'devid provision'")
    s.add_argument("--concurrency", type=int, default=16, metavar="C", help="devices in flight (default 16)")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N devices")
    s.add_argument("--renew", action="store_true", help="renew enrolled devices instead of enrolling")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("bench", parents=[common], add_help=False,
                       help="fleet enrollment benchmark (JSON summary); 'devid bench --help' for its options")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("demo", parents=[common],
                       help="the main job on the embedded default: init if needed, provision, issue, list")
    s.add_argument("--count", type=int, default=5, metavar="N", help="devices to provision (default: 5)")
    s.set_defaults(func=cmd_demo)

    attest_cli.add_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:          # its own option parser (benchmarks/bench_enroll.py)
        try:
            return cmd_bench(argparse.Namespace(bench_args=argv[1:], data=None))
        except CLIError as exc:
            print(f"devid: error: {exc}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "data"):
        args.data = None
    try:
        return args.func(args)
    except (CAError, GatewayError, AttestationError) as exc:
        print(f"devid: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"devid: error: registry: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as exc:        # e.g. --out names a file, a full disk, a directory we may not write
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"devid: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
