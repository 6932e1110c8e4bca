"""The PostgreSQL side of `devid bench --registry` (benchmarks/bench_engines.py): a throwaway cluster
for `--registry auto`, a fresh schema of the registry's database per configuration and round, and
the CPU of the PostgreSQL server's processes, from the operating system's counters.

- **Throwaway cluster** (`Cluster`): Debian's postgresql-15 binaries, `initdb` and `pg_ctl` run as
  the `postgres` user (`runuser`, when the benchmark runs as root: initdb refuses root), on a free
  loopback TCP port with its socket in the cluster's own directory, `fsync=on` (the durable commits
  cost what they cost on a real server), stopped (`pg_ctl stop -m fast`) and removed at the end,
  also after ^C (the caller's `finally`).
- **Fresh schemas**: `fresh_schema(url)` makes an empty schema in the URL's database and returns
  the URL with `options=-csearch_path=<schema>` (devid's registry then creates its tables there);
  `drop_schemas` removes them at the end of a run against a database that is not throwaway.
- **Server CPU** (`ServerCPU`): every PostgreSQL server process is a child of the postmaster, and the
  postmaster reaps them, so the postmaster's own CPU, its reaped children's (`cutime`, `cstime` of
  /proc/PID/stat) and its live children's together count every backend, the WAL writer, the
  checkpointer and autovacuum, including backends that end during the timed part. The postmaster
  is found from one connection: the parent of its backend (`pg_backend_pid()`), which must be a
  process of this machine named `postgres`; for a server elsewhere there is no figure (None).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

PGBIN = Path(os.environ.get("DEVID_BENCH_PGBIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "devid"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        cmd = ("runuser", "-u", "postgres", "--", *cmd)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _reachable_tmp() -> str:
    """The temporary directory, if the `postgres` user can reach a directory in it (as root the
    cluster runs as that user; a private $TMPDIR, as pytest's, is out of its reach), else /tmp."""
    base = Path(tempfile.gettempdir()).resolve()
    if os.geteuid() != 0 or all(p.stat().st_mode & 0o001 for p in (base, *base.parents)):
        return str(base)
    return "/tmp"


class Cluster:
    """A PostgreSQL cluster of its own for one benchmark run (`--registry auto`)."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.port = 0

    def start(self) -> "Cluster":
        for prog in ("initdb", "pg_ctl"):
            if not (PGBIN / prog).exists():
                raise SystemExit(f"--registry auto: PostgreSQL 15 is not installed ({PGBIN / prog} is missing; "
                                 "Debian: apt-get install postgresql, or ./scripts/setup --test)")
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise SystemExit("--registry auto: no 'postgres' user to run the cluster as (initdb refuses "
                                 "root): install Debian's postgresql package") from None
        self.dir = Path(tempfile.mkdtemp(prefix="devid-bench-pg-", dir=_reachable_tmp()))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o755)
        init = _as_postgres(str(PGBIN / "initdb"), "-D", str(self.dir / "data"), "-U", SUPERUSER, "-A", "trust",
                            "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        if init.returncode != 0:
            self.stop()
            raise SystemExit(f"--registry auto: initdb failed: {init.stderr.strip()[-300:]}")
        for _ in range(5):          # the port was free a moment ago; another process may have taken it
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=on "
                    "-c max_connections=100 -c shared_buffers=64MB")
            started = _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(self.dir / "data"), "-l",
                                   str(self.dir / "log"), "-w", "-t", "60", "-o", opts, "start")
            if started.returncode == 0:
                break
        else:
            log = (self.dir / "log").read_text(errors="replace")[-300:] if (self.dir / "log").exists() else ""
            self.stop()
            raise SystemExit(f"--registry auto: PostgreSQL did not start: {started.stderr.strip()[-200:]} {log}")
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").exists():
            _as_postgres(str(PGBIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None


# -- schemas ---------------------------------------------------------------------------------------

def with_search_path(url: str, schema: str) -> str:
    """`url` whose connections use `schema` (libpq's options=-csearch_path=...), its other
    options kept."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = [v for k, v in query if k == "options"]
    rest = [(k, v) for k, v in query if k != "options"]
    opt = " ".join([*options, f"-csearch_path={schema}"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*rest, ("options", opt)]), parts.fragment))


def _connect(url: str):
    import psycopg
    from devid.gateway.store.engines import redact
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        raise SystemExit(f"--registry {redact(url)}: cannot connect: {lines[-1] if lines else exc}") from None


def fresh_schema(url: str, name: str) -> str:
    """An empty schema `name` in `url`'s database; the registry URL that uses it."""
    import psycopg
    from devid.gateway.store.engines import redact
    with _connect(url) as con:
        try:
            con.execute(f'CREATE SCHEMA "{name}"')
        except psycopg.Error as exc:
            raise SystemExit(f"--registry {redact(url)}: cannot create schema {name} for a fresh registry: "
                             f"{str(exc).strip().splitlines()[0]}") from None
    return with_search_path(url, name)


def drop_schemas(url: str, names: list[str]) -> None:
    if not names:
        return
    with _connect(url) as con:
        for name in names:
            con.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


# -- server CPU ------------------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def postmaster_of(url: str) -> int | None:
    """The pid of the postmaster serving `url`, if it runs on this machine (else None)."""
    with _connect(url) as con:
        backend = con.execute("SELECT pg_backend_pid()").fetchone()[0]
        fields = _stat(backend)
        if fields is None or not _comm(backend).startswith("postgres"):
            return None
        parent = int(fields[1])
        return parent if _comm(parent).startswith("postgres") else None


class ServerCPU:
    """CPU seconds of a postmaster and all its processes, past and present (see the module's
    docstring). As a `probe` of bench_clients.run_clients: `start` right before the timed part,
    `stop` right after, which returns the seconds in between."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.t0 = 0.0

    def seconds(self) -> float:
        f = _stat(self.postmaster)
        if f is None:
            raise SystemExit(f"the PostgreSQL server (postmaster {self.postmaster}) is gone")
        total = sum(int(x) for x in f[11:15])           # utime, stime, cutime, cstime
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                c = _stat(int(entry.name))
                if c is not None and int(c[1]) == self.postmaster:
                    total += sum(int(x) for x in c[11:15])
        return total / self.ticks

    def start(self) -> None:
        self.t0 = self.seconds()

    def stop(self) -> dict:
        return {"database_cpu_s": round(self.seconds() - self.t0, 3)}
