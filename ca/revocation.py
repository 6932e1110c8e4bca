"""Revocation and CRLs.

Revoking a device marks it and each of its certificates revoked in the registry (one
transaction). A CRL per CA lists its revoked certificates, with a CRL number that only grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from .authority import Issuer, to_utc
from .errors import CAError, UnknownDevice
from .identity import check_serial
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
    crl = builder.sign(issuer.key, issuer.hash_algorithm)
    return CRLInfo(issuer.name, number, entries, now, now + validity, crl)
