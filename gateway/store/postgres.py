"""The registry on PostgreSQL: the same transaction contract as `database.py` (SQLite), on psycopg 3
with a connection pool (psycopg_pool).

- **Transactions.** `transaction()` takes a connection from the pool for the calling thread and
  runs BEGIN ... COMMIT at READ COMMITTED, PostgreSQL's default; inside another transaction of
  the same thread it is a SAVEPOINT, as on SQLite. The single-use statements are the same as on
  SQLite: a nonce is consumed by one conditional `UPDATE` checked by its row count, a verdict is
  used by an `INSERT ... ON CONFLICT DO NOTHING` on its sequence number; at READ COMMITTED the
  loser of a race waits for the winner's COMMIT and then changes nothing (row count 0).
  Read-then-write steps that SQLite serialises with its one write lock are serialised here by
  a row lock (`FOR UPDATE` on the device before an issuance) or a transaction-scoped advisory
  lock (appends to the hash-chained attestation log, schema migrations): `serialize()`.
- **Durability.** A durable transaction commits with `synchronous_commit = on` (the COMMIT
  returns once the WAL is flushed, on the standby too when synchronous replication is
  configured); the others with `synchronous_commit = off` for that transaction only (SET LOCAL),
  which, as SQLite's NORMAL, may lose the last of them on a server crash, never corrupt, and
  the next durable commit flushes them too.
- **Errors.** psycopg's errors never leave this module: a unique violation becomes
  `storage.Duplicate` (the registry turns it into DuplicateDevice or SerialCollision), a lost
  or refused connection, a full disk, a read-only server (a standby after a failover) or a
  lock or serialisation failure becomes `storage.StorageError` of its kind (devices get 5.03,
  the command line one line), anything else `RegistryError`. Messages name the server by its
  URL without the password (`redact`).
- **Outages.** The gateway calls the registry from its event loop, so a registry call must not wait
  for a server that is gone (the pool would wait its whole timeout, 30 s, for a connection): once
  a connection fails (the server stopped, restarted, unreachable), the next call first probes the
  server with one direct connection of at most PROBE_CONNECT s; while probes fail, calls fail at
  once with `StorageError(FAILED)` (devices get 5.03 "storage unavailable") and the next probe
  comes 1, 2, 4 ... PROBE_MAX s later. When a probe reaches the server, a fresh pool replaces the
  one whose connections died (a pool's own reconnection backs off for minutes).
- **Credentials** come from the URL, from a password file (0600, `password_file`) or from
  libpq's environment (PGPASSWORD, PGPASSFILE/~/.pgpass, PGSERVICE); the password is handed to
  libpq and never written to a log line or a message.
"""

from __future__ import annotations

import functools
import os
import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from devid.gateway.errors import RegistryError
from devid.gateway.store.storage import BUSY, FAILED, FULL, READ_ONLY, Duplicate, StorageError, StorageHealth
from devid.gateway.system import metrics

SCHEMES = ("postgresql", "postgres")
# the pool's own warnings (a reconnection failing in its background thread) repeat what the
# registry's errors and the storage log line (gateway/store/storage.py) already say
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
# bounds on every wait (PostgresDatabase.__init__); a migration retries after a lock timeout
LOCK_TIMEOUT_MS = 5000
STATEMENT_TIMEOUT_MS = 30000
IDLE_TIMEOUT_MS = 60000
# and on the client side, for what the server cannot end (Watchdog): past statement_timeout, so
# the server's own timeout answers first whenever it can
CALL_DEADLINE = STATEMENT_TIMEOUT_MS / 1000 + 5
# pg_advisory_xact_lock keys: 'devid' in ASCII, then what they serialise
LOCK_LOG = 0x64657669_64000001
LOCK_MIGRATE = 0x64657669_64000002
# while the server is unreachable: seconds between failed probes (doubling up to PROBE_MAX), and the
# connect timeout of a probe (the event loop waits that long at most, once per probe)
PROBE_FIRST, PROBE_MAX, PROBE_CONNECT = 1.0, 15.0, 2


def is_postgres_url(location: str) -> bool:
    return isinstance(location, str) and location.split(":", 1)[0].lower() in SCHEMES and "://" in location


# libpq parameters shown as they are in messages; any other one (password, sslpassword,
# oauth_client_secret, and whatever a later libpq adds) is shown as ***
_SHOWN = frozenset({"host", "hostaddr", "port", "dbname", "user", "options", "sslmode", "sslrootcert", "sslcert",
                    "sslkey", "target_session_attrs", "load_balance_hosts", "application_name", "connect_timeout",
                    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "tcp_user_timeout",
                    "service", "channel_binding", "gssencmode", "require_auth", "krbsrvname", "client_encoding"})


def _secret_key(key: str) -> bool:
    return key.lower() not in _SHOWN


def redact(url: str) -> str:
    """The registry's location for messages, logs and JSON: rebuilt from libpq's own parse of it
    (so a password holding '#', '?' or '@', or a keyword=value conninfo string, is parsed as
    libpq parses it), with every *password parameter left out. Unparsable: a fixed text, never
    the string itself."""
    from urllib.parse import quote
    try:
        import psycopg
        params = psycopg.conninfo.conninfo_to_dict(url)
    except Exception:
        return "(a registry location that is not a valid PostgreSQL URL)"
    user = params.pop("user", None)
    host = params.pop("host", None)
    port = params.pop("port", None)
    dbname = params.pop("dbname", None)
    auth = ""
    if user:
        auth = quote(str(user), safe="") + (":***" if any(_secret_key(k) for k in params) else "") + "@"
    netloc = auth + (str(host) if host else "") + (f":{port}" if port else "")
    query = "&".join(f"{k}={'***' if _secret_key(k) else quote(str(v), safe='/,-_.')}"
                     for k, v in sorted(params.items()) if k != "password")     # (shown as user:***)
    return f"postgresql://{netloc}/{quote(str(dbname), safe='') if dbname else ''}" + (f"?{query}" if query else "")


@functools.lru_cache(maxsize=512)
def _pg(sql: str) -> str:
    """The registry's SQL is written once with SQLite's `?` placeholders; psycopg wants `%s`."""
    return sql.replace("%", "%%").replace("?", "%s")


def _translate(exc: Exception, where: str) -> Exception:
    import psycopg
    from psycopg import errors as pe
    if isinstance(exc, pe.UniqueViolation):
        return Duplicate(exc.diag.table_name)
    message = (exc.diag.message_primary if getattr(exc, "diag", None) is not None and exc.diag.message_primary
               else str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, pe.DiskFull):
        return StorageError(FULL, f"registry {where}: {message}")
    if isinstance(exc, pe.ReadOnlySqlTransaction):
        return StorageError(READ_ONLY, f"registry {where}: {message}")
    if isinstance(exc, (pe.TransactionRollback, pe.LockNotAvailable, pe.QueryCanceled)):
        return StorageError(BUSY, f"registry {where}: {message}")
    # the connection or the server is gone (no SQLSTATE: libpq's own "server closed the
    # connection"; class 08: connection exceptions; 57P01-57P03: shut down, crashed, starting):
    # FAILED, which starts the outage handling; any other operational error (too many clients, out
    # of memory, a program limit) is this request's, worth a retry, not an outage: BUSY
    state = getattr(exc, "sqlstate", None)
    if isinstance(exc, psycopg.InterfaceError) or (
            isinstance(exc, psycopg.OperationalError) and (state is None or state.startswith(("08", "57P")))):
        return StorageError(FAILED, f"registry {where} unavailable: {message}")
    if isinstance(exc, psycopg.OperationalError):
        return StorageError(BUSY, f"registry {where}: {message}")
    return RegistryError(f"registry {where}: {message}")


class Watchdog:
    """A client-side deadline on every statement: the waits the server and the kernel cannot end
    (a backend that keeps the connection but never answers, a stalled disk, a durable COMMIT
    waiting for a synchronous standby that never acknowledges, where PostgreSQL does not apply
    statement_timeout) would otherwise stop the gateway's event loop for good. A statement still
    unanswered after `limit` s gets its connection's socket shut down: libpq returns an error,
    the call fails as "unavailable" (5.03; the outage handling takes over) and the pool drops
    the connection. Never a cancel: a cancelled synchronous-replication wait is committed
    locally and would be reported as a success. One thread, while statements are in flight."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, object]] = {}
        self._thread: threading.Thread | None = None
        self.cut = 0                    # connections ended (tests)

    @contextmanager
    def watching(self, raw) -> Iterator[None]:
        key = id(raw)
        with self._lock:
            self._armed[key] = (time.monotonic() + self.limit, raw)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="devid-registry-watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._armed.pop(key, None)

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            time.sleep(min(0.5, self.limit / 4))
            now = time.monotonic()
            with self._lock:
                late = [raw for deadline, raw in self._armed.values() if deadline <= now]
                if self._armed:
                    idle_since = now
                elif now - idle_since > 10:
                    self._thread = None
                    return
            for raw in late:
                self._end(raw)

    def _end(self, raw) -> None:
        import socket
        try:
            dup = os.dup(raw.pgconn.socket)
        except Exception:
            return                      # already closed
        sock = socket.socket(fileno=dup)
        try:
            sock.shutdown(socket.SHUT_RDWR)
            self.cut += 1
        except OSError:
            pass
        finally:
            sock.close()


class PgConnection:
    """A pooled psycopg connection with the sqlite3-like face the registry's queries use:
    `execute` and `executemany` return a cursor (fetchone, fetchall, fetchmany, rowcount,
    iteration); every statement under the database's `Watchdog`."""

    __slots__ = ("raw", "where", "watchdog")

    def __init__(self, raw, where: str, watchdog: Watchdog) -> None:
        self.raw = raw
        self.where = where
        self.watchdog = watchdog

    def execute(self, sql: str, params=()):
        import psycopg
        try:
            with self.watchdog.watching(self.raw):
                return self.raw.execute(_pg(sql), params)
        except psycopg.Error as exc:
            raise _translate(exc, self.where) from None

    def executemany(self, sql: str, rows):
        import psycopg
        cur = self.raw.cursor()
        try:
            with self.watchdog.watching(self.raw):
                cur.executemany(_pg(sql), rows)
        except psycopg.Error as exc:
            raise _translate(exc, self.where) from None
        return cur

    def end(self, statement: str) -> None:
        """ROLLBACK or ROLLBACK TO after a failure: its own error is not the one to report."""
        import psycopg
        try:
            with self.watchdog.watching(self.raw):
                self.raw.execute(statement)
        except psycopg.Error:
            pass


def _read_only(conn) -> None:
    """A pool's `configure` for a read-only registry (see PostgresDatabase.__init__)."""
    conn.execute("SET default_transaction_read_only TO on")


class PostgresDatabase:
    """The pool and its transactions (the PostgreSQL twin of `database.Database`)."""

    engine = "postgresql"
    FOR_UPDATE = " FOR UPDATE"          # appended to a SELECT whose rows the transaction will change
    NO_LIMIT = "ALL"                    # LIMIT <this> OFFSET n

    def __init__(self, url: str, *, create: bool = False, readonly: bool = False, password: str | None = None,
                 pool_size: int = 4, timeout: float = 5.0, deadline: float = CALL_DEADLINE) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout
        self.url = url
        self.path = redact(url)             # what messages call this registry
        self.readonly = readonly
        self.health: StorageHealth | None = None
        self._local = threading.local()
        self.commits = 0            # write transactions committed through this object (tests, benchmarks)
        self.watchdog = Watchdog(deadline)
        # The gateway calls the registry on its event loop: a wait here stops the worker's every
        # device. So no wait is unbounded: a lock held by a stalled host (LOCK_LOG, a device row)
        # ends in LockNotAvailable after LOCK_TIMEOUT_MS (the device gets 5.03 "registry busy"), a
        # statement after STATEMENT_TIMEOUT_MS, a transaction a stalled host left open after
        # IDLE_TIMEOUT_MS; a server that vanished is noticed by TCP keepalives and
        # tcp_user_timeout, not after hours; no connection within `timeout` s is a 5.03 too.
        kwargs: dict = {"autocommit": True, "connect_timeout": max(2, int(timeout)), "keepalives": 1,
                        "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                        "tcp_user_timeout": 15000}
        if password is not None:
            kwargs["password"] = password
        try:
            given = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error:
            raise RegistryError(f"{self.path}: not a valid PostgreSQL URL") from None
        options = [given.get("options") or "", f"-c lock_timeout={LOCK_TIMEOUT_MS}",
                   f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                   f"-c idle_in_transaction_session_timeout={IDLE_TIMEOUT_MS}"]
        kwargs["options"] = " ".join(o for o in options if o)
        # readonly: the server refuses any write, so a reading command cannot change the registry.
        # Set once connected (`_new_pool`), not in the startup options: libpq's
        # target_session_attrs=read-write (a URL naming a primary and its standbys) would take
        # such a session for a standby's
        # one direct connection first: a wrong host, user or password is one clear error at once,
        # not a pool retrying in the background until its timeout
        error = self._connect_error(url, kwargs)
        if error is not None:
            raise StorageError(FAILED, f"{self.path}: cannot connect to the registry: {error}")
        self._kwargs, self._pool_size, self._timeout = kwargs, pool_size, timeout
        self._down: StorageError | None = None      # the failure that started an outage, until a probe works
        self._probe_at = self._probe_every = 0.0
        self.pool = self._new_pool()
        try:
            self.pool.open(wait=True, timeout=timeout)
        except PoolTimeout:
            self.pool.close()
            raise StorageError(FAILED, f"{self.path}: cannot connect to the registry: timed out") from None
        try:
            self._open_schema(create, readonly)
        except BaseException:
            self.pool.close()
            raise

    def _new_pool(self):
        from psycopg_pool import ConnectionPool
        return ConnectionPool(self.url, kwargs=self._kwargs, min_size=1, max_size=self._pool_size,
                              timeout=self._timeout, name="devid-registry", open=False,
                              configure=_read_only if self.readonly else None)

    @staticmethod
    def _connect_error(url: str, kwargs: dict) -> str | None:
        """None if a direct connection works, else why not (libpq's last line: never the password)."""
        import psycopg
        try:
            psycopg.connect(url, **kwargs).close()
        except psycopg.Error as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            return lines[-1] if lines else type(exc).__name__
        return None

    def _open_schema(self, create: bool, readonly: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.pool.close()

    # -- transactions ------------------------------------------------------------------------

    def _outage(self, exc: StorageError, probed: bool = False) -> None:
        """The server could not be reached: the next call probes it at once; after a probe that
        fails, calls fail at once until the next probe, 1, 2, 4 ... PROBE_MAX s later."""
        if self._down is None or not probed:
            self._probe_every, self._probe_at = PROBE_FIRST, 0.0
        else:
            self._probe_at = time.monotonic() + self._probe_every
            self._probe_every = min(self._probe_every * 2, PROBE_MAX)
        self._down = exc

    def _check_outage(self) -> None:
        if self._down is None:
            return
        if time.monotonic() >= self._probe_at:
            error = self._connect_error(self.url, {**self._kwargs, "connect_timeout": PROBE_CONNECT})
            if error is None:           # back: a fresh pool (the old one's connections are dead)
                old, self.pool = self.pool, self._new_pool()
                self.pool.open(wait=False)
                old.close(timeout=0)
                self._down = None
                return
            self._outage(StorageError(FAILED, f"registry {self.path} unavailable: {error}"), probed=True)
        raise StorageError(FAILED, str(self._down))

    @contextmanager
    def _borrowed(self) -> Iterator[PgConnection]:
        """A pooled connection for one transaction or read; a storage failure of any of them (a
        read too: with the server gone, a request's first read fails before any write) goes to
        the health log, and a lost server starts an outage (`_outage`)."""
        import psycopg
        from psycopg_pool import PoolTimeout
        try:
            self._check_outage()
            try:
                with self.pool.connection() as raw:
                    yield PgConnection(raw, self.path, self.watchdog)
            except PoolTimeout:
                exc = StorageError(FAILED, f"registry {self.path} unavailable: no connection within the pool's "
                                           "timeout")
                self._outage(exc)
                raise exc from None
            except psycopg.Error as exc:
                error = _translate(exc, self.path)
                if isinstance(error, StorageError) and error.kind == FAILED:
                    self._outage(error)
                raise error from None
            except StorageError as exc:
                if exc.kind == FAILED:
                    self._outage(exc)
                raise
        except StorageError as exc:
            if self.health is not None:
                self.health.failed(exc.kind, exc)
            raise

    @contextmanager
    def transaction(self, durable: bool = False) -> Iterator[PgConnection]:
        """BEGIN ... COMMIT (READ COMMITTED); rolled back on any exception. `durable`: the COMMIT
        returns only once the transaction's WAL is flushed. Nested: a SAVEPOINT, as on SQLite.

        Round trips are what a request pays for on PostgreSQL (the gateway waits for each), so:
        BEGIN and the transaction's synchronous_commit go in one message; a nested block costs
        its SAVEPOINT only (no RELEASE: the outer COMMIT ends it; ROLLBACK TO it on failure).
        A transaction that failed on the server is never reported committed (PostgreSQL answers
        COMMIT with a rollback then): that is an error, as SQLite's own rollback is."""
        from psycopg.pq import TransactionStatus as TS
        current = getattr(self._local, "tx", None)
        if current is not None:
            if durable and not self._local.durable:
                raise RuntimeError("a durable write inside a transaction that is not durable: "
                                   "open the outer transaction with durable=True")
            depth = self._local.depth + 1
            name = f"sp{depth}"
            current.execute(f"SAVEPOINT {name}")
            self._local.depth = depth
            try:
                yield current
            except BaseException:
                if current.raw.info.transaction_status in (TS.INTRANS, TS.INERROR):
                    current.end(f"ROLLBACK TO SAVEPOINT {name}")    # (the outer rollback ends it anyway)
                raise
            finally:
                self._local.depth = depth - 1
            return
        started = time.perf_counter()
        with self._borrowed() as conn:          # (which reports a storage failure to `health`)
            raw = conn.raw
            self._local.tx, self._local.durable, self._local.depth = conn, durable, 0
            try:
                conn.execute("BEGIN" if durable else "BEGIN; SET LOCAL synchronous_commit TO off")
                yield conn
                if raw.info.transaction_status is TS.INERROR:
                    raise RegistryError(f"registry {self.path}: a statement of this transaction failed; "
                                        "nothing was committed")
                conn.execute("COMMIT")
                self.commits += 1
            except BaseException:
                if raw.info.transaction_status in (TS.INTRANS, TS.INERROR):
                    conn.end("ROLLBACK")        # a broken connection: the pool discards it
                raise
            finally:
                self._local.tx = None
                metrics.TRANSACTION_SECONDS.labels(self.engine, "true" if durable else "false").observe(
                    time.perf_counter() - started)
        if self.health is not None and self.health.failing:     # writes work again
            self.health.succeeded()

    @contextmanager
    def snapshot(self) -> Iterator[PgConnection]:
        """Reads that all see one state of the database (REPEATABLE READ, read only)."""
        with self._borrowed() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            self._local.tx, self._local.durable, self._local.depth = conn, False, 0
            try:
                yield conn
            finally:
                self._local.tx = None
                conn.end("ROLLBACK")           # nothing was written

    @contextmanager
    def reading(self) -> Iterator[PgConnection]:
        """A connection for reads: this thread's open transaction's, else one from the pool."""
        current = getattr(self._local, "tx", None)
        if current is not None:
            yield current
            return
        with self._borrowed() as conn:
            yield conn

    def serialize(self, db: PgConnection, key: int) -> None:
        """Until this transaction ends, no other transaction holding `key` runs (on any host)."""
        db.execute("SELECT pg_advisory_xact_lock(?)", (key,))

    @staticmethod
    def duplicate_table(exc: BaseException) -> str | None:
        return exc.table if isinstance(exc, Duplicate) else None

    integrity_errors = (Duplicate,)

    # -- schema version ------------------------------------------------------------------------

    def read_version(self, db: PgConnection) -> int:
        if db.execute("SELECT to_regclass('devid_schema')").fetchone()[0] is None:
            return 0
        row = db.execute("SELECT version FROM devid_schema").fetchone()
        return row[0] if row else 0

    def write_version(self, db: PgConnection, version: int) -> None:
        db.execute("CREATE TABLE IF NOT EXISTS devid_schema (version INTEGER NOT NULL)")
        db.execute("DELETE FROM devid_schema")
        db.execute("INSERT INTO devid_schema (version) VALUES (?)", (version,))

    @property
    def schema_version(self) -> int:
        with self.reading() as db:
            return self.read_version(db)
