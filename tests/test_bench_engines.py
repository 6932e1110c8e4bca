"""`devid bench --registry` (benchmarks/bench_engines.py) run end to end, small: SQLite and a real
PostgreSQL, each at 1 and 2 workers, every enrollment succeeds, the JSON has the four configurations
with the database server's CPU on the PostgreSQL rows and the ratios (their values are the
benchmark's business, not a test's). `auto` starts and removes a throwaway cluster; a given URL gets
fresh schemas that are dropped at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import one_line_error, run_devid

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("sqlite-w1", "sqlite-w2", "postgresql-w1", "postgresql-w2")


def _bench(tmp_path, registry: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--registry", registry, "--devices", "4",
                           "--rounds", "1", "--concurrency", "4", "--json"], capture_output=True, timeout=600,
                          cwd=ROOT, env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                                         "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:] + proc.stdout.decode()[-2000:]
    assert proc.stderr == b""                   # --json: no progress
    return json.loads(proc.stdout)


def _check(doc: dict) -> dict:
    assert doc["ok"] is True
    e = doc["engines"]
    assert e["errors"] == 0 and e["rounds"] == 1 and e["database_cpu_measured"] is True
    assert set(e["configurations"]) == set(CONFIGS) == set(e["per_round"][0]) == set(e["order"][0])
    for name in CONFIGS:
        run = e["per_round"][0][name]
        assert run["done"] == 4 and run["errors"] == 0 and run["per_s"] > 0
        assert run["gateway_cpu_ms_per_op"] is not None
        if name.startswith("postgresql"):
            assert run["database_cpu_ms_per_op"] is not None
            assert run["server_cpu_ms_per_op"] == round(run["gateway_cpu_ms_per_op"] + run["database_cpu_ms_per_op"], 3)
        else:
            assert run["database_cpu_ms_per_op"] is None
            assert run["server_cpu_ms_per_op"] == run["gateway_cpu_ms_per_op"]
        assert e["configurations"][name]["per_s"]["median"] == run["per_s"]
    r = e["ratios"]
    for key in ("per_s", "server_cpu_ms_per_op", "gateway_cpu_ms_per_op"):
        for pair in (r["postgresql_vs_sqlite"]["workers_1"], r["postgresql_vs_sqlite"]["workers_2"],
                     r["workers_2_vs_1"]["sqlite"], r["workers_2_vs_1"]["postgresql"]):
            assert set(pair[key]) == {"median", "min", "max"}
    rate = lambda n: e["per_round"][0][n]["per_s"]      # noqa: E731
    assert r["postgresql_vs_sqlite"]["workers_1"]["per_s"]["median"] == round(rate("postgresql-w1") / rate("sqlite-w1"), 3)
    assert r["workers_2_vs_1"]["postgresql"]["per_s"]["median"] == round(rate("postgresql-w2") / rate("postgresql-w1"), 3)
    assert doc["machine"]["postgresql"].startswith("15")
    return e


def test_auto_runs_a_throwaway_cluster_end_to_end(tmp_path):
    e = _check(_bench(tmp_path, "auto"))
    assert e["registry"].startswith("auto (a throwaway PostgreSQL cluster in ")
    # the cluster is gone: its directory and its processes
    where = e["registry"].split(" in ", 1)[1].split(",")[0]
    assert "devid-bench-pg-" in where and not Path(where).exists()
    assert not [cmd for cmd in map(_cmdline, Path("/proc").glob("[0-9]*/cmdline")) if where in cmd]


def _cmdline(p: Path) -> str:
    try:
        return p.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_given_registry_gets_fresh_schemas_dropped_at_the_end(tmp_path, postgres):
    import psycopg
    url = postgres.new_database("bench")
    e = _check(_bench(tmp_path, url))
    assert e["registry"] == url
    with psycopg.connect(url) as con:
        left = con.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'devid_bench%'").fetchall()
    assert left == []


def test_registry_options_that_mean_nothing_there_are_one_clear_error():
    one_line_error(run_devid("bench", "--registry", "auto", "--durability"), "--registry", "--durability")
    one_line_error(run_devid("bench", "--registry", "sqlite:///x"), "--registry", "PostgreSQL URL")
