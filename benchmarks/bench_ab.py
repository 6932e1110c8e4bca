#!/usr/bin/env python3
"""A/B of two versions of the gateway under the same load: `devid bench` rounds, alternating.

    .venv/bin/python benchmarks/bench_ab.py --baseline DIR [--rounds 3] [bench options...]

DIR is another checkout of devid (e.g. `git worktree add /tmp/devid-base <commit>`); the
candidate is this checkout. Each round runs `bench_enroll.py` once against each gateway, in
alternating order (A B, B A, ...), with the same client code (this checkout's) and the same
options; then it prints, per round and as medians, the server CPU per enrollment, the client CPU,
the rate and p95, and the candidate/baseline ratios. The machine is shared and noisy: read the
paired ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_enroll  # noqa: E402


def one(root: Path, passthrough: list[str]) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench_enroll.main([*passthrough, "--no-baselines", "--server-root", str(root)])
    result = json.loads(buf.getvalue())["enroll"]
    if code != 0 or result["errors"]:
        raise SystemExit(f"errors in a run against {root}: {result.get('first_failures')}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="the other checkout of devid")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args, passthrough = ap.parse_known_args(argv)
    if not (args.baseline / "gateway").is_dir():
        ap.error(f"{args.baseline} is not a devid checkout")
    sides = {"candidate": ROOT, "baseline": args.baseline.resolve()}
    rounds = []
    for r in range(args.rounds):
        order = ["baseline", "candidate"] if r % 2 == 0 else ["candidate", "baseline"]
        got = {}
        for side in order:
            got[side] = one(sides[side], passthrough)
            print(f"round {r + 1} {side:9s} {got[side]['per_s']:7.1f}/s  server {got[side]['server_cpu_ms_per_op']:.3f} ms"
                  f"  client {got[side]['client_cpu_ms_per_op']:.3f} ms  p95 {got[side]['latency_ms']['p95']} ms",
                  file=sys.stderr, flush=True)
        rounds.append(got)

    def med(side, key, sub=None):
        return statistics.median(x[side][key][sub] if sub else x[side][key] for x in rounds)

    def ratio(key, sub=None):
        return statistics.median((x["candidate"][key][sub] if sub else x["candidate"][key]) /
                                 (x["baseline"][key][sub] if sub else x["baseline"][key]) for x in rounds)
    summary = {side: {"per_s": med(side, "per_s"), "server_cpu_ms_per_op": med(side, "server_cpu_ms_per_op"),
                      "client_cpu_ms_per_op": med(side, "client_cpu_ms_per_op"),
                      "p95_ms": med(side, "latency_ms", "p95")} for side in sides}
    summary["ratios_candidate_to_baseline"] = {
        "server_cpu": round(ratio("server_cpu_ms_per_op"), 3), "per_s": round(ratio("per_s"), 3),
        "p95": round(ratio("latency_ms", "p95"), 3)}
    summary["settings"] = {"baseline": str(sides["baseline"]), "candidate": str(ROOT), "rounds": args.rounds,
                           "bench": passthrough}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{'':10s} {'per_s':>8s} {'server ms':>10s} {'client ms':>10s} {'p95 ms':>8s}   (medians of {args.rounds} rounds)")
        for side in ("baseline", "candidate"):
            s = summary[side]
            print(f"{side:10s} {s['per_s']:8.1f} {s['server_cpu_ms_per_op']:10.3f} {s['client_cpu_ms_per_op']:10.3f} "
                  f"{s['p95_ms']:8.1f}")
        rr = summary["ratios_candidate_to_baseline"]
        print(f"candidate/baseline (median of paired rounds): server CPU {rr['server_cpu']:.3f}, "
              f"rate {rr['per_s']:.3f}, p95 {rr['p95']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
