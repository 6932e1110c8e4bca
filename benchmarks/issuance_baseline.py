"""The baseline of the issuance benchmark: what a careful programmer writes with `cryptography`
alone to issue the same certificate (BareIssuer) and to provision the same five files per device
(bare_provision, no registry)."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import issuance_base  # noqa: F401  (the checkout's root on sys.path before devid is imported)

from devid.gateway.app.datadir import DataDir


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(value)) + value


def _oid_der(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return _tlv(0x06, bytes(out))


class BareIssuer:
    """What a careful programmer writes with `cryptography` alone to issue the same certificate.

    Per-issuer constants (issuer name, AKI, the fixed extensions, the encoded OIDs) are built
    once, as any such code would; everything that depends on the device or its key is built per
    certificate.
    """

    HW_NAME_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, organization: str,
                 pen: int, device_type_oid: str, hardware_type_oid: str, validity: timedelta,
                 backdate: timedelta, key_agreement: bool) -> None:
        self.key = key
        self.issuer_name = cert.subject
        self.issuer_not_after = cert.not_valid_after_utc
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        self.aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        self.org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)
        self.pen = pen
        self.device_type_oid = x509.ObjectIdentifier(device_type_oid)
        self.hw_type_der = _oid_der(hardware_type_oid)
        self.validity = validity
        self.backdate = backdate
        self.bc = x509.BasicConstraints(ca=False, path_length=None)
        self.ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                data_encipherment=False, key_agreement=key_agreement, key_cert_sign=False,
                                crl_sign=False, encipher_only=False, decipher_only=False)
        self.eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        self.hash = hashes.SHA256()

    def certificate(self, public_key, serial: str, device_type: str, now: datetime) -> x509.Certificate:
        hw_name = _tlv(0x30, self.hw_type_der + _tlv(0x04, serial.encode()))
        san = x509.SubjectAlternativeName([
            x509.OtherName(self.HW_NAME_OID, hw_name),
            x509.UniformResourceIdentifier(f"urn:dev:os:{self.pen}-{serial}"),
        ])
        subject = x509.Name([self.org, x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}"),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        return (x509.CertificateBuilder()
                .subject_name(subject)
                .issuer_name(self.issuer_name)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - self.backdate)
                .not_valid_after(min(now + self.validity, self.issuer_not_after))
                .add_extension(self.bc, critical=True)
                .add_extension(self.ku, critical=True)
                .add_extension(self.eku, critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
                .add_extension(self.aki, critical=False)
                .add_extension(san, critical=False)
                .add_extension(x509.UnrecognizedExtension(self.device_type_oid,
                                                          _tlv(0x0C, device_type.encode())), critical=False)
                .sign(self.key, self.hash))

    def issue_from_csr(self, csr_der: bytes, serial: str, device_type: str, now: datetime) -> bytes:
        csr = x509.load_der_x509_csr(csr_der)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature does not verify")
        cert = self.certificate(csr.public_key(), serial, device_type, now)
        return cert.public_bytes(serialization.Encoding.DER)


def bare_issuer(data: DataDir, ca, issuer_name: str, profile_name: str) -> BareIssuer:
    issuer = data.issuer(issuer_name)
    profile = ca.profiles[profile_name]
    s = data.config.identity
    return BareIssuer(issuer.cert, issuer.key, organization=s.organization, pen=s.pen,
                      device_type_oid=s.device_type_oid, hardware_type_oid=s.hardware_type_oid,
                      validity=profile.validity, backdate=profile.backdate, key_agreement=profile.key_agreement)


def bare_provision(bare: BareIssuer, *, count: int, device_type: str, out: Path, manufacturing_pem: bytes,
                   root_pem: bytes, prefix: str) -> None:
    """The bare provisioning work: key, factory certificate, the same five files; no registry."""
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    for n in range(1, count + 1):
        serial = f"{prefix}{n:08d}"
        key = ec.generate_private_key(ec.SECP256R1())
        cert = bare.certificate(key.public_key(), serial, device_type, now)
        der = cert.public_bytes(serialization.Encoding.DER)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        d = out / serial
        d.mkdir()
        _write(d / "key.pem", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()), 0o600)
        _write(d / "cert.pem", cert_pem)
        _write(d / "chain.pem", cert_pem + manufacturing_pem)
        _write(d / "ca.pem", root_pem)
        config = {
            "device_serial": serial,
            "device_type": device_type,
            "secure_element": {
                "type": "ATECC608A",
                "i2c_address": "0x60",
                "key_slots": {"device_private_key": 0, "device_certificate": 10, "ca_certificate": 11},
            },
            "provisioning": {"lock_configuration": True, "lock_data": True, "enable_hardware_rng": True},
            "certificate": {
                "serial": format(cert.serial_number, "x"),
                "sha256_fingerprint": hashlib.sha256(der).hexdigest(),
                "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }
        _write(d / "secure-element-config.json", json.dumps(config, indent=2).encode() + b"\n")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
