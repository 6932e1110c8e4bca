"""Operator certificates, both from devid's operational CA and both recorded in the registry:

- an operator's client certificate (`devid operator cert`), profile `operator`: EKU clientAuth
  only, subject O=<organization>, OU=devid operator, CN=<name>; no device-type extension and no
  device serial, so it is never a device's (and a device's certificate is never an operator's:
  the listener looks the presented certificate up in the registry and takes only a current
  `operator` one);
- the listener's server certificate for `--http-tls`, profile `operator-listener`: EKU
  serverAuth, the gateway certificate's names; its key in DATA/operator/ (0600), made by `devid
  serve` on first use and again when it is within 30 days of expiry."""

from __future__ import annotations

import re
import ssl
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devid.ca.authority import Issuer, random_serial, to_utc
from devid.ca.hierarchy import record_for
from devid.gateway.system.fs import write_atomic

OPERATOR_PROFILE = "operator"
LISTENER_PROFILE = "operator-listener"
OPERATOR_OU = "devid operator"
OPERATOR_VALIDITY = timedelta(days=365)
LISTENER_VALIDITY = timedelta(days=365)
RENEW_LISTENER_BEFORE = timedelta(days=30)
LISTENER_DIR = "operator"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@-]{0,63}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"operator name {name!r}: 1 to 64 letters, digits, space, '.', '_', '@' or '-', "
                         "starting with a letter or digit")
    return name


def _usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _build(key, issuer: Issuer, subject: x509.Name, eku, validity: timedelta, now: datetime, rand_bytes,
           names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = to_utc(now)
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(issuer.cert.subject).public_key(key.public_key())
         .serial_number(random_serial(rand_bytes))
         .not_valid_before(now - timedelta(seconds=60))
         .not_valid_after(min(now + validity, issuer.cert.not_valid_after_utc))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(_usage(), critical=True)
         .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
         .add_extension(issuer.aki, critical=False))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer.key, issuer.hash_algorithm)


def issue_operator_cert(issuer: Issuer, registry, organization: str, name: str, now: datetime,
                        rand_bytes) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A client certificate for the operator `name`, recorded (durably) before it is returned."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, OPERATOR_OU),
                         x509.NameAttribute(NameOID.COMMON_NAME, check_name(name))])
    cert = _build(key, issuer, subject, ExtendedKeyUsageOID.CLIENT_AUTH, OPERATOR_VALIDITY, now, rand_bytes)
    registry.record_certificates([record_for(cert, issuer.name, OPERATOR_PROFILE, now)])
    return cert, key


def listener_files(data_path: Path) -> tuple[Path, Path]:
    d = Path(data_path) / LISTENER_DIR
    return d / "https.cert.pem", d / "https.key.pem"


def _current(cert_path: Path, key_path: Path, issuer_cert: x509.Certificate, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except (OSError, ValueError):
        return False
    return (key.public_key() == cert.public_key() and cert.issuer == issuer_cert.subject
            and cert.not_valid_after_utc - to_utc(now) > RENEW_LISTENER_BEFORE)


def ensure_listener_cert(data_path: Path, issuer: Callable[[], Issuer], registry, organization: str,
                         names: list[x509.GeneralName], now: datetime, rand_bytes) -> tuple[Path, Path]:
    """The listener's certificate (chain: it and the operational CA) and key files, issued if
    missing, not matching, or within 30 days of expiry."""
    cert_path, key_path = listener_files(data_path)
    iss = issuer()
    if _current(cert_path, key_path, iss.cert, now):
        return cert_path, key_path
    cert_path.parent.mkdir(mode=0o700, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, "devid operator listener")])
    cert = _build(key, iss, subject, ExtendedKeyUsageOID.SERVER_AUTH, LISTENER_VALIDITY, now, rand_bytes, names)
    registry.record_certificates([record_for(cert, iss.name, LISTENER_PROFILE, now)])
    write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM)
                 + iss.cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_ssl_context(cert_path: Path, key_path: Path, client_cas: list[x509.Certificate]) -> ssl.SSLContext:
    """HTTPS with an optional client certificate (an operator's, checked to devid's CA): a caller
    without one may still use the bearer token."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata="".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in client_cas))
    return ctx
