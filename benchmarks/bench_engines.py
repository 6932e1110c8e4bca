"""`devid bench --registry postgresql://...` (or `--registry auto`): the registry engines side by side.

In one run, four configurations, each a fresh gateway on a fresh registry:

    sqlite-w1        devid serve --workers 1, the SQLite registry in the data directory (the default)
    sqlite-w2        the same with --workers 2
    postgresql-w1    devid serve --workers 1 on the given PostgreSQL (a fresh schema of its database)
    postgresql-w2    the same with --workers 2

Each round runs the four in a rotated order (round r starts with configuration r mod 4), so the
machine's noise falls on all of them alike. For each configuration and round: a new data directory
(`devid init`, with the registry URL for PostgreSQL, as `devid init --registry URL` does; devid.toml
then names it for `devid serve`), `--devices` devices provisioned into it, the gateway started, the
devices enrolled by the client processes (bench_clients.run_clients: `--clients`, `--concurrency`,
`--client`, `--flow`), the gateway stopped. Measured over the timed part: enrollments/s, latency,
the gateway processes' CPU per enrollment and, for PostgreSQL, the CPU of the database server's
processes (bench_pg.ServerCPU): SQLite does its work inside the gateway, PostgreSQL in its own
processes, so only gateway + database compares the engines.

Reported: per configuration the median over the rounds and min..max; the ratios PostgreSQL/SQLite
at each worker count and 2 workers/1 worker for each engine, as medians of the per-round pairs
(both sides of a pair ran in the same round), with min..max. The table goes to stderr (not with
--quiet or --json), the whole result to stdout as one JSON document ("engines").

`--registry auto` starts a throwaway PostgreSQL cluster for the run (bench_pg.Cluster) and removes
it at the end, also after ^C or SIGTERM. A given URL names a database where the benchmark may create schemas
(dropped at the end); the database server's CPU is measured when it runs on this machine.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import bench_cli
import bench_pg
from bench_clients import run_clients
from bench_common import ROOT, DEVICE_TYPE, bench_policy, bundle_dirs, start_gateway
from devid.gateway.device.stats import median

CONFIGS = (("sqlite", 1), ("sqlite", 2), ("postgresql", 1), ("postgresql", 2))
ENV_REGISTRY = "DEVID_REGISTRY"


def name(engine: str, workers: int) -> str:
    return f"{engine}-w{workers}"


def check(ap, args) -> None:
    """The options that mean nothing with --registry."""
    for flag in ("gateway", "durability", "flood", "renew"):
        if getattr(args, flag):
            ap.error(f"--registry compares the engines with gateways of its own (enrollments): leave out "
                     f"--{flag}")
    if args.registry != "auto" and not args.registry.lower().startswith(("postgresql://", "postgres://")):
        ap.error("--registry: a PostgreSQL URL (postgresql://USER@HOST:PORT/DATABASE) or 'auto' (a throwaway "
                 "cluster for the run)")


@contextmanager
def registry_env(url: str | None):
    """$DEVID_REGISTRY as `devid --registry URL` sets it (unset: SQLite in the data directory)."""
    old = os.environ.pop(ENV_REGISTRY, None)
    if url:
        os.environ[ENV_REGISTRY] = url
    try:
        yield
    finally:
        os.environ.pop(ENV_REGISTRY, None)
        if old is not None:
            os.environ[ENV_REGISTRY] = old


def _git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_facts(pg_url: str) -> dict:
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    with bench_pg._connect(pg_url) as con:
        pg_version = con.execute("SHOW server_version").fetchone()[0]
        fsync = con.execute("SHOW fsync").fetchone()[0]
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines() if line[3:].endswith(".py")]
    return {"python": platform.python_version(), "kernel": platform.release(), "nproc": os.cpu_count(), "cpu": cpu,
            "sqlite": sqlite3.sqlite_version, "postgresql": pg_version, "postgresql_fsync": fsync,
            "devid_commit": _git("rev-parse", "--short", "HEAD"), "uncommitted": dirty, "load_start": os.getloadavg()}


def prepare(work: Path, tag: str, url: str | None, devices: int) -> tuple[Path, list[str]]:
    """A data directory initialised on `url` (None: SQLite in it), with `devices` provisioned."""
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.factory.provisioning import provision
    now = lambda: datetime.now(timezone.utc)  # noqa: E731
    data = DataDir(work / tag / "data")
    with registry_env(url):
        data.init(now())
        (data.path / "attestation-policy.toml").write_text(bench_policy())
        reg = data.open_registry()
        try:
            provision(data.authority(reg), count=devices, device_type=DEVICE_TYPE, out=work / tag / "factory",
                      manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                      serial_prefix=f"E{os.getpid()}{tag.replace('-', '')}", now=now)
        finally:
            reg.close()
    return data.path, bundle_dirs(work / tag / "factory")


def one(args, work: Path, r: int, engine: str, workers: int, pg_url: str, postmaster: int | None,
        schemas: list[str]) -> dict:
    tag = f"r{r + 1}-{name(engine, workers)}"
    url = None
    if engine == "postgresql":
        schema = f"devid_bench_{os.getpid()}_{r + 1}_w{workers}"
        url = bench_pg.fresh_schema(pg_url, schema)
        schemas.append(schema)
    bench_cli.REPORT.stage(f"round {r + 1}: {name(engine, workers)}: preparing a data directory and "
                           f"{args.devices} devices")
    data_path, bundles = prepare(work, tag, url, args.devices)
    probe = bench_pg.ServerCPU(postmaster) if url and postmaster else None
    with registry_env(None):            # devid.toml names the registry (none: SQLite)
        served = start_gateway(data_path, workers, args.server_root)
    try:
        run = run_clients(served.uri, bundles, served.pids, clients=args.clients, concurrency=args.concurrency,
                          client=args.client, probe=probe, label=f"round {r + 1}: {name(engine, workers)}: ",
                          loop=args.client_loop, flow=args.flow)
    finally:
        served.stop()
    done = run["done"]
    gw = run["server_cpu_ms_per_op"]
    db = None
    if engine == "postgresql" and probe is not None and done:
        db = round(run["write_probe"]["database_cpu_s"] * 1000 / done, 3)
    total = gw if engine == "sqlite" else (round(gw + db, 3) if gw is not None and db is not None else None)
    out = {"done": done, "errors": run["errors"], "seconds": run["seconds"], "per_s": run["per_s"],
           "latency_ms": run["latency_ms"], "gateway_cpu_ms_per_op": gw, "database_cpu_ms_per_op": db,
           "server_cpu_ms_per_op": total, "client_cpu_ms_per_op": run["client_cpu_ms_per_op"],
           "server_peak_rss_kib": run["server_peak_rss_kib"]}
    if run.get("first_failures"):
        out["first_failures"] = run["first_failures"]
    return out


def _spread(values) -> dict:
    present = [v for v in values if v is not None]
    return {"median": round(median(present), 3) if present else None,
            "min": min(present) if present else None, "max": max(present) if present else None}


def _paired(rounds: list[dict], a: str, b: str, key: str) -> dict:
    """a/b per round (both in the same round), median and min..max."""
    pairs = [g[a][key] / g[b][key] for g in rounds if g[a].get(key) and g[b].get(key)]
    return {"median": round(median(pairs), 3) if pairs else None,
            "min": round(min(pairs), 3) if pairs else None, "max": round(max(pairs), 3) if pairs else None}


KEYS = ("per_s", "server_cpu_ms_per_op", "gateway_cpu_ms_per_op")


def summarise(rounds: list[dict]) -> dict:
    configs = {}
    for engine, workers in CONFIGS:
        n = name(engine, workers)
        runs = [g[n] for g in rounds]
        configs[n] = {"engine": engine, "workers": workers,
                      **{k: _spread(run[k] for run in runs) for k in
                         ("per_s", "gateway_cpu_ms_per_op", "database_cpu_ms_per_op", "server_cpu_ms_per_op")},
                      "p95_ms": _spread(run["latency_ms"]["p95"] for run in runs)}
    ratios = {"postgresql_vs_sqlite": {f"workers_{w}": {k: _paired(rounds, name("postgresql", w), name("sqlite", w), k)
                                                        for k in KEYS} for w in (1, 2)},
              "workers_2_vs_1": {e: {k: _paired(rounds, name(e, 2), name(e, 1), k) for k in KEYS}
                                 for e in ("sqlite", "postgresql")}}
    return {"configurations": configs, "ratios": ratios}


def _num(x, fmt: str = ",.1f") -> str:
    return "-" if x is None else format(x, fmt)


def _range(s: dict, fmt: str) -> str:
    return f"{_num(s['median'], fmt)} ({_num(s['min'], fmt)}..{_num(s['max'], fmt)})"


def table(result: dict) -> list[str]:
    c, rt = result["configurations"], result["ratios"]
    lines = [f"{'configuration':<22} {'enrollments/s':>22} {'gateway CPU ms/enr':>20} {'database ms/enr':>20} "
             f"{'gateway+db ms/enr':>20} {'p95 ms':>7}"]
    for engine, workers in CONFIGS:
        s = c[name(engine, workers)]
        db = "(in gateway)" if engine == "sqlite" else _range(s["database_cpu_ms_per_op"], ".2f")
        lines.append(f"{f'{engine}, {workers} worker' + ('s' if workers > 1 else ''):<22} "
                     f"{_range(s['per_s'], ',.1f'):>22} {_range(s['gateway_cpu_ms_per_op'], '.2f'):>20} "
                     f"{db:>20} {_range(s['server_cpu_ms_per_op'], '.2f'):>20} {_num(s['p95_ms']['median'], '.0f'):>7}")
    lines.append(f"{'ratio (paired rounds)':<22} {'enrollments/s':>22} {'gateway CPU/enr':>20} {'':>20} "
                 f"{'gateway+db CPU/enr':>20}")
    rows = [(f"postgresql/sqlite, {w}w", rt["postgresql_vs_sqlite"][f"workers_{w}"]) for w in (1, 2)]
    rows += [(f"2w/1w, {e}", rt["workers_2_vs_1"][e]) for e in ("sqlite", "postgresql")]
    for label, r in rows:
        lines.append(f"{label:<22} {_range(r['per_s'], '.2f'):>22} {_range(r['gateway_cpu_ms_per_op'], '.2f'):>20} "
                     f"{'':>20} {_range(r['server_cpu_ms_per_op'], '.2f'):>20}")
    return lines


COUNTING = {
    "gateway_cpu_ms_per_op": "CPU time (user + system) of the devid serve processes over the timed part, per "
                             "enrollment (/proc/PID/stat); with SQLite this includes all the registry's work",
    "database_cpu_ms_per_op": "CPU time of the PostgreSQL server over the timed part, per enrollment: the postmaster, "
                              "its live processes and the ones it reaped (cutime, cstime), so backends, WAL writer, "
                              "checkpointer, autovacuum; null for SQLite (in the gateway) and for a server on "
                              "another machine",
    "server_cpu_ms_per_op": "gateway + database: what the engines are compared on",
    "ratios": "median of the per-round ratios (both configurations of a pair ran in the same round), min..max",
}


def main(ap, args) -> int:
    check(ap, args)
    report = bench_cli.REPORT
    work, temporary = bench_cli.workdir(ap, args.workdir)
    cluster = None
    pg_url = args.registry
    schemas: list[str] = []
    saved_env = os.environ.pop(ENV_REGISTRY, None)

    def terminated(signum, frame):
        raise SystemExit("terminated (SIGTERM)")
    saved_term = signal.signal(signal.SIGTERM, terminated)      # as ^C: the cleanup below runs
    try:
        if args.registry == "auto":
            report.stage("starting a throwaway PostgreSQL cluster (--registry auto)")
            cluster = bench_pg.Cluster().start()
            pg_url = cluster.url()
        from devid.gateway.store.engines import redact
        machine = machine_facts(pg_url)
        postmaster = bench_pg.postmaster_of(pg_url)
        if postmaster is None:
            report.stage("the PostgreSQL server is not on this machine: its CPU is not measured")
        rounds, orders, errors = [], [], 0
        for r in range(args.rounds):
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            orders.append([name(*c) for c in order])
            got = {}
            for engine, workers in order:
                got[name(engine, workers)] = run = one(args, work, r, engine, workers, pg_url, postmaster, schemas)
                errors += run["errors"]
            rounds.append(got)
        machine["load_end"] = os.getloadavg()
        result = {"registry": f"auto (a throwaway PostgreSQL cluster in {cluster.dir}, port {cluster.port})"
                  if cluster else redact(args.registry),
                  "database_cpu_measured": postmaster is not None, "devices": args.devices, "rounds": args.rounds,
                  **summarise(rounds), "order": orders, "per_round": rounds, "errors": errors,
                  "counting": COUNTING}
        summary = {"machine": machine,
                   "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                if k != "registry"} | {"registry": result["registry"]},
                   "engines": result}
        for line in table(result):
            report.stage(line)
        return bench_cli.emit(summary, f"{errors} enrollment(s) failed" if errors else None)
    finally:
        if schemas and cluster is None:
            try:
                drop_started = time.monotonic()
                bench_pg.drop_schemas(pg_url, schemas)
                report.stage(f"dropped {len(schemas)} schema(s) in {time.monotonic() - drop_started:.1f} s")
            except SystemExit as exc:
                report.stage(f"could not drop the benchmark's schemas {', '.join(schemas)}: {exc}")
        if cluster is not None:
            cluster.stop()
        signal.signal(signal.SIGTERM, saved_term)
        if saved_env is not None:
            os.environ[ENV_REGISTRY] = saved_env
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report.stage(f"kept {work}")
