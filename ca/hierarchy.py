"""The CA hierarchy devid creates on `init`: a root, two issuing intermediates, the gateway's cert.

    root (P-384)
    ├── manufacturing CA (P-256)  issues factory identities (IDevID)
    └── operational CA (P-256)    issues operational identities (LDevID) and the gateway's
                                  DTLS server certificate
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .authority import Issuer, hash_for, random_serial, to_utc
from .identity import IdentitySettings, fingerprint
from .store import CertificateRecord

ISSUING_CAS = ("manufacturing", "operational")
CA_NAMES = ("root",) + ISSUING_CAS

ROOT_VALIDITY = timedelta(days=365 * 30)
INTERMEDIATE_VALIDITY = timedelta(days=365 * 25)
GATEWAY_VALIDITY = timedelta(days=730)

_CA_TITLES = {"root": "Root CA", "manufacturing": "Manufacturing CA", "operational": "Operational CA"}


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)


def ca_subject(name: str, settings: IdentitySettings) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.organization),
        x509.NameAttribute(NameOID.COMMON_NAME, f"devid {_CA_TITLES[name]}"),
    ])


def build_root(key: ec.EllipticCurvePrivateKey, settings: IdentitySettings, now: datetime,
               rand_bytes: Callable[[int], bytes]) -> x509.Certificate:
    now = to_utc(now)
    subject = ca_subject("root", settings)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(random_serial(rand_bytes))
            .not_valid_before(now).not_valid_after(now + ROOT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hash_for(key)))


def build_intermediate(name: str, key: ec.EllipticCurvePrivateKey, root: Issuer, settings: IdentitySettings,
                       now: datetime, rand_bytes: Callable[[int], bytes]) -> x509.Certificate:
    now = to_utc(now)
    not_after = min(now + INTERMEDIATE_VALIDITY, root.cert.not_valid_after_utc)
    return (x509.CertificateBuilder()
            .subject_name(ca_subject(name, settings)).issuer_name(root.cert.subject)
            .public_key(key.public_key())
            .serial_number(random_serial(rand_bytes))
            .not_valid_before(now).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(root.aki, critical=False)
            .sign(root.key, root.hash_algorithm))


def gateway_names(hostnames: Iterable[str], localhost: bool = True) -> list[x509.GeneralName]:
    """SubjectAltName entries: localhost, 127.0.0.1, ::1 (unless not `localhost`) and every extra host
    name or address."""
    names: list[x509.GeneralName] = []
    for host in [*(["localhost", "127.0.0.1", "::1"] if localhost else []), *hostnames]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host.lower())
        if entry not in names:
            names.append(entry)
    return names


def build_trust_anchor(issuer: Issuer, rand_bytes: Callable[[int], bytes]) -> x509.Certificate:
    """A self-signed certificate of an issuing CA's own name and key (the operational CA's, for a
    service that must admit only operational identities: an MQTT broker). A relying party that
    holds it as its only trust anchor accepts exactly the certificates that CA issued: a path
    ends at the anchor, the root is not in it, so a factory certificate (manufacturing CA, then
    root) has no path, chain sent or not. Same subject, key, key identifier and validity as the
    CA's certificate, so its CRLs (same issuer name, same key) verify against it (RFC 5280
    6.1.1 (d): a trust anchor is a name and a key; RFC 5914)."""
    cert = issuer.cert
    return (x509.CertificateBuilder()
            .subject_name(cert.subject).issuer_name(cert.subject).public_key(issuer.key.public_key())
            .serial_number(random_serial(rand_bytes))
            .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuer.key.public_key()), critical=False)
            .sign(issuer.key, issuer.hash_algorithm))


# the gateway's certificate's commonName: what tells it from the other server certificates of the
# operational CA (the MQTT broker's, the operator listener's), e.g. to a PSK device that checks the
# signer of GET /psk's answer (docs/enrollment.md#the-answer-of-get-psk)
GATEWAY_COMMON_NAME = "devid gateway"


def build_gateway_cert(key: ec.EllipticCurvePrivateKey, issuer: Issuer, hostnames: Iterable[str],
                       settings: IdentitySettings, now: datetime,
                       rand_bytes: Callable[[int], bytes], common_name: str = GATEWAY_COMMON_NAME,
                       localhost: bool = True) -> x509.Certificate:
    """A TLS/DTLS server certificate (serverAuth) for `hostnames` (and localhost, 127.0.0.1 and
    ::1 unless `localhost` is false): the gateway's, or the MQTT broker's."""
    now = to_utc(now)
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, settings.organization),
                         x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer.cert.subject).public_key(key.public_key())
            .serial_number(random_serial(rand_bytes))
            .not_valid_before(now - timedelta(seconds=60))
            .not_valid_after(min(now + GATEWAY_VALIDITY, issuer.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(issuer.aki, critical=False)
            .add_extension(x509.SubjectAlternativeName(gateway_names(hostnames, localhost=localhost)), critical=False)
            .sign(issuer.key, issuer.hash_algorithm))


def record_for(cert: x509.Certificate, issuer: str, profile: str, now: datetime) -> CertificateRecord:
    return CertificateRecord(serial=cert.serial_number, issuer=issuer, profile=profile, device_serial=None,
                             not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                             fingerprint=fingerprint(cert), der=cert.public_bytes(serialization.Encoding.DER),
                             issued_at=to_utc(now))


@dataclass(frozen=True)
class NewHierarchy:
    keys: dict[str, ec.EllipticCurvePrivateKey]     # root, manufacturing, operational, gateway
    certs: dict[str, x509.Certificate]
    records: list[CertificateRecord]


KeyMaker = Callable[[str, ec.EllipticCurve], ec.EllipticCurvePrivateKey]


def software_key(name: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve)


def create_hierarchy(settings: IdentitySettings, hostnames: Iterable[str], now: datetime,
                     rand_bytes: Callable[[int], bytes], root_curve: ec.EllipticCurve | None = None,
                     make_ca_key: KeyMaker = software_key) -> NewHierarchy:
    """The root (P-384 unless `root_curve`), the two issuing CAs (P-256) and the gateway's
    certificate. `make_ca_key(name, curve)` makes the three CA keys (default: in memory; a key
    in a token is any `ec.EllipticCurvePrivateKey` whose `sign()` the token makes); the gateway's
    DTLS key is always made here, because the DTLS stack signs with it in process."""
    keys = {"root": make_ca_key("root", root_curve or ec.SECP384R1())}
    for name in ISSUING_CAS:
        keys[name] = make_ca_key(name, ec.SECP256R1())
    keys["gateway"] = ec.generate_private_key(ec.SECP256R1())
    certs = {"root": build_root(keys["root"], settings, now, rand_bytes)}
    root = Issuer("root", certs["root"], keys["root"])
    for name in ISSUING_CAS:
        certs[name] = build_intermediate(name, keys[name], root, settings, now, rand_bytes)
    operational = Issuer("operational", certs["operational"], keys["operational"])
    certs["gateway"] = build_gateway_cert(keys["gateway"], operational, hostnames, settings, now, rand_bytes)
    records = [record_for(certs["root"], "root", "ca", now)]
    records += [record_for(certs[n], "root", "ca", now) for n in ISSUING_CAS]
    records.append(record_for(certs["gateway"], "operational", "gateway", now))
    return NewHierarchy(keys, certs, records)
