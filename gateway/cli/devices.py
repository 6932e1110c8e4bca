"""`devid revoke`, `devid crl` and `devid devices ...`: the device registry: revoke devices or
certificates, publish CRLs, list and show devices."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta

from cryptography.hazmat.primitives import serialization

from devid.ca.hierarchy import CA_NAMES
from devid.ca.identity import check_serial
from devid.ca.revocation import REASONS, build_crl, revoke_certificate, revoke_device
from devid.ca.store import DeviceState

from devid.gateway.cli import output
from devid.gateway.cli.base import Parser, data_dir, utcnow, write_output
from devid.gateway.errors import CLIError


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


def cmd_revoke(args) -> int:
    data = data_dir(args).require()
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
    data = data_dir(args).require()
    registry = data.open_registry()
    now = utcnow()
    names = [args.ca] if args.ca else list(CA_NAMES)
    infos = [build_crl(data.issuer(n), registry, now, validity=timedelta(days=data.config.crl_days)) for n in names]
    data.crl_dir.mkdir(exist_ok=True)
    bundle = b""
    for info in infos:
        pem = info.crl.public_bytes(serialization.Encoding.PEM)
        write_output(str(data.crl_dir / f"{info.issuer}.crl.pem"), pem)
        bundle += pem
    if args.out:
        write_output(args.out, bundle)
    rows = [(i.issuer, i.number, i.entries, output.ts(i.this_update), output.ts(i.next_update),
             data.crl_dir / f"{i.issuer}.crl.pem") for i in infos]
    out = sys.stderr if args.out == "-" else sys.stdout
    output.table(["ca", "crl number", "revoked", "this update", "next update", "file"], rows, out)
    return 0


def cmd_devices_list(args) -> int:
    data = data_dir(args).require()
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
    data = data_dir(args).require()
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


def add_commands(sub, common: argparse.ArgumentParser) -> None:
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
    dvsub = dv.add_subparsers(dest="devices_command", metavar="ACTION", required=True, parser_class=Parser)
    s = dvsub.add_parser("list", parents=[common], help="list devices")
    s.add_argument("--state", choices=[st.value for st in DeviceState])
    s.add_argument("--limit", type=output.positive_int, metavar="N")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.set_defaults(func=cmd_devices_list)
    s = dvsub.add_parser("show", parents=[common], help="one device with its certificates")
    s.add_argument("serial", metavar="SERIAL")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices_show)
