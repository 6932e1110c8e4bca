"""Revocation and CRLs.

Revoking a device marks it and each of its certificates revoked in the registry (one
transaction). Revoking one certificate marks only that one; its device stays as it is. A CRL per
CA lists its revoked certificates, with a CRL number that only grows.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from .authority import Issuer, to_utc
from .errors import CAError, UnknownDevice
from .identity import check_serial, format_serial
from .store import CertificateRecord, Registry

REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}

DEFAULT_CRL_VALIDITY = timedelta(days=7)


class UnknownReason(CAError):
    pass


class UnknownCertificate(CAError):
    """No certificate matches the serial or fingerprint given."""


class AmbiguousCertificate(CAError):
    """A serial or fingerprint prefix that matches more than one certificate."""


# shortest prefix of a serial or fingerprint accepted on its own (32 bits)
MIN_PREFIX = 8
DEVICE_PROFILES = ("factory", "operational")


def check_reason(reason: str) -> str:
    if reason not in REASONS:
        raise UnknownReason(f"unknown revocation reason {reason!r} (known: {', '.join(REASONS)})")
    return reason


def revoke_device(store: Registry, serial: str, reason: str, now: datetime) -> list[CertificateRecord]:
    """Revoke a device and all its certificates; returns the certificates newly revoked.

    Revoking an already revoked device is not an error and revokes nothing new.
    """
    check_serial(serial)
    check_reason(reason)
    if store.get_device(serial) is None:
        raise UnknownDevice(f"unknown device {serial}")
    return store.revoke_device(serial, reason, to_utc(now))


def _hex_reference(text: str) -> str:
    """'5D3E6FF0...', '0x5d3e...', 'AB:CD:...' (openssl -fingerprint) -> lower-case hex."""
    ref = text.strip().lower()
    for prefix in ("0x", "sha256:", "sha-256:", "sha256=", "sha256 fingerprint="):
        if ref.startswith(prefix):
            ref = ref[len(prefix):]
            break
    ref = ref.replace(":", "")
    if not ref or any(ch not in string.hexdigits for ch in ref):
        raise UnknownCertificate(f"{text!r} is neither a certificate serial nor a SHA-256 fingerprint (hex digits)")
    return ref


def find_certificate(store: Registry, text: str) -> CertificateRecord:
    """The one certificate named by `text`: its serial in hex (as `devid devices show` and
    `openssl x509 -serial` print it; case, colons and leading zeros do not matter), its SHA-256 fingerprint in hex, or
    a prefix of either of at least MIN_PREFIX digits that no other certificate shares. A full
    serial or fingerprint wins over prefixes."""
    ref = _hex_reference(text)
    serial_hex = ref.lstrip("0") or "0"
    exact = []
    if len(serial_hex) <= 40:                   # RFC 5280: at most 20 octets
        found = store.get_certificate(int(serial_hex, 16))
        if found is not None:
            exact.append(found)
    if len(ref) == 64:
        exact += [c for c in store.certificates_matching(None, ref) if c not in exact]
    if len(exact) == 1:
        return exact[0]
    if exact:
        candidates = exact
    elif len(ref) < MIN_PREFIX:
        raise UnknownCertificate(f"no certificate with serial {text!r} (a prefix needs at least {MIN_PREFIX} "
                                 "hex digits)")
    else:
        candidates = store.certificates_matching(serial_hex, ref, limit=6)
    if not candidates:
        raise UnknownCertificate(f"no certificate with serial or SHA-256 fingerprint {text!r}")
    if len(candidates) > 1:
        listed = ", ".join(f"{format_serial(c.serial)} ({c.profile}, {c.device_serial or c.issuer})" for c in candidates[:5])
        count = "more than 5" if len(candidates) > 5 else str(len(candidates))
        raise AmbiguousCertificate(f"{text!r} matches {count} certificates: {listed}; give more digits")
    return candidates[0]


@dataclass(frozen=True)
class CertificateRevocation:
    certificate: CertificateRecord     # as it was found, before this revocation
    newly: bool                        # False: it was revoked already (nothing changed)


def revoke_certificate(store: Registry, text: str, reason: str, now: datetime) -> CertificateRevocation:
    """Revoke the one device certificate `text` names (`find_certificate`); its device and the
    device's other certificates stay as they are. Revoking a revoked certificate changes nothing."""
    check_reason(reason)
    cert = find_certificate(store, text)
    if cert.profile not in DEVICE_PROFILES or cert.device_serial is None:
        raise CAError(f"certificate {format_serial(cert.serial)} is a {cert.profile} certificate, not a device's: "
                      "only device certificates are revoked one by one")
    if cert.status.value == "revoked":
        return CertificateRevocation(cert, False)
    return CertificateRevocation(cert, store.revoke_certificate(cert.serial, reason, to_utc(now)))


@dataclass(frozen=True)
class CRLInfo:
    issuer: str
    number: int
    entries: int
    this_update: datetime
    next_update: datetime
    crl: x509.CertificateRevocationList


def build_crl(issuer: Issuer, store: Registry, now: datetime,
              validity: timedelta = DEFAULT_CRL_VALIDITY) -> CRLInfo:
    now = to_utc(now)
    number = store.next_crl_number(issuer.name)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(issuer.cert.subject)
               .last_update(now)
               .next_update(now + validity)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(issuer.aki, critical=False))
    entries = 0
    for rec in store.revoked_certificates(issuer.name):
        entry = (x509.RevokedCertificateBuilder()
                 .serial_number(rec.serial)
                 .revocation_date(rec.revoked_at or now))
        reason = rec.revocation_reason or "unspecified"
        if reason != "unspecified":   # RFC 5280 5.3.1: omit reasonCode rather than use unspecified
            entry = entry.add_extension(x509.CRLReason(REASONS[reason]), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
        entries += 1
    # a superseded certificate (a later one was issued to its device) is listed with reasonCode
    # superseded (RFC 5280 5.3.1) until it expires: a relying party that has only the CRL (an MQTT
    # broker) refuses it as the gateway does; an expired one drops off (RFC 5280 3.3)
    for rec, superseded_at in store.superseded_certificates(issuer.name, now):
        entry = (x509.RevokedCertificateBuilder().serial_number(rec.serial).revocation_date(superseded_at)
                 .add_extension(x509.CRLReason(x509.ReasonFlags.superseded), critical=False))
        builder = builder.add_revoked_certificate(entry.build())
        entries += 1
    crl = builder.sign(issuer.key, issuer.hash_algorithm)
    return CRLInfo(issuer.name, number, entries, now, now + validity, crl)
