"""`attestation.NonceStore` and `attestation.LogStore` on the registry's SQLite database
(tables of schema migration 2 in gateway/registry.py).

Both use the registry's connection and its `BEGIN IMMEDIATE` transactions, so they are atomic
across every gateway process that shares the database file:

- consuming a nonce is one `UPDATE ... WHERE consumed_at IS NULL AND <bound to this device> AND
  expires_at > now`, checked by its row count; only when it changes nothing does a `SELECT` in
  the same transaction say why;
- appending to the log reads the head and inserts the next entry in one transaction;
- taking a verdict for an enrollment inserts its sequence number into a table where it is the
  primary key, in the same transaction as the lookup.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from typing import Callable, Iterator

from attestation.errors import LogError
from attestation.log import GENESIS, LogEntry, format_time, parse_time
from attestation.nonces import ConsumeResult, NonceRecord, classify
from attestation.policy import Tier

from .registry import SQLiteRegistry

_LOG_COLS = ("seq, time, device_serial, device_type, cert_fingerprint, tier, acceptable, revoke, reasons, claims, "
             "evidence, prev_hash, hash")


def _entry(row: tuple) -> LogEntry:
    try:
        return LogEntry(seq=row[0], time=row[1], device_serial=row[2], device_type=row[3], cert_fingerprint=row[4],
                        tier=Tier(row[5]), acceptable=bool(row[6]), revoke=bool(row[7]),
                        reasons=tuple(json.loads(row[8])), claims=json.loads(row[9]) if row[9] is not None else None,
                        evidence=bytes(row[10]), prev_hash=bytes(row[11]), hash=bytes(row[12]))
    except (ValueError, TypeError) as exc:
        raise LogError(f"attestation log entry {row[0]} is unreadable: {exc}") from None


class SQLiteAttestationStore:
    def __init__(self, registry: SQLiteRegistry) -> None:
        self.registry = registry
        self._purged: datetime | None = None

    # -- nonces ----------------------------------------------------------------------------

    PURGE_EVERY = timedelta(seconds=30)

    def put_nonce(self, record: NonceRecord, *, purge_before: datetime, max_outstanding: int | None = None) -> bool:
        # expired nonces go at most every PURGE_EVERY, not with every new nonce
        purge = self._purged is None or purge_before >= self._purged + self.PURGE_EVERY
        try:
            with self.registry.transaction() as db:
                if purge:
                    db.execute("DELETE FROM attestation_nonces WHERE expires_at < ?", (format_time(purge_before),))
                db.execute("INSERT INTO attestation_nonces (nonce, device_serial, cert_fingerprint, session, "
                           "issued_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                           (record.value, record.device_serial, record.cert_fingerprint, record.session,
                            format_time(record.issued_at), format_time(record.expires_at)))
                if max_outstanding is not None:
                    # the device's unconsumed nonces beyond the newest `max_outstanding` (index
                    # attestation_nonces_outstanding, migration 5: a few rows, never a table scan)
                    db.execute("DELETE FROM attestation_nonces WHERE rowid IN (SELECT rowid FROM attestation_nonces "
                               "WHERE device_serial = ? AND consumed_at IS NULL "
                               "ORDER BY issued_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                               (record.device_serial, max_outstanding))
        except sqlite3.IntegrityError:
            return False
        if purge:
            self._purged = purge_before
        return True

    def consume_nonce(self, value: bytes, device_serial: str, cert_fingerprint: str, session: bytes | None,
                      now: datetime) -> ConsumeResult:
        t = format_time(now)
        with self.registry.transaction() as db:
            cur = db.execute(
                "UPDATE attestation_nonces SET consumed_at = ? WHERE nonce = ? AND consumed_at IS NULL "
                "AND device_serial = ? AND cert_fingerprint = ? AND (session IS NULL OR session = ?) "
                "AND expires_at > ?", (t, value, device_serial, cert_fingerprint, session, t))
            if cur.rowcount == 1:
                return ConsumeResult.OK
            row = db.execute("SELECT device_serial, cert_fingerprint, session, issued_at, expires_at, consumed_at "
                             "FROM attestation_nonces WHERE nonce = ?", (value,)).fetchone()
        if row is None:
            return ConsumeResult.UNKNOWN
        record = NonceRecord(value, row[0], row[1], parse_time(row[3]), parse_time(row[4]),
                             bytes(row[2]) if row[2] is not None else None)
        result = classify(record, row[5] is not None, device_serial, cert_fingerprint, session, now)
        # the UPDATE refused it, so the SELECT cannot find it usable (same transaction)
        return result if result is not ConsumeResult.OK else ConsumeResult.REPLAYED

    def count_nonces(self, device_serial: str | None = None, *, outstanding: bool = False) -> int:
        """All stored nonces, or those of one device; `outstanding`: only unconsumed ones."""
        sql, params = "SELECT COUNT(*) FROM attestation_nonces WHERE 1", []
        if device_serial is not None:
            sql += " AND device_serial = ?"
            params.append(device_serial)
        if outstanding:
            sql += " AND consumed_at IS NULL"
        with self.registry.reading() as db:
            return db.execute(sql, params).fetchone()[0]

    # -- log -------------------------------------------------------------------------------

    def append_entry(self, build: Callable[[int, bytes], LogEntry]) -> LogEntry:
        with self.registry.transaction() as db:
            head = db.execute("SELECT seq, hash FROM attestation_log ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (head[0], bytes(head[1])) if head else (0, GENESIS)
            e = build(seq + 1, prev)
            db.execute(f"INSERT INTO attestation_log ({_LOG_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       (e.seq, e.time, e.device_serial, e.device_type, e.cert_fingerprint, e.tier.value,
                        int(e.acceptable), int(e.revoke), json.dumps(list(e.reasons)),
                        json.dumps(e.claims) if e.claims is not None else None, e.evidence, e.prev_hash, e.hash))
        return e

    def log_entries(self, *, device_serial: str | None = None, tier: Tier | None = None,
                    since: datetime | None = None, limit: int | None = None) -> list[LogEntry]:
        where, params = [], []
        if device_serial is not None:
            where.append("device_serial = ?")
            params.append(device_serial)
        if tier is not None:
            where.append("tier = ?")
            params.append(tier.value)
        if since is not None:
            where.append("time >= ?")
            params.append(format_time(since))
        sql = f"SELECT {_LOG_COLS} FROM attestation_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self.registry.reading() as db:
            rows = db.execute(sql, params).fetchall()
        return [_entry(r) for r in reversed(rows)]

    def entry(self, seq: int) -> LogEntry | None:
        with self.registry.reading() as db:
            row = db.execute(f"SELECT {_LOG_COLS} FROM attestation_log WHERE seq = ?", (seq,)).fetchone()
        return _entry(row) if row else None

    def iter_log(self) -> Iterator[LogEntry]:
        with self.registry.reading() as db:
            rows = db.execute(f"SELECT {_LOG_COLS} FROM attestation_log ORDER BY seq")
            while batch := rows.fetchmany(500):
                for r in batch:
                    yield _entry(r)

    def take_verdict(self, device_serial: str, since: datetime, now: datetime, purpose: str) -> LogEntry | None:
        with self.registry.transaction() as db:
            row = db.execute(f"SELECT {_LOG_COLS} FROM attestation_log WHERE device_serial = ? AND time >= ? "
                             "ORDER BY seq DESC LIMIT 1", (device_serial, format_time(since))).fetchone()
            if row is None or not row[6]:
                return None
            cur = db.execute("INSERT INTO attestation_verdict_uses (seq, used_at, purpose) VALUES (?, ?, ?) "
                             "ON CONFLICT (seq) DO NOTHING", (row[0], format_time(now), purpose))
            if cur.rowcount != 1:
                return None
        return _entry(row)
