"""`devid registry migrate`: copy a SQLite registry, every table, into an empty PostgreSQL one.

- **Source.** Read in one read transaction (`snapshot()`), so the copy is one state of the
  registry; the file is opened read-only and never changed. Refused while another process has
  it open (`sqlite_holder`: a running `devid serve` would go on writing to the file, and what
  it wrote after the copy would be lost when the data directory switches to PostgreSQL);
  checked before the copy and again just before the target commits.
- **Target.** One durable transaction (all or nothing), under the migration advisory lock so two
  copies into one database do not interleave; refused, before anything is written, if any
  table already holds a row (`TargetNotEmpty`). Rows are inserted in the order the registry
  reads them: certificates and nonces in rowid order (their PostgreSQL `rowid` identity column
  numbers them again in that order: what the queries compare), everything else by primary key.
- **Verification, before the COMMIT.** Per table, the number of rows and a digest of their
  values read back from the target (in the same order) equal the source's; the caller also
  verifies the attestation log's chain on the target inside the same transaction
  (`verify_target`), and any difference rolls everything back.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from devid.gateway.errors import RegistryError
from devid.gateway.store.postgres import LOCK_MIGRATE

# (table, its columns as the registry's queries name them, the order rows are copied in). Every
# table of the schema (tests/test_registry_tools.py holds this list to the schema of both engines).
TABLES: tuple[tuple[str, str, str], ...] = (
    ("devices", "serial, device_type, state, created_at, updated_at, enrolled_at, revoked_at, revocation_reason, "
                "psk", "serial"),
    ("certificates", "serial, issuer, profile, device_serial, not_before, not_after, status, fingerprint, der, "
                     "issued_at, revoked_at, revocation_reason", "rowid"),
    ("crl_numbers", "issuer, number", "issuer"),
    ("serial_sequences", "prefix, next", "prefix"),
    ("attestation_nonces", "nonce, device_serial, cert_fingerprint, session, issued_at, expires_at, consumed_at",
     "rowid"),
    ("attestation_log", "seq, time, device_serial, device_type, cert_fingerprint, tier, acceptable, revoke, reasons, "
                        "claims, evidence, prev_hash, hash, summary, nonce_kind", "seq"),
    ("attestation_verdict_uses", "seq, used_at, purpose", "seq"),
    ("attestation_refused", "device_serial, window_end, logged, suppressed, first_at, last_at, reason_counts, "
                            "device_type, cert_fingerprint, tier", "device_serial"),
    ("attestation_log_segments", "first_seq, last_seq, prev_hash, head_hash, entries, file_name, file_sha256, "
                                 "sealed_at", "first_seq"),
    ("deployment", "key, value", "key"),
)
BATCH = 2000


class TargetNotEmpty(RegistryError):
    """The target registry already holds rows (nothing was written to it)."""


class CopyMismatch(RegistryError):
    """The target does not hold what the source holds (the copy was rolled back)."""


@dataclass
class TableCopy:
    table: str
    source_rows: int = 0
    target_rows: int = 0
    source_digest: str = ""
    target_digest: str = ""

    @property
    def ok(self) -> bool:
        return (self.source_rows, self.source_digest) == (self.target_rows, self.target_digest)

    def as_json(self) -> dict:
        return {"rows": self.source_rows, "target_rows": self.target_rows, "sha256": self.source_digest,
                "ok": self.ok}


@dataclass
class CopyReport:
    tables: list[TableCopy] = field(default_factory=list)
    deployment_recorded: bool = False       # the source had no deployment rows; the caller's were added

    @property
    def ok(self) -> bool:
        return all(t.ok for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(t.source_rows for t in self.tables)


def sqlite_holder(path: Path) -> int | None:
    """The pid of another process that has the SQLite registry at `path` open (0: one in another
    pid namespace), else None. Every connection to a WAL database holds a shared lock on one
    byte of its -shm file (byte 128, the "DMS" lock of SQLite's unix VFS) while it is open; a
    POSIX F_GETLK for a write lock on that byte names a holder, and ignores this process's own."""
    shm = Path(str(path) + "-shm")
    try:
        fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None             # no connection has it open (the last one to close removes the file)
    try:
        probe = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 128, 1, 0)
        kind, _, _, _, pid = struct.unpack("@hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid


def _value(v):
    return bytes(v) if isinstance(v, (bytes, bytearray, memoryview)) else v


def _digest_rows(digest, rows) -> None:
    for row in rows:
        digest.update(repr(tuple(_value(v) for v in row)).encode())


def _pages(db, table: str, columns: str, order: str):
    """The rows of `table` in `order` (a unique column), BATCH at a time by key: a client-side
    cursor (psycopg's default) would hold the whole table in memory."""
    after = None
    while True:
        where = "" if after is None else f" WHERE {order} > ?"
        rows = db.execute(f"SELECT {order}, {columns} FROM {table}{where} ORDER BY {order} LIMIT {BATCH}",
                          () if after is None else (after,)).fetchall()
        if not rows:
            return
        after = rows[-1][0]
        yield [r[1:] for r in rows]


def target_rows(db) -> dict[str, int]:
    """Rows per table (inside the caller's transaction)."""
    return {table: db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table, _, _ in TABLES}


def copy_registry(source, target, *, progress: Callable[[str, int, int], None] | None = None,
                  before_commit: Callable[[], None] | None = None,
                  deployment: dict[str, str] | None = None) -> CopyReport:
    """Copy every table of `source` (a SQLiteRegistry) into `target` (a PostgresRegistry whose
    tables are empty) in one durable transaction on the target, then compare every table. Raises
    TargetNotEmpty (nothing written), CopyMismatch (rolled back), or whatever `before_commit`
    raises (rolled back): the caller's last checks, run inside the open transaction.

    `deployment`: recorded in the target (after the comparison) if the source holds none: a
    registry made before schema 7 has no deployment rows, which `devid init --join` needs."""
    report = CopyReport()
    with source.snapshot() as src, target.transaction(durable=True) as dst:
        target.serialize(dst, LOCK_MIGRATE)
        held = {t: n for t, n in target_rows(dst).items() if n}
        if held:
            raise TargetNotEmpty(f"{target.path} is not empty ({', '.join(f'{t}: {n} rows' for t, n in held.items())}):"
                                 " migrate copies into an empty registry only; nothing was written")
        for table, columns, order in TABLES:
            total = src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            entry = TableCopy(table, source_rows=0)
            digest = hashlib.sha256()
            marks = ", ".join("?" * len(columns.split(",")))
            insert = f"INSERT INTO {table} ({columns}) VALUES ({marks})"
            cur = src.execute(f"SELECT {columns} FROM {table} ORDER BY {order}")
            while rows := cur.fetchmany(BATCH):
                rows = [tuple(_value(v) for v in r) for r in rows]
                dst.executemany(insert, rows)
                _digest_rows(digest, rows)
                entry.source_rows += len(rows)
                if progress is not None:
                    progress(table, entry.source_rows, total)
            if progress is not None and total == 0:
                progress(table, 0, 0)
            entry.source_digest = digest.hexdigest()
            report.tables.append(entry)
        for entry, (table, columns, order) in zip(report.tables, TABLES):
            digest = hashlib.sha256()
            for rows in _pages(dst, table, columns, order):
                _digest_rows(digest, rows)
                entry.target_rows += len(rows)
            entry.target_digest = digest.hexdigest()
        if not report.ok:
            bad = [t.table for t in report.tables if not t.ok]
            raise CopyMismatch(f"the copy in {target.path} differs from the source in {', '.join(bad)}: "
                               "rolled back, nothing was written")
        # a registry older than schema 7 has no deployment (its table may still hold a row of a
        # later kind, the PSK secret's check): the caller's rows, those it lacks
        held = {row[0] for row in dst.execute("SELECT key FROM deployment").fetchall()}
        missing = {k: v for k, v in (deployment or {}).items() if k not in held}
        if deployment and "root_fingerprint" not in held:
            dst.executemany("INSERT INTO deployment (key, value) VALUES (?, ?)", sorted(missing.items()))
            report.deployment_recorded = True
        if before_commit is not None:
            before_commit()
    return report


__all__ = ["BATCH", "CopyMismatch", "CopyReport", "TABLES", "TableCopy", "TargetNotEmpty", "copy_registry",
           "sqlite_holder", "target_rows"]
