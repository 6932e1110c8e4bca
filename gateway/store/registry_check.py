"""`devid registry check`: the registry's invariants, on either engine, from one state of it.

Each check reads the tables (in one `snapshot()`, so a gateway writing meanwhile does not make
a check see half of an issuance) and reports how many rows it looked at and what it found
wrong, with the first few examples:

- certificate rows: every `der` parses as an X.509 certificate whose serial is the row's
  (lower-case hex, no leading zero) and whose SHA-256 is the row's fingerprint;
- certificate serials: no two certificates, whatever their issuer, carry the same serial;
- one factory certificate per device; at most one current certificate per device and profile;
- every certificate of a revoked device is revoked;
- serial blocks (`devid provision`): no device serial PREFIX + 8 digits at or beyond its
  prefix's `next` (the next block would issue it again);
- CRL numbers are positive;
- the attestation log's chain, through the sealed segments and the registry (`log_verify`);
- every verdict use names an acceptable appraisal entry (one in a rotated segment is counted,
  the registry no longer holds it);
- optionally, the data directory's CA and gateway certificates are recorded, and the root is
  the one the deployment row names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cryptography import x509

from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.log_verify import verify_log

EXAMPLES = 10
SERIAL_DIGITS = 8           # gateway/factory/provisioning.py: PREFIX + 8 digits (the factory room is above this one)
PAGE = 2000


@dataclass
class Check:
    name: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    count: int = 0          # problems found (only the first EXAMPLES are kept)
    note: str | None = None

    @property
    def ok(self) -> bool:
        return self.count == 0

    def problem(self, message: str) -> None:
        self.count += 1
        if len(self.problems) < EXAMPLES:
            self.problems.append(message)

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "checked": self.checked, "problems": self.count,
                "examples": self.problems, "note": self.note}


@dataclass
class CheckReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


def check_registry(registry, *, segment_dirs: list[Path], trusted: Callable[[bytes], object],
                   ca_certificates: dict[str, x509.Certificate] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Every check on `registry` (either engine), from one snapshot."""
    report = CheckReport()
    with registry.snapshot() as db:
        report.checks += _certificates(db, progress)
        report.checks.append(_one_factory(db))
        report.checks.append(_one_current(db))
        report.checks.append(_revoked_devices(db))
        report.checks.append(_serial_blocks(db))
        report.checks.append(_crl_numbers(db))
        report.checks.append(_log_chain(registry, segment_dirs, trusted))
        report.checks.append(_verdict_uses(db))
        if ca_certificates is not None:
            report.checks.append(_ca_recorded(db, ca_certificates))
    return report


def _certificates(db, progress) -> list[Check]:
    rows_check = Check("certificate rows match their DER (serial, SHA-256 fingerprint)")
    unique = Check("no duplicate certificate serials (across issuers)")
    total = db.execute("SELECT COUNT(*) FROM certificates").fetchone()[0]
    seen: dict[int, str] = {}
    after = None
    while True:
        where = "" if after is None else " WHERE serial > ?"
        rows = db.execute(f"SELECT serial, issuer, fingerprint, der FROM certificates{where} ORDER BY serial "
                          f"LIMIT {PAGE}", () if after is None else (after,)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        for serial, issuer, fp, der in rows:
            rows_check.checked += 1
            der = bytes(der)
            try:
                number = int(serial, 16)
            except ValueError:
                rows_check.problem(f"certificate {serial!r}: the serial is not hexadecimal")
                continue
            if serial != format(number, "x"):
                rows_check.problem(f"certificate {serial}: the serial is not lower-case hex without leading zeros")
            if hashlib.sha256(der).hexdigest() != fp:
                rows_check.problem(f"certificate {serial}: the fingerprint is not the SHA-256 of its DER")
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                rows_check.problem(f"certificate {serial}: its DER is not an X.509 certificate")
                continue
            if cert.serial_number != number:
                rows_check.problem(f"certificate {serial}: its DER carries serial {format(cert.serial_number, 'x')}")
            unique.checked += 1
            other = seen.get(cert.serial_number)
            if other is not None:
                unique.problem(f"serial {format(cert.serial_number, 'x')}: in rows {other} and {serial} ({issuer})")
            else:
                seen[cert.serial_number] = serial
        if progress is not None:
            progress(rows_check.checked, total)
    return [rows_check, unique]


def _one_factory(db) -> Check:
    c = Check("one factory certificate per device")
    c.checked = db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]
    for serial, n in db.execute("SELECT d.serial, COUNT(c.serial) FROM devices d LEFT JOIN certificates c "
                                "ON c.device_serial = d.serial AND c.profile = 'factory' GROUP BY d.serial "
                                "HAVING COUNT(c.serial) != 1 ORDER BY d.serial").fetchall():
        c.problem(f"device {serial}: {n} factory certificates")
    return c


def _one_current(db) -> Check:
    c = Check("at most one current certificate per device and profile")
    c.checked = db.execute("SELECT COUNT(*) FROM certificates WHERE status = 'current' "
                           "AND device_serial IS NOT NULL").fetchone()[0]
    for serial, profile, n in db.execute(
            "SELECT device_serial, profile, COUNT(*) FROM certificates WHERE status = 'current' "
            "AND device_serial IS NOT NULL GROUP BY device_serial, profile HAVING COUNT(*) > 1 "
            "ORDER BY device_serial, profile").fetchall():
        c.problem(f"device {serial}: {n} current {profile} certificates")
    return c


def _revoked_devices(db) -> Check:
    c = Check("every certificate of a revoked device is revoked")
    c.checked = db.execute("SELECT COUNT(*) FROM devices WHERE state = 'revoked'").fetchone()[0]
    for device, serial, status in db.execute(
            "SELECT d.serial, c.serial, c.status FROM devices d JOIN certificates c ON c.device_serial = d.serial "
            "WHERE d.state = 'revoked' AND c.status != 'revoked' ORDER BY d.serial, c.serial").fetchall():
        c.problem(f"device {device} is revoked, its certificate {serial} is {status}")
    return c


def _serial_blocks(db) -> Check:
    c = Check("serial blocks ahead of every device serial issued from them")
    blocks = dict(db.execute("SELECT prefix, next FROM serial_sequences").fetchall())
    c.checked = len(blocks)
    if not blocks:
        c.note = "no serial block reserved (no 'devid provision' yet)"
        return c
    after = None
    while True:
        where = "" if after is None else " WHERE serial > ?"
        rows = db.execute(f"SELECT serial FROM devices{where} ORDER BY serial LIMIT {PAGE}",
                          () if after is None else (after,)).fetchall()
        if not rows:
            break
        after = rows[-1][0]
        for (serial,) in rows:
            prefix, digits = serial[:-SERIAL_DIGITS], serial[-SERIAL_DIGITS:]
            if prefix in blocks and digits.isdigit() and digits.isascii() and int(digits) >= blocks[prefix]:
                c.problem(f"device {serial}: at or beyond its block's next number {blocks[prefix]} "
                          f"(prefix {prefix!r}): the next 'devid provision' would issue it again")
    return c


def _crl_numbers(db) -> Check:
    c = Check("CRL numbers positive")
    rows = db.execute("SELECT issuer, number FROM crl_numbers ORDER BY issuer").fetchall()
    c.checked = len(rows)
    for issuer, number in rows:
        if number < 1:
            c.problem(f"CRL number of {issuer}: {number}")
    return c


def _log_chain(registry, segment_dirs: list[Path], trusted) -> Check:
    c = Check("attestation log chain intact (segments and registry)")
    report = verify_log(AttestationStore(registry), segment_dirs, trusted)
    c.checked = report.entries
    for _, message in report.problems:
        c.problem(message)
    archived = sum(1 for s in report.segments if s.status == "archived-not-present")
    c.note = (f"head {report.head_seq}:{report.head_hash.hex()}"
              + (f"; {archived} archived segment(s) checked through their anchors only" if archived else ""))
    return c


def _verdict_uses(db) -> Check:
    c = Check("verdict uses name acceptable appraisal entries")
    rotated = db.execute("SELECT MAX(last_seq) FROM attestation_log_segments").fetchone()[0] or 0
    in_segments = 0
    for seq, entry, acceptable, summary in db.execute(
            "SELECT u.seq, l.seq, l.acceptable, l.summary FROM attestation_verdict_uses u "
            "LEFT JOIN attestation_log l ON l.seq = u.seq ORDER BY u.seq").fetchall():
        c.checked += 1
        if entry is None:
            if seq <= rotated:
                in_segments += 1
            else:
                c.problem(f"verdict use of entry {seq}: no such entry")
        elif summary is not None:
            c.problem(f"verdict use of entry {seq}: a summary entry, not an appraisal")
        elif not acceptable:
            c.problem(f"verdict use of entry {seq}: the appraisal was not acceptable")
    if in_segments:
        c.note = f"{in_segments} use(s) of entries rotated into segments (not in the registry)"
    return c


def _ca_recorded(db, certs: dict[str, x509.Certificate]) -> Check:
    from cryptography.hazmat.primitives import hashes
    c = Check("the data directory's CA and gateway certificates are recorded")
    for name, cert in certs.items():
        c.checked += 1
        fp = cert.fingerprint(hashes.SHA256()).hex()
        row = db.execute("SELECT fingerprint FROM certificates WHERE serial = ?",
                         (format(cert.serial_number, "x"),)).fetchone()
        if row is None or row[0] != fp:
            c.problem(f"{name} certificate ({fp[:16]}...) is not recorded in the registry")
    root = db.execute("SELECT value FROM deployment WHERE key = 'root_fingerprint'").fetchone()
    if "root" in certs and root is not None and root[0] != certs["root"].fingerprint(hashes.SHA256()).hex():
        c.problem(f"the registry's deployment names root {root[0][:16]}..., not this data directory's")
    return c


__all__ = ["Check", "CheckReport", "check_registry"]
