"""`devid bench --workers-scaling` (benchmarks/bench_scaling.py), small and end to end: one round of
`devid serve --workers 1` against `--workers 2` on one data directory, every enrollment succeeds on
both sides, and the paired ratios are the ratios of that round's figures (their values are the
benchmark's business, not a test's), with --sql-cost the gateway's SQLite calls counted; and its
command line refuses what it cannot compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import one_line_error, run_devid

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_scaling  # noqa: E402


def test_one_round_of_one_worker_against_two(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--workers-scaling", "--workers", "2",
                           "--rounds", "1", "--devices", "6", "--concurrency", "4", "--sql-cost"],
                          capture_output=True, timeout=600, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                               "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:] + proc.stdout.decode()[-2000:]
    s = json.loads(proc.stdout)["workers_scaling"]
    assert s["errors"] == 0 and s["workers"] == [1, 2]
    [r] = s["rounds"]
    for side in ("1", "2"):
        assert r[side]["done"] == 6 and r[side]["errors"] == 0 and r[side]["per_s"] > 0
        assert s["median"][side]["per_s"] == r[side]["per_s"]
    assert s["ratios"]["rate"]["median"] == round(r["2"]["per_s"] / r["1"]["per_s"], 3)
    # --sql-cost: the gateway's processes counted their SQLite calls, the enrollment's durable write
    # transaction among them (one BEGIN IMMEDIATE and one COMMIT at least per enrollment)
    for side in ("1", "2"):
        statements = r[side]["statements_per_op"]
        assert r[side]["sql_cpu_ms_per_op"] > 0
        assert statements["BEGIN IMMEDIATE"]["calls"] >= 1 and statements["COMMIT"]["calls"] >= 1
    assert s["ratios"]["sql_cpu"]["median"] == round(r["2"]["sql_cpu_ms_per_op"] / r["1"]["sql_cpu_ms_per_op"], 3)
    assert s["target_server_cpu_ratio"] == 1.1
    # the server's CPU clock counts 10 ms ticks: 6 enrollments may not move it (then no ratio)
    assert (s["ratios"]["server_cpu"] is None) == (not r["1"]["server_cpu_ms_per_op"]
                                                   or r["2"]["server_cpu_ms_per_op"] is None)
    err = proc.stderr.decode()
    assert "round 1, 1 worker(s)" in err and "round 1, 2 worker(s)" in err and "2 workers / 1" in err


def test_the_ratios_are_medians_of_the_paired_rounds():
    def run(rate, server, client):
        return {"done": 10, "errors": 0, "per_s": rate, "server_cpu_ms_per_op": server,
                "client_cpu_ms_per_op": client, "p95_ms": 100.0, "server_per_client_cpu": server / client}
    rounds = [{"1": run(100, 4.0, 2.0), "2": run(150, 4.8, 2.0)},
              {"1": run(200, 5.0, 2.5), "2": run(180, 5.0, 2.0)},
              {"1": run(100, 4.0, 2.0), "2": run(120, 4.2, 2.2)}]
    s = bench_scaling.summarize(rounds, "2")
    assert s["ratios"]["server_cpu"] == {"median": 1.05, "min": 1.0, "max": 1.2}
    assert s["ratios"]["rate"] == {"median": 1.2, "min": 0.9, "max": 1.5}
    assert s["median"]["2"]["server_cpu_ms_per_op"] == 4.8
    assert s["server_cpu_target_met"] is True
    rounds[0]["2"]["server_cpu_ms_per_op"] = None          # a run whose CPU clock did not move
    assert bench_scaling.paired(rounds, "server_cpu_ms_per_op", "2")["median"] == 1.025


def test_workers_scaling_needs_two_workers_and_its_own_gateway():
    one_line_error(run_devid("bench", "--workers-scaling", "--workers", "1"), "--workers")
    one_line_error(run_devid("bench", "--workers-scaling", "--gateway", "coaps://127.0.0.1:5684"), "--gateway")
    one_line_error(run_devid("bench", "--workers-scaling", "--durability"), "choose one")
    one_line_error(run_devid("bench", "--sql-cost"), "--workers-scaling")
