"""`devid provision`: create factory identities (IDevID bundles) for new devices."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.cli.base import data_dir, utcnow
from devid.gateway.factory.provisioning import DEFAULT_OUT, DEFAULT_PREFIX, provision
from devid.gateway.pkcs11.token import ENV_SO_PIN


def cmd_provision(args) -> int:
    data = data_dir(args).require()
    registry = data.open_registry()
    ca = data.authority(registry)
    progress = output.Progress("provisioning") if not (args.quiet or args.json) else None
    out = Path(args.out) if args.out else data.path / DEFAULT_OUT      # key material stays out of the checkout
    element = None
    if args.secure_element:
        from devid.gateway.factory.secure_element import SecureElement
        element = SecureElement.of(args.secure_element, os.environ.get(ENV_SO_PIN))
    psk_secret = data.psk_secret(create=True, registry=registry) if args.psk else None
    result = provision(ca, count=args.count, device_type=args.device_type, out=out,
                       manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                       serial_prefix=args.serial_prefix, now=utcnow, progress=progress, workers=args.workers,
                       secure_element=element, psk_secret=psk_secret)
    if args.json:
        extra = {} if element is None else {"secure_element": element.recorded,
                                            "ca_certificate_trusted": result.ca_trusted}
        if args.psk:
            extra["psk"] = True
        output.emit({"ok": True, "count": len(result.serials), "device_type": args.device_type, "out": str(out),
                     **extra,
                     "first_serial": result.serials[0], "last_serial": result.serials[-1],
                     "seconds": round(result.seconds, 3), "identities_per_s": round(result.rate, 1),
                     "recovered": result.recovered, "discarded": result.discarded})
        return 0
    if result.recovered or result.discarded:
        print(f"recovered {result.recovered} and discarded {result.discarded} bundle(s) left by an interrupted run")
    print(f"provisioned {len(result.serials)} factory identities ({result.serials[0]} .. {result.serials[-1]}) "
          f"of type {args.device_type} in {result.seconds:.2f} s: {result.rate:,.0f} identities/s -> {out}")
    if args.psk:
        print("each bundle has its factory PSK too: psk-identity.txt and psk-key.txt (mode 0600)")
    if element is not None:
        trusted = ("marked trusted" if result.ca_trusted else
                   f"NOT marked trusted (no ${ENV_SO_PIN}: libcoap's GnuTLS client cannot use it as -R)")
        print(f"keys and certificates in the PKCS#11 {element.uri.token_label} (no key.pem); "
              f"its root CA certificate object is {trusted}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("provision", parents=[common], help="create factory identities (IDevID) for new devices")
    s.add_argument("--count", type=output.positive_int, required=True, metavar="N")
    s.add_argument("--device-type", required=True, metavar="TYPE", help="e.g. temperature-sensor")
    s.add_argument("--out", metavar="DIR", help=f"one bundle directory (mode 0700) per device is made here "
                                                 f"(default: DATA/{DEFAULT_OUT}/, in the data directory)")
    s.add_argument("--serial-prefix", default=DEFAULT_PREFIX, metavar="P",
                   help=f"serials are P followed by a sequence number (default: {DEFAULT_PREFIX})")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes building and writing bundles (default: one per CPU)")
    s.add_argument("--secure-element", metavar="URI",
                   help="generate each device's key in this PKCS#11 token (RFC 7512 URI, e.g. "
                        "pkcs11:token=dev-se?module-path=/usr/lib/softhsm/libsofthsm2.so) and store its certificates "
                        f"there: no key.pem. PIN: pin-source=file:PATH in the URI or $DEVID_PKCS11_PIN; "
                        f"${ENV_SO_PIN} (the security officer's PIN) marks the CA certificate object trusted")
    s.add_argument("--psk", action="store_true",
                   help="also give each device a factory pre-shared key for DTLS without certificates "
                        "(tinydtls): psk-identity.txt and psk-key.txt in its bundle (docs/enrollment.md#psk-devices)")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    s.add_argument("--json", action="store_true", help="one JSON document (no progress output)")
    s.set_defaults(func=cmd_provision)
