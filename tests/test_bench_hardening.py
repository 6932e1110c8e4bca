"""`devid bench --durability` and `devid bench --flood` (benchmarks/bench_hardening.py) run end
to end, small: every enrollment succeeds and the figures are there (their values are the
benchmark's business, not a test's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bench(tmp_path, *args) -> dict:
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--devices", "6", "--rounds", "1",
                           "--concurrency", "4", "--workers", "2", *args], capture_output=True, timeout=600, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                               "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:] + proc.stdout.decode()[-2000:]
    return json.loads(proc.stdout)


def test_durability_bench(tmp_path):
    d = _bench(tmp_path, "--durability")["durability"]
    assert d["errors"] == 0 and len(d["rounds"]) == 1
    for mode in ("normal", "durable", "full"):
        run = d["rounds"][0][mode]
        assert run["done"] == 6 and run["server_cpu_ms_per_op"] > 0
    assert d["ratios_to_normal"]["durable"]["server_cpu"] > 0
    assert d["commit"]["full"]["wall_us"] > 0 and d["commit"]["normal"]["wall_us"] > 0


def test_flood_bench(tmp_path):
    f = _bench(tmp_path, "--flood", "--flood-sessions", "2", "--flood-window", "4")["flood"]
    assert f["errors"] == 0
    [r] = f["rounds"]
    assert r["quiet"]["done"] == 6 and r["flooded"]["done"] == 6
    flood = r["flooded"]["flood"]
    assert flood["counts"]["sent"] > 0 and flood["answers_per_s"] > 0
    assert f["p95_ratio_median"] is not None and f["target_p95_ratio"] == 1.5
