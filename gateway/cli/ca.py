"""`devid init` and `devid ca ...`: create the CA hierarchy; print, issue from a CSR and verify certificates."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cryptography import x509

from devid.ca.hierarchy import CA_NAMES
from devid.ca.validation import DeviceVerifier

from devid.gateway.app.datadir import ENV_PASSPHRASE
from devid.gateway.cli import output
from devid.gateway.cli.base import Parser, data_dir, read_input, utcnow, write_output
from devid.gateway.errors import CLIError


def cmd_init(args) -> int:
    data = data_dir(args)
    generated = not (args.passphrase_file and Path(args.passphrase_file).exists())
    data.init(utcnow(), hostnames=args.hostname or (), organization=args.org, passphrase_file=args.passphrase_file)
    data.require()
    print(f"created CA in {data.path}")
    for name in (*CA_NAMES, "gateway"):
        cert = data.cert(name)
        print(f"  {name:<14} {cert.subject.rfc4514_string():<48} until {output.ts(cert.not_valid_after_utc)}")
    if os.environ.get(ENV_PASSPHRASE):
        print(f"  CA keys are encrypted with ${ENV_PASSPHRASE} (scrypt)")
    elif args.passphrase_file and data.secret_path.exists() and not generated:
        print(f"  CA keys are encrypted with the passphrase in {data.secret_path} (scrypt)")
    else:
        print(f"  CA keys are encrypted with the generated passphrase in {data.secret_path} (mode 0600)")
    return 0


def cmd_ca_cert(args) -> int:
    data = data_dir(args).require()
    sys.stdout.buffer.write(data.cert_pem(args.name))
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
    write_output(args.out, issued.pem)
    if args.out and args.out != "-":
        print(f"issued {args.profile} certificate {issued.cert.serial_number:x} for device {args.device} "
              f"-> {args.out}", file=sys.stderr)
    return 0


def cmd_ca_verify(args) -> int:
    data = data_dir(args).require()
    pem = read_input(args.cert, "certificate")
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


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("init", parents=[common], help="create the CA hierarchy, config and registry")
    s.add_argument("--hostname", action="append", metavar="NAME",
                   help="extra DNS name or IP address for the gateway certificate (repeatable)")
    s.add_argument("--org", metavar="NAME", help="organisation name in every subject (default: devid Example Org)")
    s.add_argument("--passphrase-file", metavar="FILE", type=Path,
                   help="keep the CA passphrase in FILE, outside the data directory (mode 0600): read from it if it "
                        "exists (your passphrase, stretched with scrypt), else a generated one is written there "
                        "(default: DATA/ca/passphrase, or $DEVID_CA_PASSPHRASE)")
    s.set_defaults(func=cmd_init)

    ca = sub.add_parser("ca", parents=[common], help="CA certificates and offline issuance")
    casub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True, parser_class=Parser)
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
