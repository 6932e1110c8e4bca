"""`devid bench --workers-scaling` (issue 14): what a second worker process costs and gives.

Rounds of enrollments against a fresh `devid serve --workers 1` and a fresh `devid serve
--workers N` (N = `--workers`, at least 2) on the same data directory, in alternating order (1 N,
N 1, ...), each run enrolling its own `--devices` fresh devices with the same clients, devices in
flight and flow. Reported per run and as medians per worker count: enrollments/s, server CPU per
enrollment (all the gateway's processes), client CPU per enrollment, p95; and N workers against
one as medians of the per-round pairs with their range:

  server_cpu    server CPU per enrollment, N workers / 1 worker (issue 14's target: <= 1.1)
  rate          enrollments/s, N / 1 (target: > 1, rising with cores)
  client_cpu    client CPU per enrollment, N / 1: the clients' code is the same on both sides,
                so this moves only with the machine (more processes than cores, cache and
                scheduling effects, the other sessions' load); read server_cpu against it
  server_per_client_cpu   server CPU / client CPU within each run, N / 1: the machine's share
                cancelled out as far as it hits both alike

With --sql-cost, the gateway's processes also count the thread CPU of their SQLite calls
(benchmarks/sql_cost/sitecustomize.py, loaded through PYTHONPATH into those processes only):
`sql_cpu_ms_per_op` per run and its ratio, and the top statements by CPU per enrollment. On
SQLite a second worker makes each worker's page cache stale at every commit of the other, and
their writes queue on one lock: this is where that shows.

The clients run on the same cores as the gateway. A round's two runs see the same machine, as far
as a shared machine allows: read the paired ratios and their range, not the absolute figures.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path

from bench_clients import run_clients
from bench_common import start_gateway

TARGET_SERVER_CPU = 1.1
FIGURES = ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op", "p95_ms", "server_per_client_cpu",
           "sql_cpu_ms_per_op")
RATIO_NAMES = {"server_cpu_ms_per_op": "server_cpu", "per_s": "rate", "client_cpu_ms_per_op": "client_cpu",
               "p95_ms": "p95", "server_per_client_cpu": "server_per_client_cpu", "sql_cpu_ms_per_op": "sql_cpu"}
SQL_COST_HOOK = Path(__file__).resolve().parent / "sql_cost"


def sql_cost(directory: Path, done: int) -> dict | None:
    """The gateway processes' SQLite tallies (one JSON file each) per enrollment: the total CPU in
    ms, and per kind of statement its calls and µs."""
    tally: dict[str, list] = {}
    for f in directory.glob("*.json"):
        for kind, (calls, seconds) in json.loads(f.read_text()).items():
            t = tally.setdefault(kind, [0, 0.0])
            t[0] += calls
            t[1] += seconds
    if not tally or not done:
        return None
    ranked = sorted(tally.items(), key=lambda kv: -kv[1][1])
    return {"sql_cpu_ms_per_op": round(sum(s for _, s in tally.values()) / done * 1000, 3),
            "statements_per_op": {k: {"calls": round(c / done, 2), "cpu_us": round(s / done * 1e6, 1)}
                                  for k, (c, s) in ranked}}


def _figures(run: dict) -> dict:
    server, client = run.get("server_cpu_ms_per_op"), run.get("client_cpu_ms_per_op")
    return {"done": run["done"], "errors": run["errors"], "per_s": run["per_s"], "server_cpu_ms_per_op": server,
            "client_cpu_ms_per_op": client, "p95_ms": run["latency_ms"]["p95"],
            "server_per_client_cpu": round(server / client, 4) if server and client else None,
            "sql_cpu_ms_per_op": None,          # with --sql-cost: the run's figure
            **({"first_failures": run["first_failures"]} if run.get("first_failures") else {})}


def paired(rounds: list[dict], key: str, many: str) -> dict | None:
    """N workers / 1 worker for one figure: median of the per-round pairs, and their range."""
    pairs = [r[many][key] / r["1"][key] for r in rounds if r["1"].get(key) and r[many].get(key) is not None]
    if not pairs:
        return None
    return {"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3), "max": round(max(pairs), 3)}


def summarize(rounds: list[dict], many: str) -> dict:
    def med(side: str, key: str):
        values = [r[side][key] for r in rounds if r[side].get(key) is not None]
        return round(statistics.median(values), 3) if values else None
    ratios = {RATIO_NAMES[k]: paired(rounds, k, many) for k in FIGURES}
    cpu = ratios["server_cpu"]
    return {"median": {side: {k: med(side, k) for k in FIGURES} for side in ("1", many)},
            "ratios": ratios,
            "target_server_cpu_ratio": TARGET_SERVER_CPU,
            "server_cpu_target_met": None if cpu is None else cpu["median"] <= TARGET_SERVER_CPU}


def workers_scaling(args, data, bundles: list[str], report=None) -> dict:
    """The rounds (bench_enroll.py provisioned `args.devices * 2 * args.rounds` devices)."""
    many = str(args.workers)
    chunks = iter(bundles[i:i + args.devices] for i in range(0, len(bundles), args.devices))
    rounds: list[dict] = []
    errors = 0
    load_start = os.getloadavg()
    for r in range(args.rounds):
        got: dict[str, dict] = {}
        for workers in ((1, args.workers) if r % 2 == 0 else (args.workers, 1)):
            counted = Path(tempfile.mkdtemp(prefix="devid-sql-cost-")) if args.sql_cost else None
            env = {"DEVID_BENCH_SQL_COST": str(counted), "PYTHONPATH": str(SQL_COST_HOOK)} if counted else None
            served = start_gateway(data.path, workers, args.server_root, env)
            try:
                run = run_clients(served.uri, next(chunks), served.pids, clients=args.clients,
                                  concurrency=args.concurrency, client=args.client, loop=args.client_loop,
                                  flow=args.flow)
            finally:
                served.stop()
            run.pop("_latencies", None)
            errors += run["errors"]
            got[str(workers)] = f = _figures(run)
            if counted is not None:
                cost = sql_cost(counted, run["done"])
                for p in counted.glob("*.json"):
                    p.unlink()
                counted.rmdir()
                if cost is not None:
                    f.update(cost)
            if report is not None:
                report.stage(f"round {r + 1}, {workers} worker(s): {f['per_s']:.1f}/s, server CPU "
                             f"{f['server_cpu_ms_per_op'] or 0:.3f} ms, client CPU {f['client_cpu_ms_per_op'] or 0:.3f} "
                             f"ms per enrollment, p95 {f['p95_ms']} ms"
                             + (f"; in SQLite {f['sql_cpu_ms_per_op']:.3f} ms: " + ", ".join(
                                 f"{k} {v['calls']:g}x {v['cpu_us']:.0f} us" for k, v in
                                 list(f["statements_per_op"].items())[:6]) if f.get("sql_cpu_ms_per_op") else ""))
        rounds.append(got)
    return {"workers": [1, args.workers], "errors": errors, "rounds": rounds, **summarize(rounds, many),
            "load": {"start": load_start, "end": os.getloadavg()}}


def lines(result: dict) -> list[str]:
    """The table for people (stderr): medians per worker count, then the paired ratios."""
    many = str(result["workers"][1])
    out = [f"{'workers':>7s} {'enroll/s':>9s} {'server ms':>10s} {'client ms':>10s} {'p95 ms':>8s}"
           f"   (medians of {len(result['rounds'])} rounds)"]
    for side in ("1", many):
        m = result["median"][side]
        out.append(f"{side:>7s} {m['per_s'] or 0:9.1f} {m['server_cpu_ms_per_op'] or 0:10.3f} "
                   f"{m['client_cpu_ms_per_op'] or 0:10.3f} {m['p95_ms'] or 0:8.1f}")

    def show(name: str) -> str:
        x = result["ratios"][name]
        return "-" if x is None else f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"
    met = result["server_cpu_target_met"]
    out.append(f"{many} workers / 1 (median of paired rounds, range): server CPU per enrollment "
               f"{show('server_cpu')} [target <= {TARGET_SERVER_CPU}: {'met' if met else 'not met' if met is False else '-'}], "
               f"rate {show('rate')}, client CPU {show('client_cpu')}, server per client CPU "
               f"{show('server_per_client_cpu')}"
               + (f", CPU in SQLite {show('sql_cpu')}" if result["ratios"]["sql_cpu"] else ""))
    load = result["load"]
    out.append(f"load average start {' '.join(f'{x:.2f}' for x in load['start'])}, "
               f"end {' '.join(f'{x:.2f}' for x in load['end'])}")
    return out
