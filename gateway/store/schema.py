"""The registry's schema: its version and the migrations that build it, one list of statements
per version, applied statement by statement in one transaction when a writer opens the database
(`registry.py` holds the queries, `database.py` the connection)."""

from __future__ import annotations

from devid.gateway.store.database import Database
from devid.gateway.errors import RegistryError

SCHEMA_VERSION = 6

MIGRATIONS: dict[int, tuple[str, ...]] = {  # version -> its statements, run in one transaction
    1: (
        """CREATE TABLE devices (
                serial            TEXT PRIMARY KEY,
                device_type       TEXT NOT NULL,
                state             TEXT NOT NULL CHECK (state IN ('manufactured', 'enrolled', 'revoked')),
                created_at        TEXT NOT NULL,
                updated_at        TEXT NOT NULL,
                enrolled_at       TEXT,
                revoked_at        TEXT,
                revocation_reason TEXT
            )""",
        "CREATE INDEX devices_state ON devices (state)",
        """CREATE TABLE certificates (
                serial            TEXT PRIMARY KEY,          -- certificate serial, lower-case hex: unique
                issuer            TEXT NOT NULL,
                profile           TEXT NOT NULL,
                device_serial     TEXT REFERENCES devices (serial),
                not_before        TEXT NOT NULL,
                not_after         TEXT NOT NULL,
                status            TEXT NOT NULL CHECK (status IN ('current', 'superseded', 'revoked')),
                fingerprint       TEXT NOT NULL UNIQUE,
                der               BLOB NOT NULL,
                issued_at         TEXT NOT NULL,
                revoked_at        TEXT,
                revocation_reason TEXT
            )""",
        "CREATE INDEX certificates_device ON certificates (device_serial, profile, status)",
        "CREATE INDEX certificates_revoked ON certificates (issuer) WHERE status = 'revoked'",
        "CREATE TABLE crl_numbers (issuer TEXT PRIMARY KEY, number INTEGER NOT NULL)",
        "CREATE TABLE serial_sequences (prefix TEXT PRIMARY KEY, next INTEGER NOT NULL)",
    ),
    # attestation: single-use nonces and the hash-chained attestation log (gateway/store/attestation_store.py)
    2: (
        """CREATE TABLE attestation_nonces (
                nonce             BLOB PRIMARY KEY,
                device_serial     TEXT NOT NULL,
                cert_fingerprint  TEXT NOT NULL,
                session           BLOB,
                issued_at         TEXT NOT NULL,
                expires_at        TEXT NOT NULL,
                consumed_at       TEXT
            )""",
        "CREATE INDEX attestation_nonces_expiry ON attestation_nonces (expires_at)",
        """CREATE TABLE attestation_log (
                seq               INTEGER PRIMARY KEY,
                time              TEXT NOT NULL,
                device_serial     TEXT NOT NULL,
                device_type       TEXT NOT NULL,
                cert_fingerprint  TEXT NOT NULL,
                tier              TEXT NOT NULL,
                acceptable        INTEGER NOT NULL,
                revoke            INTEGER NOT NULL,
                reasons           TEXT NOT NULL,
                claims            TEXT,
                evidence          BLOB NOT NULL,
                prev_hash         BLOB NOT NULL,
                hash              BLOB NOT NULL
            )""",
        "CREATE INDEX attestation_log_device ON attestation_log (device_serial, seq)",
        "CREATE INDEX attestation_log_time ON attestation_log (time)",
        """CREATE TABLE attestation_verdict_uses (
                seq               INTEGER PRIMARY KEY,
                used_at           TEXT NOT NULL,
                purpose           TEXT NOT NULL
            )""",
    ),
    # certificates.fingerprint without UNIQUE: the serial is the key, nothing looks certificates up
    # by fingerprint, and its unique index cost a B-tree insert at a random place per certificate.
    # SQLite cannot drop an inline UNIQUE, so the table is rebuilt (rowids kept: they order
    # certificates_for_device) and its two indexes are made again.
    3: (
        """CREATE TABLE certificates_v3 (
                serial            TEXT PRIMARY KEY,          -- certificate serial, lower-case hex: unique
                issuer            TEXT NOT NULL,
                profile           TEXT NOT NULL,
                device_serial     TEXT REFERENCES devices (serial),
                not_before        TEXT NOT NULL,
                not_after         TEXT NOT NULL,
                status            TEXT NOT NULL CHECK (status IN ('current', 'superseded', 'revoked')),
                fingerprint       TEXT NOT NULL,             -- SHA-256 of der, hex
                der               BLOB NOT NULL,
                issued_at         TEXT NOT NULL,
                revoked_at        TEXT,
                revocation_reason TEXT
            )""",
        """INSERT INTO certificates_v3 (rowid, serial, issuer, profile, device_serial, not_before, not_after, status,
                                         fingerprint, der, issued_at, revoked_at, revocation_reason)
                SELECT rowid, serial, issuer, profile, device_serial, not_before, not_after, status,
                       fingerprint, der, issued_at, revoked_at, revocation_reason FROM certificates""",
        "DROP TABLE certificates",
        "ALTER TABLE certificates_v3 RENAME TO certificates",
        "CREATE INDEX certificates_device ON certificates (device_serial, profile, status)",
        "CREATE INDEX certificates_revoked ON certificates (issuer) WHERE status = 'revoked'",
    ),
    # bounded attestation log (gateway/store/attestation_store.py, gateway/store/log_rotation.py): summary entries
    # for refused evidence beyond a device's budget (summary: their JSON; NULL on appraisal entries),
    # one tally row per device with recent refused evidence, and one anchor row per sealed segment
    # file the oldest entries were moved into
    4: (
        "ALTER TABLE attestation_log ADD COLUMN summary TEXT",
        """CREATE TABLE attestation_refused (
                device_serial     TEXT PRIMARY KEY,
                window_end        TEXT NOT NULL,
                logged            INTEGER NOT NULL,
                suppressed        INTEGER NOT NULL,
                first_at          TEXT,
                last_at           TEXT,
                reason_counts     TEXT NOT NULL,
                device_type       TEXT NOT NULL,
                cert_fingerprint  TEXT NOT NULL,
                tier              TEXT NOT NULL
            )""",
        """CREATE TABLE attestation_log_segments (
                first_seq         INTEGER PRIMARY KEY,
                last_seq          INTEGER NOT NULL UNIQUE,
                prev_hash         BLOB NOT NULL,
                head_hash         BLOB NOT NULL,
                entries           INTEGER NOT NULL,
                file_name         TEXT NOT NULL UNIQUE,
                file_sha256       TEXT NOT NULL,
                sealed_at         TEXT NOT NULL
            )""",
    ),
    # A device's unconsumed nonces, newest first: issuing a nonce deletes
    # the device's oldest ones beyond its cap (gateway/store/attestation_store.py) through this index
    5: (
        """CREATE INDEX attestation_nonces_outstanding ON attestation_nonces (device_serial, issued_at)
                WHERE consumed_at IS NULL""",
    ),
    # the kind of nonce an appraisal's evidence carried (attestation/log.py): 'session' (the DTLS
    # session's exporter value, docs/evidence.md) or 'server' (GET /attest/nonce); NULL on summary
    # entries, entries written before this version, and evidence that could not be decoded
    6: (
        "ALTER TABLE attestation_log ADD COLUMN nonce_kind TEXT",
    ),
}


def open_schema(db: Database, create: bool, readonly: bool) -> None:
    """At open: refuse an empty registry unless creating one; a reader needs the current version,
    a writer brings an older one up to date."""
    version = db.schema_version
    if not create and version == 0:
        raise RegistryError(f"{db.path}: the registry is empty; only 'devid init' creates one "
                            "(restore it from a backup if this data directory was in use)")
    if readonly:
        if version != SCHEMA_VERSION:
            raise RegistryError(f"{db.path}: schema version {version}, this devid reads {SCHEMA_VERSION}"
                                + ("; upgrade devid" if version > SCHEMA_VERSION else
                                   "; run a command that writes (e.g. 'devid serve') to migrate it"))
    else:
        migrate(db)


def migrate(db: Database) -> None:
    with db.transaction() as con:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(f"{db.path}: schema version {version} is newer than this devid "
                                f"({SCHEMA_VERSION}); upgrade devid")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            # statement by statement: executescript() would COMMIT the open transaction
            for statement in MIGRATIONS[v]:
                con.execute(statement)
            con.execute(f"PRAGMA user_version = {v}")
