"""`attestation.NonceStore` and `attestation.LogStore` on the registry's database, either engine
(tables of schema migration 2 in gateway/store/schema.py).

Both use the registry's connection and its transactions, so they are atomic across every gateway
process that shares the database (on PostgreSQL: across every host):

- consuming a nonce is one `UPDATE ... WHERE consumed_at IS NULL AND <bound to this device> AND
  expires_at > now`, checked by its row count; only when it changes nothing does a `SELECT` in
  the same transaction say why;
- appending to the log reads the head (and the device's refused-evidence tally, in the same
  statement) and inserts the next entry in one transaction, serialised with every other append
  (SQLite: its write lock; PostgreSQL: an advisory lock, `LOCK_LOG`), so appends from several
  processes and hosts make one chain; the tally row (table
  attestation_refused, migration 4) is written only when refused evidence is involved;
- taking a verdict for an enrollment inserts its sequence number into a table where it is the
  primary key, in the same transaction as the lookup;
- rotation (gateway/store/log_rotation.py) records a segment's anchor row and deletes its entries in
  one transaction, after checking that the registry still holds exactly what the file holds.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Callable, Iterator

from devid.attestation.errors import LogError
from devid.attestation.log import (GENESIS, Admission, LogEntry, RefusedSummary, RefusedTally, format_time, parse_time,
                             summary_entry)
from devid.attestation.nonces import ConsumeResult, NonceRecord, classify
from devid.attestation.policy import Tier
from devid.attestation.segments import SegmentAnchor

from devid.gateway.store.postgres import LOCK_LOG
from devid.gateway.store.registry import RegistryQueries

_LOG_COLS = ("seq, time, device_serial, device_type, cert_fingerprint, tier, acceptable, revoke, reasons, claims, "
             "evidence, prev_hash, hash, summary, nonce_kind")
_TALLY_COLS = ("window_end, logged, suppressed, first_at, last_at, reason_counts, device_type, cert_fingerprint, "
               "tier")
_ANCHOR_COLS = "first_seq, last_seq, prev_hash, head_hash, entries, file_name, file_sha256, sealed_at"
# The head of the chain (the last entry; after a rotation that left the registry empty, the last
# segment's head), with the device's tally joined in for a budgeted append: one statement, every
# part a primary-key lookup (~5 us against ~4 us for the head alone; subqueries with ORDER BY ...
# LIMIT in the FROM clause were materialised and cost ~40 us).
_HEAD_JOINS = ("FROM (SELECT 1) AS one "
               "LEFT JOIN attestation_log l ON l.seq = (SELECT MAX(seq) FROM attestation_log) "
               "LEFT JOIN attestation_log_segments s ON s.first_seq = (SELECT MAX(first_seq) "
               "FROM attestation_log_segments)")
_HEAD = "SELECT l.seq, l.hash, s.last_seq, s.head_hash " + _HEAD_JOINS
_HEAD_AND_TALLY = ("SELECT l.seq, l.hash, s.last_seq, s.head_hash, b.window_end, b.logged, b.suppressed, b.first_at, "
                   "b.last_at, b.reason_counts, b.device_type, b.cert_fingerprint, b.tier " + _HEAD_JOINS +
                   " LEFT JOIN attestation_refused b ON b.device_serial = ?")


def _entry(row: tuple) -> LogEntry:
    try:
        summary = None
        if row[13] is not None:
            s = json.loads(row[13])
            summary = RefusedSummary(s["count"], s["first"], s["last"], tuple(sorted(s["reason_counts"].items())))
        return LogEntry(seq=row[0], time=row[1], device_serial=row[2], device_type=row[3], cert_fingerprint=row[4],
                        tier=Tier(row[5]), acceptable=bool(row[6]), revoke=bool(row[7]),
                        reasons=tuple(json.loads(row[8])), claims=json.loads(row[9]) if row[9] is not None else None,
                        evidence=bytes(row[10]), prev_hash=bytes(row[11]), hash=bytes(row[12]), summary=summary,
                        nonce=row[14])
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise LogError(f"attestation log entry {row[0]} is unreadable: {exc}") from None


def _insert(db, e: LogEntry) -> None:
    summary = None
    if e.summary is not None:
        summary = json.dumps({"count": e.summary.count, "first": e.summary.first, "last": e.summary.last,
                              "reason_counts": e.summary.counts()})
    db.execute(f"INSERT INTO attestation_log ({_LOG_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
               (e.seq, e.time, e.device_serial, e.device_type, e.cert_fingerprint, e.tier.value,
                int(e.acceptable), int(e.revoke), json.dumps(list(e.reasons)),
                json.dumps(e.claims) if e.claims is not None else None, e.evidence, e.prev_hash, e.hash, summary,
                e.nonce))


def _head(row: tuple) -> tuple[int, bytes]:
    if row[0] is not None:
        return row[0], bytes(row[1])
    if row[2] is not None:
        return row[2], bytes(row[3])
    return 0, GENESIS


def _tally(row: tuple) -> RefusedTally | None:
    if row[0] is None:
        return None
    return RefusedTally(window_end=row[0], logged=row[1], suppressed=row[2], first=row[3], last=row[4],
                        reason_counts=tuple((c, n) for c, n in json.loads(row[5])), device_type=row[6],
                        cert_fingerprint=row[7], tier=Tier(row[8]))


def _write_tally(db, device_serial: str, t: RefusedTally | None) -> None:
    if t is None:
        db.execute("DELETE FROM attestation_refused WHERE device_serial = ?", (device_serial,))
        return
    db.execute(f"INSERT INTO attestation_refused (device_serial, {_TALLY_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?) "
               "ON CONFLICT (device_serial) DO UPDATE SET "
               + ", ".join(f"{c} = excluded.{c}" for c in _TALLY_COLS.split(", ")),
               (device_serial, t.window_end, t.logged, t.suppressed, t.first, t.last,
                json.dumps([list(p) for p in t.reason_counts]), t.device_type, t.cert_fingerprint, t.tier.value))


def _anchor(row: tuple) -> SegmentAnchor:
    return SegmentAnchor(first_seq=row[0], last_seq=row[1], prev_hash=bytes(row[2]), head_hash=bytes(row[3]),
                         entries=row[4], file_name=row[5], file_sha256=row[6], sealed_at=row[7])


class AttestationStore:
    """Nonces and the log, on the registry's database (`SQLiteRegistry` or `PostgresRegistry`)."""

    def __init__(self, registry: RegistryQueries) -> None:
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
                               f"ORDER BY issued_at DESC, rowid DESC LIMIT {self.registry.NO_LIMIT} OFFSET ?)",
                               (record.device_serial, max_outstanding))
        except self.registry.integrity_errors:
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
        sql, params = "SELECT COUNT(*) FROM attestation_nonces WHERE 1 = 1", []
        if device_serial is not None:
            sql += " AND device_serial = ?"
            params.append(device_serial)
        if outstanding:
            sql += " AND consumed_at IS NULL"
        with self.registry.reading() as db:
            return db.execute(sql, params).fetchone()[0]

    # -- log -------------------------------------------------------------------------------

    def append_entry(self, build: Callable[[int, bytes], LogEntry], *, device_serial: str | None = None,
                     admit: Callable[[RefusedTally | None], Admission] | None = None,
                     used_for: str | None = None, now: datetime | None = None) -> LogEntry | None:
        with self.registry.transaction() as db:
            self.registry.serialize(db, LOCK_LOG)
            e = self._append(db, build, device_serial, admit)
            if used_for is not None and e is not None and e.acceptable:
                db.execute("INSERT INTO attestation_verdict_uses (seq, used_at, purpose) VALUES (?, ?, ?)",
                           (e.seq, format_time(now), used_for))
        return e

    @staticmethod
    def _append(db, build, device_serial, admit) -> LogEntry | None:
        if admit is None:
            seq, prev = _head(db.execute(_HEAD).fetchone())
            e = build(seq + 1, prev)
            _insert(db, e)
            return e
        row = db.execute(_HEAD_AND_TALLY, (device_serial,)).fetchone()
        seq, prev = _head(row)
        adm = admit(_tally(row[4:]))
        if adm.summarise is not None:
            s = summary_entry(device_serial, adm.summarise, seq + 1, prev, adm.time)
            _insert(db, s)
            seq, prev = s.seq, s.hash
        e = None
        if adm.append:
            e = build(seq + 1, prev)
            _insert(db, e)
        if adm.write:
            _write_tally(db, device_serial, adm.tally)
        return e

    def flush_refused(self, now: datetime) -> list[LogEntry]:
        t, out = format_time(now), []
        with self.registry.transaction() as db:
            self.registry.serialize(db, LOCK_LOG)
            rows = db.execute(f"SELECT device_serial, {_TALLY_COLS} FROM attestation_refused "
                              "WHERE suppressed > 0 OR window_end <= ? ORDER BY device_serial", (t,)).fetchall()
            if not rows:
                return out
            seq, prev = _head(db.execute(_HEAD).fetchone())
            for row in rows:
                serial, tally = row[0], _tally(row[1:])
                if tally.suppressed:
                    s = summary_entry(serial, tally, seq + 1, prev, t)
                    _insert(db, s)
                    out.append(s)
                    seq, prev = s.seq, s.hash
                _write_tally(db, serial, None if tally.window_end <= t else RefusedTally(tally.window_end,
                                                                                         tally.logged))
        return out

    def refused_tallies(self) -> dict[str, RefusedTally]:
        with self.registry.reading() as db:
            rows = db.execute(f"SELECT device_serial, {_TALLY_COLS} FROM attestation_refused").fetchall()
        return {r[0]: _tally(r[1:]) for r in rows}

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

    def iter_log(self, first: int | None = None, last: int | None = None) -> Iterator[LogEntry]:
        """Every entry (or those from `first` to `last`), in sequence order, read in batches."""
        lo, hi = first if first is not None else -(2 ** 63), last if last is not None else 2 ** 63 - 1
        # in pages by key: psycopg's cursor would fetch every row of one SELECT into memory at once
        with self.registry.reading() as db:
            while True:
                batch = db.execute(f"SELECT {_LOG_COLS} FROM attestation_log WHERE seq BETWEEN ? AND ? "
                                   "ORDER BY seq LIMIT 500", (lo, hi)).fetchall()
                for r in batch:
                    yield _entry(r)
                if len(batch) < 500:
                    return
                lo = batch[-1][0] + 1

    def take_verdict(self, device_serial: str, since: datetime, now: datetime, purpose: str) -> LogEntry | None:
        with self.registry.transaction() as db:
            row = db.execute(f"SELECT {_LOG_COLS}, (SELECT suppressed FROM attestation_refused "
                             "WHERE device_serial = ?) FROM attestation_log WHERE device_serial = ? AND time >= ? "
                             "ORDER BY seq DESC LIMIT 1", (device_serial, device_serial, format_time(since))).fetchone()
            # refused evidence counted after the latest logged verdict makes that the latest verdict
            if row is None or not row[6] or row[15]:
                return None
            cur = db.execute("INSERT INTO attestation_verdict_uses (seq, used_at, purpose) VALUES (?, ?, ?) "
                             "ON CONFLICT (seq) DO NOTHING", (row[0], format_time(now), purpose))
            if cur.rowcount != 1:
                return None
        return _entry(row[:15])

    # -- segments (gateway/store/log_rotation.py) --------------------------------------------------

    def log_span(self) -> tuple[int, int, int] | None:
        """(first seq, last seq, number of entries) of the log in the registry; None if empty."""
        with self.registry.reading() as db:
            first, last, n = db.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM attestation_log").fetchone()
        return None if first is None else (first, last, n)

    def last_seq_before(self, time: datetime) -> int | None:
        """The last entry of the longest prefix of the registry's log whose entries are all older
        than `time`; None if the first entry is not."""
        with self.registry.reading() as db:
            first, last = db.execute("SELECT MIN(seq), MAX(seq) FROM attestation_log").fetchone()
            if first is None:
                return None
            young = db.execute("SELECT MIN(seq) FROM attestation_log WHERE time >= ?",
                               (format_time(time),)).fetchone()[0]
        end = last if young is None else young - 1
        return end if end >= first else None

    def segments(self) -> list[SegmentAnchor]:
        with self.registry.reading() as db:
            rows = db.execute(f"SELECT {_ANCHOR_COLS} FROM attestation_log_segments ORDER BY first_seq").fetchall()
        return [_anchor(r) for r in rows]

    def record_segment(self, anchor: SegmentAnchor) -> None:
        """In one transaction: check that the registry's log starts with exactly the entries the
        segment holds (first seq, count, the first's link and the last's hash) right after the
        last recorded segment, then insert the anchor row and delete those entries."""
        with self.registry.transaction() as db:
            self.registry.serialize(db, LOCK_LOG)
            last = db.execute("SELECT last_seq, head_hash FROM attestation_log_segments "
                              "ORDER BY first_seq DESC LIMIT 1").fetchone()
            start, link = (last[0] + 1, bytes(last[1])) if last else (1, GENESIS)
            if anchor.first_seq != start or anchor.prev_hash != link:
                raise LogError(f"segment {anchor.file_name} does not continue the last recorded segment "
                               f"(expected it to start at entry {start})")
            first, n = db.execute("SELECT MIN(seq), COUNT(*) FROM attestation_log WHERE seq <= ?",
                                  (anchor.last_seq,)).fetchone()
            ends = db.execute("SELECT (SELECT prev_hash FROM attestation_log WHERE seq = ?), "
                              "(SELECT hash FROM attestation_log WHERE seq = ?)",
                              (anchor.first_seq, anchor.last_seq)).fetchone()
            if (first != anchor.first_seq or n != anchor.entries or ends[0] is None or ends[1] is None
                    or bytes(ends[0]) != anchor.prev_hash or bytes(ends[1]) != anchor.head_hash):
                raise LogError(f"segment {anchor.file_name} does not hold what the registry holds for entries "
                               f"{anchor.first_seq}..{anchor.last_seq}: nothing was deleted")
            db.execute(f"INSERT INTO attestation_log_segments ({_ANCHOR_COLS}) VALUES (?,?,?,?,?,?,?,?)",
                       (anchor.first_seq, anchor.last_seq, anchor.prev_hash, anchor.head_hash, anchor.entries,
                        anchor.file_name, anchor.file_sha256, anchor.sealed_at))
            db.execute("DELETE FROM attestation_log WHERE seq <= ?", (anchor.last_seq,))

    def gateway_certificates(self) -> list[bytes]:
        """DER of every certificate the registry holds for the gateway (profile 'gateway'): the
        certificates that may seal log segments."""
        with self.registry.reading() as db:
            return [bytes(r[0]) for r in db.execute("SELECT der FROM certificates WHERE profile = 'gateway'")]
