"""The JSON shapes of the operator API (the web view renders the same dictionaries)."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.attestation.log import LogEntry
from devid.ca.identity import format_serial
from devid.ca.store import CertificateRecord, DeviceRecord


def ts(t: datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


def device_json(d: DeviceRecord, expires: datetime | None = None, *, with_expiry: bool = True) -> dict:
    doc = {"serial": d.serial, "device_type": d.device_type, "state": d.state.value,
           "created_at": ts(d.created_at), "updated_at": ts(d.updated_at), "enrolled_at": ts(d.enrolled_at),
           "revoked_at": ts(d.revoked_at), "revocation_reason": d.revocation_reason}
    if with_expiry:
        doc["certificate_expires"] = ts(expires)
    return doc


def certificate_json(c: CertificateRecord, *, pem: bool = True, now: datetime | None = None) -> dict:
    doc = {"serial": format_serial(c.serial), "profile": c.profile, "issuer": c.issuer, "device": c.device_serial,
           "state": c.status.value, "not_before": ts(c.not_before), "not_after": ts(c.not_after),
           "issued_at": ts(c.issued_at), "sha256_fingerprint": c.fingerprint, "revoked_at": ts(c.revoked_at),
           "revocation_reason": c.revocation_reason}
    if now is not None:
        doc["expired"] = c.not_after <= now
        doc["days_left"] = round((c.not_after - now).total_seconds() / 86400, 1)
    if pem:
        cert = x509.load_der_x509_certificate(c.der)
        doc["subject"] = cert.subject.rfc4514_string()
        doc["pem"] = cert.public_bytes(serialization.Encoding.PEM).decode()
    return doc


def entry_json(e: LogEntry) -> dict:
    doc = {"seq": e.seq, "time": e.time, "kind": e.kind, "device": e.device_serial, "device_type": e.device_type,
           "cert_fingerprint": e.cert_fingerprint, "tier": e.tier.value, "acceptable": e.acceptable,
           "revoke": e.revoke, "reasons": [dict(r) for r in e.reasons], "claims": e.claims, "nonce": e.nonce,
           "hash": e.hash.hex(), "summary": None}
    if e.summary is not None:
        doc["summary"] = {"count": e.summary.count, "first": e.summary.first, "last": e.summary.last,
                          "reason_counts": e.summary.counts()}
    return doc
