#!/usr/bin/env python3
"""The gateway's CPU with metrics on against off (issue 17: target within 5 %), in one run.

    .venv/bin/python benchmarks/bench_metrics.py [--rounds 3] [--json] [bench options...]

Each round runs `devid bench` (bench_enroll.py) twice against this checkout's gateway, once with
`DEVID_METRICS=off` in its environment (the baseline: every metric a no-op,
gateway/system/metrics.py) and once with the metrics on (the default), in alternating order
(off on, on off, ...), and prints per mode (enroll, and renew with --renew) the server CPU per
operation, the client CPU, the rate and p95, and the on/off ratios as medians of the per-round
pairs with their range (bench_ab.py's summary: read `server_per_client_cpu`, which cancels most
of a shared machine's noise). Options other than --rounds and --json go to every bench run
(e.g. --devices 400 --workers 2 --renew).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_ab  # noqa: E402

ENV = "DEVID_METRICS"
SIDES = {"baseline": "off", "candidate": "on"}      # bench_ab's names: baseline = metrics off


def one(setting: str, args: list[str]) -> dict:
    saved = os.environ.get(ENV)
    os.environ[ENV] = setting                   # the gateway started by the bench inherits it
    try:
        return bench_ab.one(ROOT, args)
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args, passthrough = ap.parse_known_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rounds = []
    order = list(SIDES)
    for r in range(args.rounds):
        got = {}
        for side in (order if r % 2 == 0 else order[::-1]):
            got[side] = one(SIDES[side], passthrough)
            for mode, f in got[side].items():
                print(f"round {r + 1} metrics {SIDES[side]:3s} {mode:6s} {f['per_s']:7.1f}/s  server "
                      f"{f['server_cpu_ms_per_op'] or 0:.3f} ms  client {f['client_cpu_ms_per_op']:.3f} ms  "
                      f"p95 {f['p95_ms']} ms", file=sys.stderr, flush=True)
        rounds.append(got)
    summary = bench_ab.summarize(rounds)
    summary["rounds"] = rounds
    summary["settings"] = {"baseline": f"{ENV}=off", "candidate": f"{ENV}=on", "bench": passthrough,
                           "rounds": args.rounds}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for mode in ("enroll", "renew"):
        if mode not in summary:
            continue
        s = summary[mode]
        print(f"{mode:12s} {'per_s':>8s} {'server ms':>10s} {'client ms':>10s} {'p95 ms':>8s}   (medians of {args.rounds} rounds)")
        for side, label in (("baseline", "metrics off"), ("candidate", "metrics on")):
            f = s[side]
            print(f"{label:12s} {f['per_s']:8.1f} {f['server_cpu_ms_per_op'] or 0:10.3f} {f['client_cpu_ms_per_op']:10.3f} "
                  f"{f['p95_ms']:8.1f}")
        rr = s["ratios_candidate_to_baseline"]

        def show(k):
            x = rr[k]
            return "-" if x is None else f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"
        print(f"on/off (median of paired rounds, range): server CPU {show('server_cpu_ms_per_op')}, "
              f"server CPU per client CPU {show('server_per_client_cpu')}, rate {show('per_s')}, p95 {show('p95_ms')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
