"""The registry's queries (`ca.store.Registry`), written once for both engines: `SQLiteRegistry`
(the embedded default: SQLite in WAL mode, `database.py`) and `postgres_registry.PostgresRegistry`
(PostgreSQL, `postgres.py`).

On SQLite every write runs in a `BEGIN IMMEDIATE` transaction, so concurrent writers from
several processes serialise on the database lock. On PostgreSQL (READ COMMITTED) the steps that
read and then write take the row they depend on first: an issuance locks its device row
(`FOR_UPDATE`), a revocation changes the device row before its certificates, so an issuance
and a revocation of one device never interleave on either engine; counters (serial blocks, CRL
numbers) are one `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` each.

The schema and its migrations: `gateway/store/schema.py`. Durability (what survives a power
cut): `gateway/store/database.py`, `gateway/store/postgres.py`.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Callable, Iterator, Sequence

from devid.ca.errors import DeviceRevoked, DuplicateDevice, SerialCollision, UnknownDevice
from devid.ca.store import CertificateLookup, CertificateRecord, CertStatus, DeviceRecord, DeviceState

from devid.gateway.store.database import Database
from devid.gateway.store.schema import open_schema
from devid.gateway.errors import RegistryError  # noqa: F401  (re-exported for callers of the registry)


def _ts(t: datetime | None) -> str | None:
    """'YYYY-MM-DDTHH:MM:SSZ' in UTC (isoformat is C code; strftime took ~3 % of an issuance)."""
    if t is None:
        return None
    if t.tzinfo is not timezone.utc:
        t = t.astimezone(timezone.utc)
    return t.isoformat(timespec="seconds")[:19] + "Z"


def _dt(s: str | None) -> datetime | None:
    if s is None:
        return None
    return datetime.fromisoformat(s)       # 'YYYY-MM-DDTHH:MM:SSZ'; strptime is 10x slower


def _hex(serial: int) -> str:
    return format(serial, "x")


_DEVICE_COLS = "serial, device_type, state, created_at, updated_at, enrolled_at, revoked_at, revocation_reason, psk"
_CERT_COLS = ("serial, issuer, profile, device_serial, not_before, not_after, fingerprint, der, issued_at, "
              "status, revoked_at, revocation_reason")


def _device(row: tuple) -> DeviceRecord:
    return DeviceRecord(row[0], row[1], DeviceState(row[2]), _dt(row[3]), _dt(row[4]), _dt(row[5]),
                        _dt(row[6]), row[7], bool(row[8]))


def _cert(row: tuple) -> CertificateRecord:
    return CertificateRecord(int(row[0], 16), row[1], row[2], row[3], _dt(row[4]), _dt(row[5]), row[6],
                             bytes(row[7]), _dt(row[8]), CertStatus(row[9]), _dt(row[10]), row[11])


def _cert_params(c: CertificateRecord) -> tuple:
    return (_hex(c.serial), c.issuer, c.profile, c.device_serial, _ts(c.not_before), _ts(c.not_after),
            c.fingerprint, c.der, _ts(c.issued_at), c.status.value, _ts(c.revoked_at), c.revocation_reason)


class RegistryQueries:
    """`ca.store.Registry` on either engine: mixed into a database class that provides
    `transaction`, `reading`, `FOR_UPDATE`, `integrity_errors` and `duplicate_table`."""

    def _open_schema(self, create: bool, readonly: bool) -> None:
        open_schema(self, create, readonly)     # gateway/store/schema.py

    @contextmanager
    def device_transaction(self, device_serial: str) -> Iterator:
        """A durable transaction in which one device's checks and writes (its standing, its
        certificate quota, its verdict, the issuance) see no concurrent change to that device:
        SQLite's write lock holds from BEGIN IMMEDIATE; on PostgreSQL the device's row is locked
        first (FOR UPDATE), so a racing request for the same device, on any worker of any host,
        waits for this one's COMMIT and then sees what it wrote."""
        with self.transaction(durable=True) as db:
            if self.FOR_UPDATE:
                db.execute(f"SELECT 1 FROM devices WHERE serial = ?{self.FOR_UPDATE}", (device_serial,))
            yield db

    def _collision(self, exc: Exception) -> SerialCollision:
        table = self.duplicate_table(exc)
        if table == "devices":
            return DuplicateDevice("device serial already registered")
        if table == "certificates":
            return SerialCollision("certificate serial already used")
        raise exc

    # -- devices -----------------------------------------------------------------------------

    def get_device(self, serial: str) -> DeviceRecord | None:
        with self.reading() as db:
            row = db.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE serial = ?", (serial,)).fetchone()
        return _device(row) if row else None

    def list_devices(self, state: DeviceState | None = None, limit: int | None = None) -> list[DeviceRecord]:
        sql = f"SELECT {_DEVICE_COLS} FROM devices"
        params: list = []
        if state is not None:
            sql += " WHERE state = ?"
            params.append(state.value)
        sql += " ORDER BY serial"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self.reading() as db:
            return [_device(r) for r in db.execute(sql, params)]

    def count_devices(self) -> dict[str, int]:
        with self.reading() as db:
            return dict(db.execute("SELECT state, COUNT(*) FROM devices GROUP BY state").fetchall())

    def register_devices(self, pairs: Sequence[tuple[DeviceRecord, CertificateRecord]]) -> None:
        try:
            with self.transaction(durable=True) as db:
                db.executemany(f"INSERT INTO devices ({_DEVICE_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               [(d.serial, d.device_type, d.state.value, _ts(d.created_at), _ts(d.updated_at),
                                 _ts(d.enrolled_at), _ts(d.revoked_at), d.revocation_reason, int(d.psk))
                                for d, _ in pairs])
                db.executemany(f"INSERT INTO certificates ({_CERT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               [_cert_params(c) for _, c in pairs])
        except self.integrity_errors as exc:
            raise self._collision(exc) from None

    # -- certificates --------------------------------------------------------------------------

    def record_certificate(self, cert: CertificateRecord, *, supersede_profile: str | None = None,
                           new_state: DeviceState | None = None) -> None:
        try:
            with self.transaction(durable=True) as db:
                self._record(db, cert, supersede_profile, new_state)
        except self.integrity_errors as exc:
            raise self._collision(exc) from None

    def record_for_device(self, device_serial: str, build: Callable[[DeviceRecord], CertificateRecord], *,
                          supersede_profile: str | None = None,
                          new_state: DeviceState | None = None) -> CertificateRecord:
        """Device check, `build(device)` and the record, in one BEGIN IMMEDIATE: a revocation
        cannot slip between the check and the write, and there is no separate read transaction.
        `build` (the signature, ~0.1 ms) runs under the write lock; readers are not blocked (WAL)."""
        try:
            with self.transaction(durable=True) as db:
                row = db.execute(f"SELECT {_DEVICE_COLS} FROM devices WHERE serial = ?{self.FOR_UPDATE}",
                                 (device_serial,)).fetchone()
                if row is None:
                    raise UnknownDevice(f"unknown device {device_serial}")
                device = _device(row)
                if device.state is DeviceState.REVOKED:
                    raise DeviceRevoked(f"device {device_serial} is revoked")
                cert = build(device)
                if cert.device_serial != device_serial:
                    raise ValueError(f"built a certificate for {cert.device_serial}, not {device_serial}")
                self._record(db, cert, supersede_profile, new_state)
                return cert
        except self.integrity_errors as exc:
            raise self._collision(exc) from None

    @staticmethod
    def _record(db, cert: CertificateRecord, supersede_profile: str | None,
                new_state: DeviceState | None) -> None:
        """The writes of one issuance, inside the caller's transaction."""
        if supersede_profile is not None and cert.device_serial is not None:
            db.execute("UPDATE certificates SET status = 'superseded' "
                       "WHERE device_serial = ? AND profile = ? AND status = 'current'",
                       (cert.device_serial, supersede_profile))
        db.execute(f"INSERT INTO certificates ({_CERT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                   _cert_params(cert))
        if new_state is not None and cert.device_serial is not None:
            now = _ts(cert.issued_at)
            cur = db.execute(
                "UPDATE devices SET state = ?, updated_at = ?, "
                "enrolled_at = CASE WHEN ? = 'enrolled' THEN ? ELSE enrolled_at END "
                "WHERE serial = ? AND state != 'revoked'",
                (new_state.value, now, new_state.value, now, cert.device_serial))
            if cur.rowcount != 1:
                # the device was revoked (or removed) between the check and this write
                raise DeviceRevoked(f"device {cert.device_serial} is revoked")

    def record_certificates(self, records: Sequence[CertificateRecord], deployment: dict[str, str] | None = None,
                            *, replace_deployment: bool = False) -> None:
        """Insert certificate records (CA and gateway certificates) in one durable transaction;
        with `deployment` (devid init: the root's fingerprint, devid.toml), its rows too, once:
        a registry that already holds a deployment refuses (RegistryError), unless
        `replace_deployment` (a data directory's own SQLite registry, left by an init that was
        killed before its CA was renamed into place: nobody has that CA)."""
        try:
            with self.transaction(durable=True) as db:
                if deployment and replace_deployment:
                    db.execute("DELETE FROM deployment")
                if deployment:
                    if db.execute("SELECT COUNT(*) FROM deployment").fetchone()[0]:
                        raise RegistryError(f"{self.path} already holds a CA (root "
                                            f"{self._deployment(db).get('root_fingerprint', '?')[:16]}...): "
                                            "add this host to it with 'devid init --join', or name another registry")
                    db.executemany("INSERT INTO deployment (key, value) VALUES (?, ?)", sorted(deployment.items()))
                db.executemany(f"INSERT INTO certificates ({_CERT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                               [_cert_params(c) for c in records])
        except self.integrity_errors as exc:
            if self.duplicate_table(exc) == "deployment":     # another host's init won the race
                raise RegistryError(f"{self.path} already holds a CA: add this host to it with "
                                    "'devid init --join', or name another registry") from None
            raise self._collision(exc) from None

    @staticmethod
    def _deployment(db) -> dict[str, str]:
        return dict(db.execute("SELECT key, value FROM deployment").fetchall())

    def deployment(self) -> dict[str, str]:
        """What `devid init` recorded for every host of this registry (empty: nothing yet)."""
        with self.reading() as db:
            return self._deployment(db)

    def settle_deployment(self, key: str, value: str) -> str:
        """The deployment row `key`: recorded as `value` if the registry has none, else the value
        it holds (the first host to record one wins; compare with what you offered)."""
        with self.transaction(durable=True) as db:
            db.execute("INSERT INTO deployment (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING", (key, value))
            return db.execute("SELECT value FROM deployment WHERE key = ?", (key,)).fetchone()[0]

    def forget_init(self, records: Sequence[CertificateRecord]) -> bool:
        """Undo a failed `devid init`'s rows (its certificates, the deployment), only while no
        device has been registered; False if devices were, and nothing was undone."""
        with self.transaction(durable=True) as db:
            if db.execute("SELECT COUNT(*) FROM devices").fetchone()[0]:
                return False
            db.executemany("DELETE FROM certificates WHERE serial = ? AND device_serial IS NULL",
                           [(_hex(c.serial),) for c in records])
            db.execute("DELETE FROM deployment")
            return True

    def get_certificate(self, serial: int) -> CertificateRecord | None:
        with self.reading() as db:
            row = db.execute(f"SELECT {_CERT_COLS} FROM certificates WHERE serial = ?",
                                   (_hex(serial),)).fetchone()
        return _cert(row) if row else None

    def lookup_certificate(self, serial: int) -> CertificateLookup | None:
        # a superseded certificate was superseded when the next one of its profile was issued to
        # its device (the same transaction, `_record`): the subquery runs only for superseded
        # rows, on index certificates_device; rowids order certificates issued in the same second
        with self.reading() as db:
            row = db.execute(
                "SELECT c.der, c.profile, c.status, c.fingerprint, c.device_serial, d.device_type, d.state, d.psk, "
                "CASE WHEN c.status = 'superseded' THEN (SELECT MIN(n.issued_at) FROM certificates n "
                "  WHERE n.device_serial = c.device_serial AND n.profile = c.profile AND (n.issued_at > c.issued_at "
                "  OR (n.issued_at = c.issued_at AND n.rowid > c.rowid))) END "
                "FROM certificates c LEFT JOIN devices d ON d.serial = c.device_serial WHERE c.serial = ?",
                (_hex(serial),)).fetchone()
        if row is None:
            return None
        return CertificateLookup(bytes(row[0]), row[1], CertStatus(row[2]), row[3], row[4], row[5],
                                 DeviceState(row[6]) if row[6] else None, _dt(row[8]), bool(row[7]))

    def certificates_issued_since(self, device_serial: str, profile: str, since: datetime) -> list[datetime]:
        with self.reading() as db:
            rows = db.execute("SELECT issued_at FROM certificates WHERE device_serial = ? AND profile = ? "
                                    "AND issued_at >= ? ORDER BY issued_at", (device_serial, profile, _ts(since)))
            return [_dt(r[0]) for r in rows]

    def count_certificates(self, profile: str) -> int:
        """Certificates of a profile ever issued here (e.g. progress of a benchmark: each
        enrollment and each renewal adds one operational certificate)."""
        with self.reading() as db:
            return db.execute("SELECT COUNT(*) FROM certificates WHERE profile = ?", (profile,)).fetchone()[0]

    def certificates_matching(self, serial_prefix: str | None, fingerprint_prefix: str | None,
                              limit: int = 10) -> list[CertificateRecord]:
        hexdigits = set("0123456789abcdef")
        parts, params = [], []
        if serial_prefix and set(serial_prefix) <= hexdigits:
            # a range on the primary key ('g' sorts after every hex digit, ':' right after '9')
            upper = serial_prefix[:-1] + chr(ord(serial_prefix[-1]) + 1)
            parts.append(f"SELECT {_CERT_COLS} FROM certificates WHERE serial >= ? AND serial < ?")
            params += [serial_prefix, upper]
        if fingerprint_prefix and set(fingerprint_prefix) <= hexdigits:
            # fingerprints have no index (migration 3): a scan, for an operator's command only
            parts.append(f"SELECT {_CERT_COLS} FROM certificates WHERE fingerprint LIKE ?")
            params += [fingerprint_prefix + "%"]
        if not parts:
            return []
        with self.reading() as db:
            rows = db.execute(" UNION ".join(parts) + " LIMIT ?", (*params, limit)).fetchall()
        return [_cert(r) for r in rows]

    def revoke_certificate(self, serial: int, reason: str, now: datetime) -> bool:
        with self.transaction(durable=True) as db:
            cur = db.execute("UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                             "WHERE serial = ? AND status != 'revoked'", (_ts(now), reason, _hex(serial)))
            return cur.rowcount == 1

    def certificates_for_device(self, device_serial: str) -> list[CertificateRecord]:
        with self.reading() as db:
            rows = db.execute(f"SELECT {_CERT_COLS} FROM certificates WHERE device_serial = ? "
                                    "ORDER BY issued_at, rowid", (device_serial,)).fetchall()
        return [_cert(r) for r in rows]

    def revoke_device(self, serial: str, reason: str, now: datetime) -> list[CertificateRecord]:
        t = _ts(now)
        with self.transaction(durable=True) as db:
            # the device row first: an issuance to this device (which locks that row, `record_for_device`)
            # either committed before, and its certificate is revoked below, or waits and then finds
            # the device revoked
            db.execute("UPDATE devices SET state = 'revoked', revoked_at = COALESCE(revoked_at, ?), "
                       "revocation_reason = COALESCE(revocation_reason, ?), updated_at = ? WHERE serial = ?",
                       (t, reason, t, serial))
            # one statement: exactly the certificates this call revoked (not one a concurrent
            # revoke_certificate took between a SELECT and an UPDATE)
            rows = db.execute("UPDATE certificates SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
                              f"WHERE device_serial = ? AND status != 'revoked' RETURNING {_CERT_COLS}",
                              (t, reason, serial)).fetchall()
        return [_cert(r) for r in rows]

    def revoked_certificates(self, issuer: str) -> list[CertificateRecord]:
        with self.reading() as db:
            rows = db.execute(f"SELECT {_CERT_COLS} FROM certificates WHERE issuer = ? "
                                    "AND status = 'revoked' ORDER BY revoked_at, serial", (issuer,)).fetchall()
        return [_cert(r) for r in rows]

    def revocation_marker(self, issuer: str) -> tuple:
        """A cheap summary that changes when a certificate of `issuer` is revoked or a device is
        enrolled or revoked: (revoked certificates, the latest revocation, enrolled devices), from
        the indexes certificates_revoked and devices_state (what `devid serve --mqtt-broker`
        watches to know when the broker's CRL and ACL are stale)."""
        with self.reading() as db:
            count, latest = db.execute("SELECT COUNT(*), MAX(revoked_at) FROM certificates "
                                       "WHERE issuer = ? AND status = 'revoked'", (issuer,)).fetchone()
            enrolled = db.execute("SELECT COUNT(*) FROM devices WHERE state = 'enrolled'").fetchone()[0]
        return count, latest, enrolled

    def superseded_certificates(self, issuer: str, now: datetime) -> list[tuple[CertificateRecord, datetime]]:
        """The superseded certificates of `issuer` that have not expired, each with when it was
        superseded (the issue time of the next certificate of its profile for its device)."""
        with self.reading() as db:
            rows = db.execute(
                f"SELECT {_CERT_COLS}, (SELECT MIN(n.issued_at) FROM certificates n WHERE n.device_serial = "
                "c.device_serial AND n.profile = c.profile AND (n.issued_at > c.issued_at OR (n.issued_at = "
                "c.issued_at AND n.rowid > c.rowid))) FROM certificates c WHERE c.issuer = ? AND "
                "c.status = 'superseded' AND c.not_after > ? ORDER BY c.issued_at, c.serial",
                (issuer, _ts(now))).fetchall()
        return [(_cert(r[:12]), _dt(r[12]) or _dt(r[8])) for r in rows]

    def revoked_among(self, serials: Sequence[int]) -> set[int]:
        """Which of these certificate serials are revoked, or belong to a revoked device."""
        return self._serials_where(serials, "FROM certificates c LEFT JOIN devices d ON d.serial = c.device_serial "
                                            "WHERE c.serial IN ({marks}) AND (c.status = 'revoked' OR d.state = 'revoked')")

    def superseded_among(self, serials: Sequence[int], before: datetime) -> set[int]:
        """Which of these certificate serials were superseded before `before` (by the issue of
        the next certificate of their profile to their device, as in `lookup_certificate`)."""
        return self._serials_where(
            serials, "FROM certificates c WHERE c.serial IN ({marks}) AND c.status = 'superseded' "
                     "AND (SELECT MIN(n.issued_at) FROM certificates n WHERE n.device_serial = c.device_serial "
                     "  AND n.profile = c.profile AND (n.issued_at > c.issued_at "
                     "  OR (n.issued_at = c.issued_at AND n.rowid > c.rowid))) < ?", _ts(before))

    def _serials_where(self, serials: Sequence[int], sql: str, *params) -> set[int]:
        """`SELECT c.serial <sql>` over the serials, 500 at a time (SQLite's parameter limit)."""
        found: set[int] = set()
        hexes = [_hex(s) for s in serials]
        with self.reading() as db:
            for i in range(0, len(hexes), 500):
                chunk = hexes[i:i + 500]
                query = "SELECT c.serial " + sql.format(marks=",".join("?" * len(chunk)))
                found.update(int(r[0], 16) for r in db.execute(query, (*chunk, *params)))
        return found

    def next_crl_number(self, issuer: str) -> int:
        with self.transaction(durable=True) as db:
            return db.execute("INSERT INTO crl_numbers (issuer, number) VALUES (?, 1) "
                              "ON CONFLICT (issuer) DO UPDATE SET number = crl_numbers.number + 1 "
                              "RETURNING number", (issuer,)).fetchone()[0]

    def reserve_serial_block(self, prefix: str, count: int) -> int:
        # one statement: two gateways (two hosts on one PostgreSQL) never get the same block
        with self.transaction(durable=True) as db:
            end = db.execute("INSERT INTO serial_sequences (prefix, next) VALUES (?, ?) "
                             "ON CONFLICT (prefix) DO UPDATE SET next = serial_sequences.next + ? "
                             "RETURNING next", (prefix, 1 + count, count)).fetchone()[0]
            return end - count


class SQLiteRegistry(RegistryQueries, Database):
    """`ca.store.Registry` on SQLite, the embedded default. Connection set-up and transactions:
    `gateway/store/database.py`."""
