"""A throwaway PostgreSQL cluster for the tests: Debian's postgresql-15 binaries, `initdb` and
`pg_ctl` run as the `postgres` user (initdb refuses root), listening on a free loopback TCP port
with its socket in the cluster's own directory, stopped and removed at the end.

If it cannot start, the tests that need it fail (never skip): `./scripts/setup --test` installs
the `postgresql` package.

`PostgresCluster(password=...)`: connections over TCP need that password (scram-sha-256), as a
production server's would; the URLs the helpers return carry it unless asked not to. `stop_server()` and
`start_server()` stop the server and start it again on the same port (a database outage under a running
gateway).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

PGBIN = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "devid"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--", *cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class PostgresCluster:
    """One cluster; `url(schema)` names a schema of its `devid_test` database, made on demand."""

    def __init__(self, password: str | None = None) -> None:
        self.dir: Path | None = None
        self.port = 0
        self.password = password
        self._lock = threading.Lock()
        self._count = 0

    def start(self) -> "PostgresCluster":
        for prog in ("initdb", "pg_ctl"):
            if not (PGBIN / prog).exists():
                pytest.fail(f"PostgreSQL 15 is not installed ({PGBIN / prog} missing): run ./scripts/setup --test")
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("no 'postgres' user: install Debian's postgresql package (./scripts/setup --test)")
        self.dir = Path(tempfile.mkdtemp(prefix="devid-pg-"))
        shutil.chown(self.dir, "postgres", "postgres") if os.geteuid() == 0 else None
        os.chmod(self.dir, 0o755)
        auth = ["-A", "trust"]
        if self.password is not None:       # the socket in the cluster's directory stays trusted, TCP is not
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.password + "\n")
            shutil.chown(pwfile, "postgres", "postgres") if os.geteuid() == 0 else None
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        init = _as_postgres(str(PGBIN / "initdb"), "-D", str(self.dir / "data"), "-U", SUPERUSER, *auth,
                            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        if self.password is not None:
            (self.dir / "pwfile").unlink()
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stderr.strip()[-500:]}")
        for _ in range(5):          # the port was free a moment ago; another process may take it
            self.port = free_tcp_port()
            started = self._pg_ctl_start()
            if started.returncode == 0:
                break
        else:
            log = (self.dir / "log").read_text()[-800:] if (self.dir / "log").exists() else ""
            pytest.fail(f"PostgreSQL did not start: {started.stderr.strip()[-300:]} {log}")
        import psycopg
        with psycopg.connect(self.admin_url("postgres"), autocommit=True) as con:
            con.execute("CREATE DATABASE devid_test")
        return self

    def _pg_ctl_start(self) -> subprocess.CompletedProcess:
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on "
                "-c max_connections=200 -c shared_buffers=32MB")
        return _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                            "-w", "-t", "60", "-o", opts, "start")

    def stop_server(self) -> None:
        """Stop the server (fast shutdown: open connections are ended), keeping its data."""
        stopped = _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")
        if stopped.returncode != 0:
            pytest.fail(f"PostgreSQL did not stop: {stopped.stderr.strip()[-300:]}")

    def start_server(self) -> None:
        """Start the stopped server again, on the same port."""
        started = self._pg_ctl_start()
        if started.returncode != 0:
            pytest.fail(f"PostgreSQL did not start again on port {self.port}: {started.stderr.strip()[-300:]}")

    def admin_url(self, dbname: str = "devid_test", *, with_password: bool = True) -> str:
        secret = f":{quote(self.password, safe='')}" if self.password is not None and with_password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{dbname}"

    def new_schema(self, prefix: str = "t", *, with_password: bool = True) -> str:
        """A fresh, empty schema of devid_test; returns a registry URL whose search_path is it."""
        import psycopg
        with self._lock:
            self._count += 1
            name = f"{prefix}{os.getpid()}_{self._count}"
        with psycopg.connect(self.admin_url(), autocommit=True) as con:
            con.execute(f"CREATE SCHEMA {name}")
        return f"{self.admin_url(with_password=with_password)}?options=-csearch_path%3D{name}"

    def new_database(self, prefix: str = "d") -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg
        with self._lock:
            self._count += 1
            name = f"{prefix}{os.getpid()}_{self._count}"
        with psycopg.connect(self.admin_url("postgres"), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.admin_url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
