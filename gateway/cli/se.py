"""`devid se`: the device-side commands for a device whose keys are in a secure element (a bundle
from `devid provision --secure-element`), run beside libcoap's coap-client-gnutls, which makes
the DTLS handshake with the token's keys (docs/enrollment.md, "A device with its keys in a secure
element (PKCS#11)"):

    devid se show       the token's objects for this device, and the URIs to give coap-client
    devid se evidence   evidence for a server nonce, signed by the factory key in the token
    devid se csr        the operational key, made in the token, and its CSR (evidence inside with --nonce)
    devid se store      the issued operational certificate, into the token and the bundle

The PIN: $DEVID_PKCS11_PIN, or pin-source=file:PATH in a --token URI. Never printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.errors import CLIError
from devid.gateway.system.fs import write_atomic


def _device(args):
    from devid.gateway.device.secure_element import SecureDevice
    return SecureDevice.open(Path(args.device), args.token)


def _firmware(args):
    from devid.gateway.device.enroll import EnrollFailed, Firmware
    try:
        return Firmware.from_options(Path(args.device), Path(args.firmware) if args.firmware else None,
                                     args.firmware_digest, args.firmware_name, args.firmware_version)
    except EnrollFailed as exc:
        raise CLIError(f"{exc.step}: {exc.reason}") from None


def _nonce(args) -> bytes:
    from devid.gateway.device.secure_element import read_nonce_file
    return read_nonce_file(Path(args.nonce))


def _write(path: str, data: bytes) -> None:
    write_atomic(Path(path), data)


def cmd_show(args) -> int:
    status = _device(args).status()
    if args.json:
        output.emit({"ok": True, **status})
        return 0
    key = status["factory_key"]
    print(f"device {status['serial']} in {status['token']}")
    print(f"  factory key: sensitive={key['sensitive']} extractable={key['extractable']} "
          f"never_extractable={key['never_extractable']}")
    print(f"  factory certificate stored: {status['factory_certificate_stored']}; CA certificate stored: "
          f"{status['ca_certificate_stored']}, trusted: {status['ca_certificate_trusted']}")
    print(f"  operational certificate: {status['operational_certificate']}; pending operational key: "
          f"{status['pending_operational_key']}")
    for name, uri in status["uris"].items():
        print(f"  {name}: {uri}")
    return 0


def cmd_evidence(args) -> int:
    firmware = _firmware(args)
    if firmware is None:
        raise CLIError("no firmware to claim: give --firmware or --firmware-digest (or DIR/firmware.json)")
    token = _device(args).evidence(_nonce(args), firmware)
    _write(args.out, token)
    if args.json:
        output.emit({"ok": True, "out": args.out, "bytes": len(token)})
    else:
        print(f"evidence ({len(token)} bytes, signed by the factory key in the token) -> {args.out}")
    return 0


def cmd_csr(args) -> int:
    device = _device(args)
    nonce = firmware = None
    if args.nonce:
        firmware = _firmware(args)
        if firmware is None:
            raise CLIError("--nonce: evidence needs the firmware it claims: give --firmware or --firmware-digest "
                           "(or DIR/firmware.json)")
        nonce = _nonce(args)
    csr, key = device.operational_csr(nonce, firmware)
    _write(args.out, csr)
    label = key.label
    if args.json:
        output.emit({"ok": True, "out": args.out, "key_label": label, "evidence": nonce is not None})
    else:
        inside = "with evidence inside" if nonce is not None else "without evidence"
        print(f"CSR ({inside}) for the operational key '{label}' in the token -> {args.out}")
    return 0


def cmd_store(args) -> int:
    device = _device(args)
    try:
        answer = Path(args.cert).read_bytes()
    except OSError as exc:
        raise CLIError(f"{args.cert}: {exc.strerror}") from None
    cert = device.store(answer)
    serial = output.format_serial(cert.serial_number)
    if args.json:
        output.emit({"ok": True, "serial": device.serial, "certificate_serial": serial,
                     "not_after": output.ts(cert.not_valid_after_utc), "key_label": device.serial + "-op"})
    else:
        print(f"OK: operational certificate {serial} stored in the token (label {device.serial}-op) and as "
              f"op-cert.pem, op-chain.pem in {args.device}")
    return 0


def _common(s, nonce: str | None = None, firmware: bool = False) -> None:
    s.add_argument("--device", required=True, metavar="DIR", help="the bundle from 'devid provision --secure-element'")
    s.add_argument("--token", metavar="URI", help="the token as a PKCS#11 URI (default: the one the bundle records), "
                                                  "e.g. with pin-source=file:PATH; else the PIN is $DEVID_PKCS11_PIN")
    if nonce is not None:
        s.add_argument("--nonce", required=nonce == "required", metavar="FILE",
                       help="the answer of GET /attest/nonce as saved (coap-client -o FILE)")
    if firmware:
        from devid.gateway.cli.device import firmware_flags
        firmware_flags(s)
    s.add_argument("--json", action="store_true", help="one JSON document instead of the summary")


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    g = sub.add_parser("se", help="a device whose keys are in a secure element (PKCS#11): evidence, CSRs and "
                                  "certificates with the token's keys, beside coap-client-gnutls",
                       description="Device-side commands for a bundle from 'devid provision --secure-element': "
                                   "libcoap's coap-client-gnutls makes the DTLS handshake with the token's keys, "
                                   "these make what it cannot (docs/enrollment.md).")
    gs = g.add_subparsers(dest="se_command", metavar="COMMAND", required=True)

    s = gs.add_parser("show", help="the token's objects for this device and the URIs for coap-client-gnutls")
    _common(s)
    s.set_defaults(func=cmd_show)

    s = gs.add_parser("evidence", help="evidence for a server nonce, signed by the factory key in the token "
                                       "(for POST /attest/evidence)")
    _common(s, nonce="required", firmware=True)
    s.add_argument("--out", required=True, metavar="FILE", help="where the evidence (COSE_Sign1) goes")
    s.set_defaults(func=cmd_evidence)

    s = gs.add_parser("csr", help="make the operational key in the token (label SERIAL-op-new until its certificate "
                                  "is stored) and its CSR; with --nonce, evidence bound to it inside (one /sen)")
    _common(s, nonce="optional", firmware=True)
    s.add_argument("--out", required=True, metavar="FILE", help="where the DER CSR goes (for -t 286)")
    s.set_defaults(func=cmd_csr)

    s = gs.add_parser("store", help="store the issued operational certificate in the token (label SERIAL-op) and "
                                    "the bundle (op-cert.pem, op-chain.pem); a renewal's old key is then destroyed")
    _common(s)
    s.add_argument("--cert", required=True, metavar="FILE", help="the /sen or /sren answer as saved "
                                                                 "(281 PKCS#7, or PEM)")
    s.set_defaults(func=cmd_store)
