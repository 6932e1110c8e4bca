"""The registry's SQLite connection: set-up, transactions, durability (`schema.py` holds the
schema, `registry.py` the queries).

One connection per object (one per process or thread), WAL mode. Every write runs in a
`BEGIN IMMEDIATE` transaction, so concurrent writers from several processes serialise on the
database lock instead of failing half-way.

Durability. A committed transaction survives a killed process (kill -9) in any mode. What
survives a power cut depends on the transaction: one opened with `transaction(durable=True)`
runs with `synchronous=FULL`, so its COMMIT returns only after the WAL is fsynced. Every write
of the CA's state is durable: certificates issued (factory, operational, the hierarchy at
init), devices registered, revocations, CRL numbers, serial blocks; an issued certificate is
therefore on disk before it is written to a bundle or sent to a device. The other writes
(nonces, attestation log entries, verdict uses) commit with `synchronous=NORMAL` (no fsync): a
power cut may lose the last of them, never corrupt the file, and the next durable commit makes
every earlier one durable too (the WAL is one sequential file). `PRAGMA synchronous` cannot
change inside a transaction, so a durable write nested in another transaction needs that outer
transaction to be durable (checked). Why per transaction rather than FULL for the connection,
measured: benchmarks/README.md (`devid bench --durability`).
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from devid.gateway.errors import RegistryError
from devid.gateway.store.storage import StorageHealth, storage_kind
from devid.gateway.system import metrics

# For benchmarks only (`devid bench --durability` measures the cost of durable commits): "normal"
# makes durable transactions not durable (the baseline), "full" makes every transaction durable
# (the alternative that was measured and not chosen). Unset or anything else: the default.
SYNC_ENV = "DEVID_BENCH_SYNCHRONOUS"


class Database:
    """The connection and its transactions; subclasses define `_open_schema` (run at open).

    Its twin on PostgreSQL is `postgres.PostgresDatabase`; the registry's queries are written
    once for both, with the few differences as attributes here (`FOR_UPDATE`, `NO_LIMIT`,
    `serialize`, `integrity_errors`)."""

    engine = "sqlite"
    FOR_UPDATE = ""             # BEGIN IMMEDIATE already holds the one write lock
    NO_LIMIT = "-1"             # LIMIT <this> OFFSET n
    integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: Path | str, *, timeout: float = 30.0, create: bool = False,
                 readonly: bool = False) -> None:
        """Open the database at `path` (and bring its schema up to date: `_open_schema`).

        `create=False`: the file must exist and hold a database; a missing or empty file is an
        error naming it, never a silently new registry that would re-issue serials already in the
        field (only `devid init` creates one). `readonly=True`: no write, no migration; works on a
        read-only data directory (`_connect_readonly`)."""
        self.path = Path(path)
        self.readonly = readonly
        # set by the gateway: one log line when writes start failing for a storage reason, one
        # when they work again (gateway/store/storage.py)
        self.health: StorageHealth | None = None
        mode = os.environ.get(SYNC_ENV, "")
        self._sync_plain = "FULL" if mode == "full" else "NORMAL"
        self._sync_durable = "NORMAL" if mode == "normal" else "FULL"
        if (readonly or not create) and not self.path.is_file():
            raise RegistryError(f"{self.path}: the registry is missing; only 'devid init' creates one "
                                "(restore it from a backup if this data directory was in use)")
        if not create and self.path.stat().st_size == 0:
            raise RegistryError(f"{self.path}: the registry is empty; only 'devid init' creates one "
                                "(restore it from a backup if this data directory was in use)")
        try:
            if readonly:
                self._db = self._connect_readonly(timeout)
            else:
                self._db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode={'rwc' if create else 'rw'}",
                                           uri=True, timeout=timeout, isolation_level=None,
                                           check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={self._sync_plain}")
            self._sync_now = self._sync_plain
            self._db.execute("PRAGMA foreign_keys=ON")
            # Checkpoint the WAL every 4000 pages (~16 MB) instead of 1000: each issuance writes ~6
            # pages, and a checkpoint copies and fsyncs them into the database file. Measured: COMMIT
            # 55-63 us instead of 66-69 us per issuance. cache_size above the default (2 MB) did not help.
            self._db.execute("PRAGMA wal_autocheckpoint=4000")
            self._lock = threading.RLock()
            self.commits = 0            # write transactions committed through this object (tests, benchmarks)
            self._depth = 0
            self._durable = False
            self._open_schema(create, readonly)
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"{self.path}: cannot open the registry: {exc}") from None

    def _connect_readonly(self, timeout: float) -> sqlite3.Connection:
        """A read-only connection. A WAL database needs its -shm file even to read; in a directory
        we cannot write, with no -shm left by a writer, SQLite cannot make one. Then, if there is
        no -wal with committed transactions in it (a clean shutdown removes it), the file alone is
        the whole database and is opened as immutable; with a non-empty -wal (a copy taken while
        the gateway ran, or a writer of another user), immutable would silently ignore committed
        transactions: that is an error naming the file instead."""
        uri = self.path.absolute().as_uri()
        try:
            db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=timeout, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA user_version").fetchone()
            return db
        except sqlite3.OperationalError:
            if os.access(self.path.parent, os.W_OK):
                raise
        wal = self.path.with_name(self.path.name + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise RegistryError(f"{self.path}: cannot read it in a read-only directory while {wal.name} may hold "
                                "transactions not yet in the database file (copy the directory, or open it "
                                "where it can be written, to let SQLite fold them in)")
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=timeout, isolation_level=None,
                               check_same_thread=False)

    def _open_schema(self, create: bool, readonly: bool) -> None:
        """Check (and, unless read-only, migrate) the schema; subclasses define it."""
        raise NotImplementedError

    def close(self) -> None:
        self._db.close()

    def _set_sync(self, level: str) -> None:
        """Between transactions only (SQLite refuses the change inside one). Kept until another
        level is needed, so a run of durable transactions switches once."""
        if level != self._sync_now:
            self._db.execute(f"PRAGMA synchronous={level}")
            self._sync_now = level

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; rolled back on any exception. `durable`: the COMMIT
        returns only once the transaction is on disk (synchronous=FULL: the WAL is fsynced).

        Inside another transaction of this registry (a caller making several steps atomic, e.g.
        using a verdict and issuing the certificate), a SAVEPOINT instead: it is undone alone if
        its block fails, and its writes become durable with the outer COMMIT; a durable one
        needs a durable outer transaction."""
        with self._lock:
            if self._depth:
                if durable and not self._durable:
                    raise RuntimeError("a durable write inside a transaction that is not durable: "
                                       "open the outer transaction with durable=True")
                name = f"sp{self._depth}"
                self._db.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self._db
                except BaseException:
                    # SQLite may have rolled the whole transaction back itself (e.g. disk full):
                    # then there is no savepoint left, and the original error is the one to see
                    if self._db.in_transaction:
                        self._db.execute(f"ROLLBACK TO {name}")
                        self._db.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._depth -= 1
                self._db.execute(f"RELEASE {name}")
                return
            started = time.perf_counter()
            try:
                self._set_sync(self._sync_durable if durable else self._sync_plain)
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                self._storage_failed(exc)
                raise
            self._depth = 1
            self._durable = durable
            try:
                yield self._db
                if not self._db.in_transaction:     # rolled back by SQLite under a caller that went on
                    raise sqlite3.OperationalError("the transaction was rolled back by SQLite; nothing was committed")
                self._db.execute("COMMIT")
                self.commits += 1
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._storage_failed(exc)
                raise
            finally:
                self._depth = 0
                self._durable = False
                metrics.TRANSACTION_SECONDS.labels(self.engine, "true" if durable else "false").observe(
                    time.perf_counter() - started)
            if self.health is not None and self.health.failing:
                self.health.succeeded()

    def _storage_failed(self, exc: BaseException) -> None:
        if self.health is not None:
            kind = storage_kind(exc)
            if kind is not None:
                self.health.failed(kind, exc)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """Reads that all see one state of the database (a deferred read transaction): e.g.
        `verify-log` reading segment anchors, then entries, while a rotation commits."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("ROLLBACK")           # nothing was written

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The connection, for reads outside a write transaction."""
        with self._lock:
            yield self._db

    def serialize(self, db: sqlite3.Connection, key: int) -> None:
        """Nothing to do: every write transaction holds SQLite's one write lock (BEGIN IMMEDIATE)."""

    @staticmethod
    def duplicate_table(exc: BaseException) -> str | None:
        """The table whose unique key an IntegrityError hit ('UNIQUE constraint failed: t.c')."""
        text = str(exc)
        if "constraint failed: " in text:
            return text.split("constraint failed: ", 1)[1].split(".", 1)[0]
        return None

    def read_version(self, db: sqlite3.Connection) -> int:
        return db.execute("PRAGMA user_version").fetchone()[0]

    def write_version(self, db: sqlite3.Connection, version: int) -> None:
        db.execute(f"PRAGMA user_version = {int(version)}")

    @property
    def schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]
