"""The registry's schema: its version and the migrations that build it, one list of statements
per version, applied statement by statement in one transaction when a writer opens the database
(`registry.py` holds the queries, `database.py` and `postgres.py` the connections).

One schema, two engines. SQLite's history is versions 1 to 6 (`MIGRATIONS`). PostgreSQL starts
at version 6 with the same tables, columns, keys and indexes built in one step
(`PG_MIGRATIONS[6]`); a later version adds its statements to both lists. The differences are
the types (BYTEA for BLOB, BIGINT for INTEGER), text compared byte by byte as SQLite does
(COLLATE "C", whatever the database's locale), and an explicit `rowid` identity column where the
queries order by SQLite's implicit rowid (certificates, nonces). The version is PRAGMA
user_version on SQLite and the one row of table devid_schema on PostgreSQL."""

from __future__ import annotations

from devid.gateway.store.database import Database
from devid.gateway.errors import RegistryError

SCHEMA_VERSION = 10

_FLEET_INDEXES = (
    "CREATE INDEX devices_state_serial ON devices (state, serial)",
    "CREATE INDEX devices_type_serial ON devices (device_type, serial)",
    # partial: only current operational certificates (a device's renewal is about those); the
    # per-device expiry lookups keep using certificates_device
    "CREATE INDEX certificates_expiry ON certificates (not_after, serial) "
    "WHERE status = 'current' AND profile = 'operational'",
)

_ISSUED_INDEX = (
    "CREATE INDEX certificates_issued ON certificates (issued_at) WHERE profile = 'operational'",
)

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
    # what every gateway host of one registry shares (docs/scale-out.md): the CA's root fingerprint
    # and the devid.toml of the first host, written by `devid init`, read by `devid init --join`
    7: (
        "CREATE TABLE deployment (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # the operator's pages of the fleet (gateway/store/fleet.py, keyset paging): devices by state or
    # type in serial order, and current certificates by expiry (who is due for renewal)
    8: _FLEET_INDEXES,
    # the overview's operational certificates issued per minute of the last hour (fleet.py),
    # asked on every page view: a range of this index, not a scan of every certificate
    9: _ISSUED_INDEX,
    # devices provisioned with a factory PSK (`devid provision --psk`): only they may open PSK
    # sessions (gateway/service/identity.py); every device before this version has none
    10: (
        "ALTER TABLE devices ADD COLUMN psk INTEGER NOT NULL DEFAULT 0",
    ),
}


_T = 'TEXT COLLATE "C"'
PG_MIGRATIONS: dict[int, tuple[str, ...]] = {
    6: (
        f"""CREATE TABLE devices (
                serial            {_T} PRIMARY KEY,
                device_type       {_T} NOT NULL,
                state             {_T} NOT NULL CHECK (state IN ('manufactured', 'enrolled', 'revoked')),
                created_at        {_T} NOT NULL,
                updated_at        {_T} NOT NULL,
                enrolled_at       {_T},
                revoked_at        {_T},
                revocation_reason {_T}
            )""",
        "CREATE INDEX devices_state ON devices (state)",
        f"""CREATE TABLE certificates (
                rowid             BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,
                serial            {_T} PRIMARY KEY,
                issuer            {_T} NOT NULL,
                profile           {_T} NOT NULL,
                device_serial     {_T} REFERENCES devices (serial),
                not_before        {_T} NOT NULL,
                not_after         {_T} NOT NULL,
                status            {_T} NOT NULL CHECK (status IN ('current', 'superseded', 'revoked')),
                fingerprint       {_T} NOT NULL,
                der               BYTEA NOT NULL,
                issued_at         {_T} NOT NULL,
                revoked_at        {_T},
                revocation_reason {_T}
            )""",
        "CREATE INDEX certificates_device ON certificates (device_serial, profile, status)",
        "CREATE INDEX certificates_revoked ON certificates (issuer) WHERE status = 'revoked'",
        f"CREATE TABLE crl_numbers (issuer {_T} PRIMARY KEY, number BIGINT NOT NULL)",
        f"CREATE TABLE serial_sequences (prefix {_T} PRIMARY KEY, next BIGINT NOT NULL)",
        f"""CREATE TABLE attestation_nonces (
                rowid             BIGINT GENERATED BY DEFAULT AS IDENTITY UNIQUE,
                nonce             BYTEA PRIMARY KEY,
                device_serial     {_T} NOT NULL,
                cert_fingerprint  {_T} NOT NULL,
                session           BYTEA,
                issued_at         {_T} NOT NULL,
                expires_at        {_T} NOT NULL,
                consumed_at       {_T}
            )""",
        "CREATE INDEX attestation_nonces_expiry ON attestation_nonces (expires_at)",
        """CREATE INDEX attestation_nonces_outstanding ON attestation_nonces (device_serial, issued_at)
                WHERE consumed_at IS NULL""",
        f"""CREATE TABLE attestation_log (
                seq               BIGINT PRIMARY KEY,
                time              {_T} NOT NULL,
                device_serial     {_T} NOT NULL,
                device_type       {_T} NOT NULL,
                cert_fingerprint  {_T} NOT NULL,
                tier              {_T} NOT NULL,
                acceptable        INTEGER NOT NULL,
                revoke            INTEGER NOT NULL,
                reasons           {_T} NOT NULL,
                claims            {_T},
                evidence          BYTEA NOT NULL,
                prev_hash         BYTEA NOT NULL,
                hash              BYTEA NOT NULL,
                summary           {_T},
                nonce_kind        {_T}
            )""",
        "CREATE INDEX attestation_log_device ON attestation_log (device_serial, seq)",
        "CREATE INDEX attestation_log_time ON attestation_log (time)",
        f"""CREATE TABLE attestation_verdict_uses (
                seq               BIGINT PRIMARY KEY,
                used_at           {_T} NOT NULL,
                purpose           {_T} NOT NULL
            )""",
        f"""CREATE TABLE attestation_refused (
                device_serial     {_T} PRIMARY KEY,
                window_end        {_T} NOT NULL,
                logged            BIGINT NOT NULL,
                suppressed        BIGINT NOT NULL,
                first_at          {_T},
                last_at           {_T},
                reason_counts     {_T} NOT NULL,
                device_type       {_T} NOT NULL,
                cert_fingerprint  {_T} NOT NULL,
                tier              {_T} NOT NULL
            )""",
        f"""CREATE TABLE attestation_log_segments (
                first_seq         BIGINT PRIMARY KEY,
                last_seq          BIGINT NOT NULL UNIQUE,
                prev_hash         BYTEA NOT NULL,
                head_hash         BYTEA NOT NULL,
                entries           BIGINT NOT NULL,
                file_name         {_T} NOT NULL UNIQUE,
                file_sha256       {_T} NOT NULL,
                sealed_at         {_T} NOT NULL
            )""",
    ),
}
PG_MIGRATIONS[7] = (f"CREATE TABLE deployment (key {_T} PRIMARY KEY, value {_T} NOT NULL)",)
PG_MIGRATIONS[8] = _FLEET_INDEXES
PG_MIGRATIONS[9] = _ISSUED_INDEX
PG_MIGRATIONS[10] = ("ALTER TABLE devices ADD COLUMN psk SMALLINT NOT NULL DEFAULT 0",)
PG_BASELINE = 6


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
    if db.engine != "postgresql":
        _migrate(db, False)
        return
    # Two hosts starting at once on an empty or older database: both wait for the advisory lock,
    # one migrates. The other may then still look at the catalogue as it was when its
    # transaction began (PostgreSQL refreshes it at a transaction's start, not at an advisory
    # lock) and fail on a table the first just made: it tries again in a new transaction, which
    # sees the migrated schema and does nothing.
    from devid.gateway.store.storage import Duplicate
    for attempt in range(3):
        try:
            _migrate(db, True)
            return
        except (RegistryError, Duplicate):
            if attempt == 2:
                raise


def _migrate(db: Database, postgres: bool) -> None:
    with db.transaction(durable=True) as con:
        if postgres:        # two hosts starting at once: one migrates, the other then finds it done
            from devid.gateway.store.postgres import LOCK_MIGRATE
            db.serialize(con, LOCK_MIGRATE)
        version = db.read_version(con)
        if version > SCHEMA_VERSION:
            raise RegistryError(f"{db.path}: schema version {version} is newer than this devid "
                                f"({SCHEMA_VERSION}); upgrade devid")
        if version == SCHEMA_VERSION:
            return
        steps = ([(PG_BASELINE, PG_MIGRATIONS[PG_BASELINE])] if version == 0 else []) if postgres else []
        start = max(version, PG_BASELINE) if postgres else version
        steps += [(v, (PG_MIGRATIONS if postgres else MIGRATIONS)[v]) for v in range(start + 1, SCHEMA_VERSION + 1)]
        for v, statements in steps:
            # statement by statement: executescript() would COMMIT the open transaction
            for statement in statements:
                con.execute(statement)
            db.write_version(con, v)
