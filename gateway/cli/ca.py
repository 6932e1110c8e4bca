"""`devid init` and `devid ca ...`: create the CA hierarchy; print, issue from a CSR and verify certificates."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509

from devid.ca.errors import CAError
from devid.ca.hierarchy import CA_NAMES
from devid.ca.validation import DeviceVerifier

from devid.gateway.app.datadir import ENV_PASSPHRASE, ENV_REGISTRY
from devid.gateway.cli import output
from devid.gateway.cli.base import Parser, data_dir, read_input, utcnow, write_output
from devid.gateway.errors import CLIError

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def hostname(text: str) -> str:
    """argparse type for --hostname: an IP address, or a DNS name (letters, digits, hyphens;
    dot-separated labels of 1-63 characters; at most 253 in all)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().removesuffix(".")
    if not name.isascii():
        raise argparse.ArgumentTypeError(f"invalid host name {text!r}: give an internationalised name in its "
                                         "ASCII form (xn--...)")
    if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise argparse.ArgumentTypeError(f"invalid host name {text!r}: use an IP address or a DNS name of letters, "
                                         "digits and hyphens in dot-separated labels")
    return name


def _passphrase_source(args, data, generated: bool) -> dict:
    if os.environ.get(ENV_PASSPHRASE):
        return {"source": "environment", "variable": ENV_PASSPHRASE, "file": None}
    return {"source": "generated" if generated else "file", "file": str(data.secret_path)}


def _key_places(data, names) -> dict:
    """Where each key is: {"store": "pkcs11", "uri": ...} (no PIN in it) or {"store": "file", "path": ...}."""
    places = {}
    for name in names:
        if data.in_token(name):
            places[name] = {"store": "pkcs11", "uri": str(data.issuer(name).key.uri)}
        else:
            places[name] = {"store": "file", "path": str(data.key_path(name))}
    return places


def cmd_join(args) -> int:
    if args.ca_from is None:
        raise CLIError("--join needs --ca-from DIR: a copy of the first host's DATA/ca")
    for flag, value in (("--hostname", args.hostname), ("--org", args.org), ("--passphrase-file", args.passphrase_file),
                        ("--pkcs11", args.pkcs11)):
        if value:
            raise CLIError(f"{flag}: a joining host takes the first host's CA and settings from the registry")
    os.environ[ENV_REGISTRY] = args.join
    data = data_dir(args)
    summary = data.join(args.ca_from, registry_password_file=args.registry_password_file)
    data.require()
    if args.json:
        output.emit({"ok": True, "data": str(data.path), "config": str(data.config_path),
                     "registry": data.registry_name, "joined": True,
                     "psk_secret": summary.get("psk_secret", False),
                     "certificates": {name: output.cert_json(data.cert(name)) for name in summary["certificates"]}})
        return 0
    print(f"joined {data.registry_name} in {data.path}: no CA created")
    for name in summary["certificates"]:
        cert = data.cert(name)
        print(f"  {name:<14} {cert.subject.rfc4514_string():<48} until {output.ts(cert.not_valid_after_utc)}")
    if summary.get("psk_secret"):
        print("  psk.secret     copied (the PSKs of devices provisioned with --psk)")
    return 0


def cmd_init(args) -> int:
    if args.join:
        return cmd_join(args)
    if args.ca_from is not None:
        raise CLIError("--ca-from is for --join URL (another gateway host of a shared registry)")
    data = data_dir(args)
    generated = not (args.passphrase_file and Path(args.passphrase_file).exists())
    data.init(utcnow(), hostnames=args.hostname or (), organization=args.org, passphrase_file=args.passphrase_file,
              registry_password_file=args.registry_password_file, pkcs11=args.pkcs11)
    data.require()
    names = (*CA_NAMES, "gateway")
    in_token = [n for n in names if data.in_token(n)]
    passphrase = _passphrase_source(args, data, generated)
    if args.json:
        output.emit({"ok": True, "data": str(data.path), "config": str(data.config_path),
                     "registry": data.registry_name, "organization": data.config.identity.organization,
                     "certificates": {name: output.cert_json(data.cert(name)) for name in names},
                     "passphrase": passphrase, "keys": _key_places(data, names)})
        return 0
    print(f"created CA in {data.path}" + (f" (registry {data.registry_name})"
                                          if data.config.registry_url else ""))
    for name in names:
        cert = data.cert(name)
        print(f"  {name:<14} {cert.subject.rfc4514_string():<48} until {output.ts(cert.not_valid_after_utc)}")
    what = "CA keys are"
    if in_token:
        token = data.issuer(in_token[0]).key.token.uri
        print(f"  {', '.join(in_token)} keys are in PKCS#11 {token.token_label} (generated there, never extractable)")
        what = "the gateway's DTLS key is"
    if passphrase["source"] == "environment":
        print(f"  {what} encrypted with ${ENV_PASSPHRASE} (scrypt)")
    elif passphrase["source"] == "file":
        print(f"  {what} encrypted with the passphrase in {data.secret_path} (scrypt)")
    else:
        print(f"  {what} encrypted with the generated passphrase in {data.secret_path} (mode 0600)")
    return 0


def cmd_ca_cert(args) -> int:
    data = data_dir(args).require()
    pem = data.cert_pem(args.name)
    if args.json:
        output.emit({"ok": True, "name": args.name, **output.cert_json(data.cert(args.name)), "pem": pem.decode()})
        return 0
    sys.stdout.buffer.write(pem)
    return 0


def cmd_ca_sign_csr(args) -> int:
    data = data_dir(args).require()
    csr = read_input(args.csr, "CSR")
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
    to_file = args.out is not None and args.out != "-"
    if args.json:
        if to_file:
            write_output(args.out, issued.pem)
        output.emit({"ok": True, "profile": args.profile, "device": args.device,
                     "certificate": output.cert_json(issued.cert), "out": args.out if to_file else None,
                     **({} if to_file else {"pem": issued.pem.decode()})})
        return 0
    write_output(args.out, issued.pem)
    if to_file:
        print(f"issued {args.profile} certificate {output.format_serial(issued.cert.serial_number)} for device "
              f"{args.device} -> {args.out}", file=sys.stderr)
    return 0


def cmd_ca_verify(args) -> int:
    data = data_dir(args).require()
    pem = read_input(args.cert, "certificate")
    invalid = {"valid": False, "profile": args.profile}
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(pem)]
        except ValueError:
            raise output.CommandFailed(f"{args.cert}: not a PEM or DER certificate", invalid) from None
    registry = data.open_registry(readonly=True)
    leaf, intermediates = certs[0], certs[1:]
    anchor = "manufacturing" if args.profile == "factory" else "operational"
    verifier = DeviceVerifier(data.cert(anchor), args.profile, data.config.identity, registry)
    try:
        identity = verifier.verify(leaf, intermediates, now=utcnow())
    except CAError as exc:                  # path, registry, revocation, the identity in the certificate
        raise output.CommandFailed(str(exc), {**invalid, "certificate": output.cert_json(leaf)}) from None
    serial = output.format_serial(identity.certificate_serial)
    if args.json:
        output.emit({"ok": True, "valid": True, "profile": args.profile, **identity.as_dict(),
                     "certificate_serial": serial})
    else:
        print(f"OK: {args.profile} identity of device {identity.serial} ({identity.device_type}), "
              f"certificate {serial}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("init", parents=[common], help="create the CA hierarchy, config and registry")
    s.add_argument("--hostname", action="append", metavar="NAME", type=hostname,
                   help="extra DNS name or IP address for the gateway certificate (repeatable)")
    s.add_argument("--org", metavar="NAME",
                   help="organisation name in every subject, exactly as given: 1-64 characters, no control "
                        "characters (default: devid Example Org)")
    s.add_argument("--passphrase-file", metavar="FILE", type=Path,
                   help="keep the CA passphrase in FILE, outside the data directory (mode 0600): read from it if it "
                        "exists (your passphrase, stretched with scrypt), else a generated one is written there "
                        "(default: DATA/ca/passphrase, or $DEVID_CA_PASSPHRASE)")
    s.add_argument("--registry-password-file", metavar="FILE", type=Path,
                   help="with --registry or --join: the PostgreSQL registry's password is in FILE (mode 0600); "
                        "devid.toml names the file, never the password")
    s.add_argument("--pkcs11", metavar="URI",
                   help="generate the root, manufacturing and operational CA keys inside the PKCS#11 token the RFC "
                        "7512 URI names (e.g. pkcs11:token=devid-ca?module-path=/usr/lib/softhsm/libsofthsm2.so); "
                        "they never leave it and it makes every signature. PIN: the URI's pin-source=file:PATH "
                        "(mode 0600) or $DEVID_PKCS11_PIN, never pin-value. The gateway's DTLS key stays an "
                        "encrypted file (docs/certificates.md)")
    s.add_argument("--join", metavar="URL",
                   help="make this data directory another gateway host of the PostgreSQL registry at URL, from "
                        "that registry and a copy of the first host's CA files (--ca-from); creates no CA "
                        "(docs/scale-out.md)")
    s.add_argument("--ca-from", metavar="DIR", type=Path,
                   help="with --join: a copy of the first host's DATA/ca (certificates, encrypted keys, and its "
                        "passphrase file unless $DEVID_CA_PASSPHRASE is set)")
    s.add_argument("--json", action="store_true", help="one JSON document (docs/cli.md)")
    s.set_defaults(func=cmd_init)

    ca = sub.add_parser("ca", parents=[common], help="CA certificates and offline issuance")
    casub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True, parser_class=Parser)
    s = casub.add_parser("cert", parents=[common], help="print a CA or gateway certificate as PEM")
    s.add_argument("name", choices=[*CA_NAMES, "gateway"])
    s.add_argument("--json", action="store_true", help="one JSON document: subject, serial, fingerprint, PEM")
    s.set_defaults(func=cmd_ca_cert)
    s = casub.add_parser("sign-csr", parents=[common], help="issue a certificate from a CSR (PEM or DER)")
    s.add_argument("--profile", required=True, choices=["operational", "factory"])
    s.add_argument("--device", required=True, metavar="SERIAL", help="device serial")
    s.add_argument("--device-type", metavar="TYPE", help="device type (only for --profile factory, which registers a new device)")
    s.add_argument("--csr", required=True, metavar="FILE", help="CSR file, PEM or DER ('-' for stdin)")
    s.add_argument("--out", metavar="FILE", help="write the certificate (PEM) here instead of stdout")
    s.add_argument("--json", action="store_true",
                   help="one JSON document (the certificate's PEM in it unless --out names a file)")
    s.set_defaults(func=cmd_ca_sign_csr)
    s = casub.add_parser("verify", parents=[common],
                         help="validate a device certificate: path to the CA, then revocation in the registry")
    s.add_argument("cert", metavar="FILE", help="PEM file: the device certificate, optionally followed by its chain")
    s.add_argument("--profile", choices=["factory", "operational"], default="factory")
    s.add_argument("--json", action="store_true", help="one JSON document, with \"valid\", also when invalid")
    s.set_defaults(func=cmd_ca_verify)
