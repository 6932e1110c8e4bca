"""`devid revoke`, `devid crl` and `devid devices ...`: the device registry: revoke devices or
certificates, publish CRLs, list and show devices."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

from cryptography.hazmat.primitives import serialization

from devid.ca.errors import InvalidSerial
from devid.ca.hierarchy import CA_NAMES
from devid.ca.identity import check_serial
from devid.ca.revocation import (REASONS, UnknownCertificate, build_crl, find_certificate, revoke_certificate,
                                 revoke_device)
from devid.ca.store import DeviceState

from devid.gateway.cli import output
from devid.gateway.cli.base import Parser, data_dir, utcnow, write_output
from devid.gateway.errors import CLIError

CRL_HINT = "run 'devid crl' to publish new CRLs"


def _cert_dict(c) -> dict:
    return {"serial": output.format_serial(c.serial), "profile": c.profile, "issuer": c.issuer,
            "status": c.status.value, "not_before": output.ts(c.not_before), "not_after": output.ts(c.not_after),
            "sha256_fingerprint": c.fingerprint, "revoked_at": output.ts(c.revoked_at) if c.revoked_at else None,
            "revocation_reason": c.revocation_reason}


def _device_dict(dev, certs=None) -> dict:
    d = {"serial": dev.serial, "device_type": dev.device_type, "state": dev.state.value,
         "created_at": output.ts(dev.created_at), "updated_at": output.ts(dev.updated_at),
         "enrolled_at": output.ts(dev.enrolled_at) if dev.enrolled_at else None,
         "revoked_at": output.ts(dev.revoked_at) if dev.revoked_at else None,
         "revocation_reason": dev.revocation_reason}
    if certs is not None:
        d["certificates"] = [_cert_dict(c) for c in certs]
    return d


def _when(revoked_at, reason) -> str:
    return (f" on {output.ts(revoked_at)}" if revoked_at else "") + (f" ({reason})" if reason else "")


def cmd_revoke(args) -> int:
    data = data_dir(args).require()
    registry = data.open_registry()
    if args.certificate is not None:
        return _revoke_certificate(args, registry)
    before = registry.get_device(check_serial(args.serial))
    revoked = revoke_device(registry, args.serial, args.reason, utcnow())
    after = registry.get_device(args.serial)
    already = before is not None and before.state is DeviceState.REVOKED
    if args.json:
        output.emit({"ok": True, "device": args.serial, "state": after.state.value, "already_revoked": already,
                     "revoked_at": output.ts(after.revoked_at), "revocation_reason": after.revocation_reason,
                     "newly_revoked": [{"serial": output.format_serial(c.serial), "profile": c.profile,
                                        "issuer": c.issuer} for c in revoked]})
        return 0
    listed = "".join(f"\n  {output.format_serial(c.serial)} {c.profile}" for c in revoked)
    if already:
        print(f"device {args.serial} was already revoked{_when(after.revoked_at, after.revocation_reason)}; "
              + (f"{len(revoked)} more certificate(s) of it newly revoked{listed}" if revoked else "nothing changed"))
    else:
        print(f"device {args.serial} revoked ({after.revocation_reason}); {len(revoked)} certificate(s) newly "
              f"revoked{listed}")
    if revoked:
        print(CRL_HINT)
    return 0


def _revoke_certificate(args, registry) -> int:
    done = revoke_certificate(registry, args.certificate, args.reason, utcnow())
    c = registry.get_certificate(done.certificate.serial)
    device = registry.get_device(c.device_serial)
    serial = output.format_serial(c.serial)
    if args.json:
        output.emit({"ok": True, "certificate": {"serial": serial, "profile": c.profile, "issuer": c.issuer,
                                                 "device": c.device_serial, "sha256_fingerprint": c.fingerprint},
                     "already_revoked": not done.newly, "revoked_at": output.ts(c.revoked_at),
                     "revocation_reason": c.revocation_reason, "device_state": device.state.value})
        return 0
    what = f"certificate {serial} ({c.profile}, device {c.device_serial})"
    if not done.newly:
        print(f"{what} was already revoked{_when(c.revoked_at, c.revocation_reason)}; nothing changed")
        return 0
    print(f"{what} revoked ({c.revocation_reason}); device {c.device_serial} stays {device.state.value}")
    print(CRL_HINT)
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
    to_stdout = args.out == "-"
    if args.out and not (to_stdout and args.json):
        write_output(args.out, bundle)
    if args.json:
        output.emit({"ok": True, "crls": [{
            "ca": i.issuer, "crl_number": i.number, "revoked": i.entries, "this_update": output.ts(i.this_update),
            "next_update": output.ts(i.next_update), "file": str(data.crl_dir / f"{i.issuer}.crl.pem")} for i in infos],
            "out": args.out if args.out and not to_stdout else None,
            **({"pem": bundle.decode()} if to_stdout else {})})
        return 0
    rows = [(i.issuer, i.number, i.entries, output.ts(i.this_update), output.ts(i.next_update),
             data.crl_dir / f"{i.issuer}.crl.pem") for i in infos]
    out = sys.stderr if to_stdout else sys.stdout
    output.table(["ca", "crl number", "revoked", "this update", "next update", "file"], rows, out)
    return 0


def _expiring(registry, state, within: timedelta, limit: int | None) -> list:
    """Devices whose current operational certificate expires within `within` (overdue ones too),
    by the operator API's query (gateway/store/fleet.py), read in pages by serial."""
    from devid.gateway.store.fleet import Fleet
    fleet, before, found, after = Fleet(registry), utcnow() + within, [], None
    while True:
        want = 1000 if limit is None else min(1000, limit - len(found))
        if want <= 0:
            break
        page = fleet.devices(state=state, expiring_before=before, after=after, limit=want)
        found += page
        if len(page) < want:
            break
        after = page[-1].device.serial
    return found


def cmd_devices_list(args) -> int:
    data = data_dir(args).require()
    registry = data.open_registry(readonly=True)
    state = DeviceState(args.state) if args.state else None
    expires = None
    if args.expiring_within is not None:
        from devid.gateway.operator.params import BadParameter, duration
        try:
            within = duration(args.expiring_within)
        except BadParameter as exc:
            raise CLIError(f"--expiring-within {args.expiring_within}: {exc.args[0].partition(': ')[2]}") from exc
        rows = _expiring(registry, state, within, args.limit)
        devices, expires = [r.device for r in rows], {r.device.serial: r.expires for r in rows}
    else:
        devices = registry.list_devices(state, limit=args.limit)
    counts = registry.count_devices()
    totals = {s.value: counts.get(s.value, 0) for s in DeviceState}
    if args.json:
        docs = [_device_dict(d) for d in devices]
        if expires is not None:
            for doc, d in zip(docs, devices):
                doc["certificate_expires"] = output.ts(expires[d.serial])
        output.emit({"ok": True, "devices": docs, "registry": totals})
        return 0
    if expires is not None:
        output.table(["serial", "type", "state", "enrolled", "certificate expires"],
                     [(d.serial, d.device_type, d.state.value, output.ts(d.enrolled_at), output.ts(expires[d.serial]))
                      for d in devices])
    else:
        output.table(["serial", "type", "state", "created", "enrolled", "revoked"],
                     [(d.serial, d.device_type, d.state.value, output.ts(d.created_at),
                       output.ts(d.enrolled_at), output.ts(d.revoked_at)) for d in devices])
    print(f"{len(devices)} shown; registry: " + ", ".join(f"{n} {s}" for s, n in totals.items()))
    return 0


def find_device(registry, text: str):
    """The device `text` names: its serial, or one of its certificates by serial (hex as openssl
    prints it; case, colons and leading zeros do not matter) or SHA-256 fingerprint (hex, with or
    without colons), or a unique prefix of either of at least 8 digits. Returns (device, the
    certificate it was found by or None)."""
    try:
        dev = registry.get_device(check_serial(text))
    except InvalidSerial:
        dev = None
    if dev is not None:
        return dev, None
    try:
        cert = find_certificate(registry, text)
    except UnknownCertificate:
        raise CLIError(f"unknown device {text!r}: no device with that serial, and no certificate with that "
                       "serial or SHA-256 fingerprint") from None
    if cert.device_serial is None:
        raise CLIError(f"certificate {output.format_serial(cert.serial)} is a {cert.profile} certificate (issued by "
                       f"the {cert.issuer} CA), not a device's")
    return registry.get_device(cert.device_serial), cert


def cmd_devices_show(args) -> int:
    data = data_dir(args).require()
    registry = data.open_registry(readonly=True)
    dev, by = find_device(registry, args.serial)
    if dev is None:
        raise CLIError(f"unknown device {args.serial}")
    d = _device_dict(dev, registry.certificates_for_device(dev.serial))
    if by is not None:
        d["found_by_certificate"] = output.format_serial(by.serial)
    if args.json:
        output.emit({"ok": True, **d})
        return 0
    for key in ("serial", "device_type", "state", "created_at", "updated_at", "enrolled_at", "revoked_at",
                "revocation_reason", "found_by_certificate"):
        if key in d:
            print(f"{key.replace('_', ' '):<20} {d[key] if d[key] is not None else '-'}")
    print()
    output.table(["certificate", "profile", "issuer", "status", "not before", "not after"],
                 [(c["serial"], c["profile"], c["issuer"], c["status"], c["not_before"], c["not_after"])
                  for c in d["certificates"]])
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("revoke", parents=[common],
                       help="revoke a device and all its certificates, or one certificate (--certificate); "
                            "revoking again changes nothing and says so (exit 0)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("serial", metavar="SERIAL", nargs="?", help="device serial: the device and all its certificates")
    g.add_argument("--certificate", metavar="SERIAL_OR_FINGERPRINT",
                   help="only this certificate: its serial (hex, as 'devid devices show' and 'openssl x509 -serial' "
                        "print it) or its SHA-256 fingerprint (hex, colons optional), or a unique prefix of at least "
                        "8 digits; the device stays as it is")
    s.add_argument("--reason", default="unspecified", choices=list(REASONS))
    s.add_argument("--json", action="store_true", help="one JSON document, with \"already_revoked\"")
    s.set_defaults(func=cmd_revoke)

    s = sub.add_parser("crl", parents=[common], help="sign a fresh CRL for each CA (written to DATA/crl/)")
    s.add_argument("--out", metavar="FILE", help="also write all CRLs as one PEM bundle here ('-' for stdout)")
    s.add_argument("--ca", choices=list(CA_NAMES), help="only this CA (default: root, manufacturing, operational)")
    s.add_argument("--json", action="store_true", help="one JSON document (with --out -: the PEM bundle in it)")
    s.set_defaults(func=cmd_crl)

    dv = sub.add_parser("devices", parents=[common], help="inspect the device registry")
    dvsub = dv.add_subparsers(dest="devices_command", metavar="ACTION", required=True, parser_class=Parser)
    s = dvsub.add_parser("list", parents=[common], help="list devices")
    s.add_argument("--state", choices=[st.value for st in DeviceState])
    s.add_argument("--limit", type=output.positive_int, metavar="N")
    s.add_argument("--expiring-within", metavar="DURATION",
                   help="only devices whose current operational certificate expires within DURATION (30d, 12h, "
                        "2w; a bare number is days), those already expired included")
    s.add_argument("--json", action="store_true", help="one JSON document: the devices and the registry's totals")
    s.set_defaults(func=cmd_devices_list)
    s = dvsub.add_parser("show", parents=[common], help="one device with its certificates")
    s.add_argument("serial", metavar="SERIAL",
                   help="the device's serial, or a certificate's serial (hex as openssl prints it) or SHA-256 "
                        "fingerprint (hex, colons optional)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_devices_show)
