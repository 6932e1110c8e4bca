"""`devid operator token` and `devid operator cert`: the credentials of the operator HTTP listener
(`devid serve --http`, docs/operations.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.cli.base import Parser, data_dir, utcnow
from devid.gateway.errors import CLIError


def cmd_token(args) -> int:
    from devid.gateway.operator.tokens import TokenFile, token_id
    data = data_dir(args).require()
    tokens = TokenFile(data.path)
    if args.rotate:
        token, created = tokens.rotate(), True
    else:
        token, created = tokens.ensure()
    if args.json:       # the token itself is a secret: never in JSON output (it is in the file, 0600)
        output.emit({"ok": True, "id": token_id(token), "file": str(tokens.path), "created": created,
                     "rotated": bool(args.rotate)})
    else:
        print(token)
    return 0


def cmd_cert(args) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12
    from devid.ca.identity import format_serial
    from devid.gateway.operator.certs import check_name, issue_operator_cert
    from devid.gateway.system.fs import write_synced
    try:
        name = check_name(args.name)
    except ValueError as exc:
        raise CLIError(f"--name: {exc}") from None
    data = data_dir(args).require()
    out = Path(args.out)
    files = {k: out / f"{name}.{k}" for k in ("cert.pem", "key.pem", "p12")}
    files["ca.pem"] = out / "ca.pem"
    taken = [str(p) for k, p in files.items() if k != "ca.pem" and p.exists()]
    if taken:
        raise CLIError(f"{taken[0]} exists: choose another --name or --out (nothing was issued)")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CLIError(f"--out {out}: {exc.strerror}") from None
    registry = data.open_registry()
    try:
        issuer = data.issuer("operational")
        cert, key = issue_operator_cert(issuer, registry, data.config.identity.organization, name, utcnow(),
                                        os.urandom)
    finally:
        registry.close()
    pem = serialization.Encoding.PEM
    write_synced(files["key.pem"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()), mode=0o600)
    write_synced(files["cert.pem"], cert.public_bytes(pem) + issuer.cert.public_bytes(pem))
    write_synced(files["p12"], pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [issuer.cert],
                                                                      serialization.NoEncryption()), mode=0o600)
    write_synced(files["ca.pem"], data.cert_pem("root") + data.cert_pem("operational"), exclusive=False)
    serial = format_serial(cert.serial_number)
    if args.json:
        output.emit({"ok": True, "name": name, "serial": serial, "subject": cert.subject.rfc4514_string(),
                     "not_after": output.ts(cert.not_valid_after_utc), **{k.replace(".", "_"): str(p)
                                                                         for k, p in files.items()}})
    else:
        print(f"operator certificate {serial} for {cert.subject.rfc4514_string()} (until "
              f"{output.ts(cert.not_valid_after_utc)})")
        for k, p in files.items():
            print(f"  {p}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    op = sub.add_parser("operator", parents=[common],
                        help="credentials of the operator HTTP listener (devid serve --http)")
    opsub = op.add_subparsers(dest="operator_command", metavar="ACTION", required=True, parser_class=Parser)
    s = opsub.add_parser("token", parents=[common],
                         help="print the operator's bearer token (DATA/operator.token, made 0600 on first use)")
    s.add_argument("--rotate", action="store_true",
                   help="replace the token at once (the old one, and every web session, stop working)")
    s.add_argument("--json", action="store_true",
                   help="the token's id, file and whether it was made or rotated (not the token: a secret)")
    s.set_defaults(func=cmd_token)
    s = opsub.add_parser("cert", parents=[common],
                         help="issue an operator client certificate (mTLS to 'devid serve --http-tls')")
    s.add_argument("--out", required=True, metavar="DIR", help="where NAME.cert.pem, NAME.key.pem (0600), "
                                                               "NAME.p12 (for a browser, 0600) and ca.pem go")
    s.add_argument("--name", required=True, metavar="NAME", help="the operator's name (the certificate's CN, "
                                                                 "logged with each revocation)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cert)
