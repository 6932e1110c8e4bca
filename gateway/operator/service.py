"""What the operator API and the web view do, once for both: read the fleet by pages (through
`store/fleet.py`), check the attestation log (`store/log_verify.py`), and revoke (the same
`ca.revocation` functions `devid revoke` calls, so the registry and the next CRL see one
revocation whichever way it came). Each revocation is a log event naming who did it."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from devid.ca.errors import CAError, InvalidSerial
from devid.ca.identity import check_serial, format_serial
from devid.ca.revocation import REASONS, UnknownCertificate, revoke_certificate, revoke_device
from devid.ca.store import DeviceState
from devid.gateway.operator import params
from devid.gateway.operator.problems import Problem
from devid.gateway.operator.views import certificate_json, device_json, entry_json, ts
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.fleet import Fleet
from devid.gateway.store.gauges import default_threshold
from devid.gateway.store.log_rotation import SEGMENT_DIR
from devid.gateway.store.log_verify import verify_log

log = logging.getLogger("devid.operator")


@dataclass
class Page:
    items: list[dict]
    next_cursor: str | None

    def as_json(self, key: str) -> dict:
        return {key: self.items, "next_cursor": self.next_cursor}


def _trusted(store: AttestationStore, gateway: x509.Certificate, operational: x509.Certificate):
    """The certificates that may seal log segments: the gateway's ones the registry holds, issued
    by this operational CA (as `devid attest verify-log` takes them)."""
    from cryptography.hazmat.primitives import serialization
    ders = store.gateway_certificates() + [gateway.public_bytes(serialization.Encoding.DER)]
    keys = {}
    for der in ders:
        try:
            x509.load_der_x509_certificate(der).verify_directly_issued_by(operational)
        except (ValueError, TypeError, InvalidSignature):
            continue
        keys[hashlib.sha256(der).digest()] = der
    return lambda der: (x509.load_der_x509_certificate(keys[hashlib.sha256(der).digest()]).public_key()
                        if hashlib.sha256(der).digest() in keys else None)


class OperatorService:
    def __init__(self, registry, data_path: Path, clock: Callable[[], datetime],
                 gateway_cert: x509.Certificate, operational_cert: x509.Certificate,
                 threshold: Callable[[str], timedelta] = default_threshold) -> None:
        """`threshold`: a device type's renewal threshold (the gateway passes its policy's
        `renewal_threshold`, looked up at each request so a reloaded policy counts at once):
        "due" without a window means within it."""
        self.threshold = threshold
        self.registry = registry
        self.fleet = Fleet(registry)
        self.store = AttestationStore(registry)
        self.clock = clock
        self.segments = Path(data_path) / SEGMENT_DIR
        self._certs = (gateway_cert, operational_cert)
        self._verified: tuple | None = None

    # -- reads -------------------------------------------------------------------------------

    def devices(self, *, state: str | None = None, device_type: str | None = None,
                expiring_within: str | None = None, cursor: str | None = None, limit: str | None = None) -> Page:
        n = params.limit(limit)
        st = None
        if state:
            try:
                st = DeviceState(state)
            except ValueError:
                raise params.BadParameter("state", f"one of {', '.join(s.value for s in DeviceState)}") from None
        before = self.clock() + params.duration(expiring_within, "expiring_within") if expiring_within else None
        key = params.decode_cursor(cursor, (str,))
        rows = self.fleet.devices(state=st, device_type=device_type or None, expiring_before=before,
                                  after=key[0] if key else None, limit=n + 1)
        more = len(rows) > n
        rows = rows[:n]
        return Page([device_json(r.device, r.expires) for r in rows],
                    params.encode_cursor([rows[-1].device.serial]) if more else None)

    def device(self, serial: str) -> dict:
        try:
            dev = self.registry.get_device(check_serial(serial))
        except InvalidSerial:
            dev = None
        if dev is None:
            raise Problem("not-found", f"no device {serial!r} in the registry")
        certs = self.registry.certificates_for_device(dev.serial)
        current = [c.not_after for c in certs if c.profile == "operational" and c.status.value == "current"]
        return device_json(dev, min(current) if current else None)

    def certificates(self, serial: str) -> list[dict]:
        self.device(serial)
        now = self.clock()
        return [certificate_json(c, now=now) for c in self.registry.certificates_for_device(serial)]

    def attestations(self, serial: str | None, cursor: str | None = None, limit: str | None = None) -> Page:
        if serial is not None:
            self.device(serial)
        n = params.limit(limit)
        key = params.decode_cursor(cursor, (int,))
        rows = self.fleet.log_entries(device_serial=serial, before_seq=key[0] if key else None, limit=n + 1)
        more = len(rows) > n
        rows = rows[:n]
        return Page([entry_json(e) for e in rows], params.encode_cursor([rows[-1].seq]) if more else None)

    def verification(self) -> dict:
        """`verify_log` over the registry and DATA/attestation-log (cached while the log's head
        and segments stay the same)."""
        state = (self.store.log_span(), len(self.store.segments()))
        if self._verified is None or self._verified[0] != state:
            report = verify_log(self.store, [self.segments], _trusted(self.store, *self._certs))
            doc = report.as_json()
            doc["status"] = "verified" if report.ok else "broken"
            doc["checked_at"] = ts(self.clock())
            self._verified = (state, doc)
        return self._verified[1]

    def expiring(self, within: str | None, cursor: str | None = None, limit: str | None = None) -> Page:
        n = params.limit(limit)
        now = self.clock()
        window = params.duration(within, "within") if within else None
        key = params.decode_cursor(cursor, (str, str))
        after = None
        if key:
            try:
                after = (datetime.fromisoformat(key[0]), int(key[1], 16))
            except ValueError:
                raise params.BadParameter("cursor", "not a cursor this list gave out") from None
        if window is not None:
            rows = self.fleet.certificates_due(now + window, after=after, limit=n + 1)
        else:
            rows = self.fleet.certificates_due(after=after, limit=n + 1, now=now, threshold=self.threshold)
        more = len(rows) > n
        rows = rows[:n]
        items = [{**certificate_json(r.certificate, pem=False, now=now), "device_type": r.device_type} for r in rows]
        last = rows[-1].certificate if rows else None
        return Page(items, params.encode_cursor([ts(last.not_after), format(last.serial, "x")]) if more else None)

    def overview(self, due_within: timedelta | None = None) -> dict:
        """`due_within` None: certificates due within their device type's renewal threshold."""
        o = self.fleet.overview(self.clock(), due_within or self.threshold)
        return {"devices": o.devices, "enrollments_per_minute": [{"minute": m, "count": n}
                                                                 for m, n in o.enrollments_per_minute],
                "certificates_issued_last_hour": o.issued_last_hour, "refusals_last_hour": o.refusals_last_hour,
                "verdict_tiers_last_day": o.tiers_last_day, "certificates_due": o.certificates_due,
                "certificates_overdue": o.certificates_overdue,
                "due_within_days": o.due_within.total_seconds() / 86400 if o.due_within else None}

    # -- writes ------------------------------------------------------------------------------

    @staticmethod
    def _reason(reason) -> str:
        if reason is None:
            return "unspecified"
        if not isinstance(reason, str) or reason not in REASONS:
            raise Problem("bad-request", f"reason: one of {', '.join(REASONS)}")
        return reason

    def revoke_device(self, serial: str, reason, who: str, via: str) -> dict:
        reason = self._reason(reason)
        before = self.device(serial)
        revoked = revoke_device(self.registry, serial, reason, self.clock())
        after = self.registry.get_device(serial)
        log.info("revoke", extra={"result": "ok", "who": who, "via": via, "device": serial, "reason": reason,
                                  "already_revoked": before["state"] == "revoked",
                                  "newly_revoked": [format_serial(c.serial) for c in revoked]})
        return {"ok": True, "device": device_json(after), "already_revoked": before["state"] == "revoked",
                "newly_revoked": [certificate_json(c, pem=False) for c in revoked],
                "note": "run 'devid crl' to publish new CRLs" if revoked else None}

    def revoke_certificate(self, text: str, reason, who: str, via: str) -> dict:
        reason = self._reason(reason)
        try:
            done = revoke_certificate(self.registry, text, reason, self.clock())
        except UnknownCertificate as exc:
            raise Problem("not-found", str(exc)) from None
        except CAError as exc:
            raise Problem("conflict", str(exc)) from None
        c = self.registry.get_certificate(done.certificate.serial)
        log.info("revoke", extra={"result": "ok", "who": who, "via": via, "device": c.device_serial,
                                  "certificate": format_serial(c.serial), "reason": reason,
                                  "already_revoked": not done.newly})
        return {"ok": True, "certificate": certificate_json(c, pem=False), "already_revoked": not done.newly,
                "note": "run 'devid crl' to publish new CRLs" if done.newly else None}
