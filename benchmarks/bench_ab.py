#!/usr/bin/env python3
"""A/B of two versions of the gateway, or of two settings, under the same load: `devid bench`
rounds, alternating.

    .venv/bin/python benchmarks/bench_ab.py [--baseline DIR] [--candidate DIR] [--rounds 3]
        [--baseline-args "ARGS"] [--candidate-args "ARGS"] [--json] [bench options...]

DIR is a checkout of devid (e.g. `git archive <commit> | tar -x -C /tmp/devid-base`); each side's
gateway runs from its DIR (`devid bench --server-root DIR`), both default to this checkout. The
client code is this checkout's for both sides. `--baseline-args` / `--candidate-args` add bench
options to one side only (e.g. `--candidate-args "--client-loop uvloop"`); the other options go to
both. Each round runs `bench_enroll.py` once per side, in alternating order (A B, B A, ...). It
prints, per round and as medians, per mode (enroll, and renew with --renew): the server CPU per
operation, the client CPU, the rate and p95, and the candidate/baseline ratios as medians of the
per-round pairs with their range. The machine is shared and noisy: read the paired ratios, not
the absolute figures; an A/A run (no DIR, no side args) shows how far noise alone moves them.

Noise control: the gateway and the clients share the machine's cores, so a busy machine slows
both in the same round. `server_per_client_cpu` (server CPU per operation / client CPU per
operation, within one run) cancels most of that when only one of the two differs between the
sides: with the same client code, its ratio is the gateway's change (in the runs of
benchmarks/README.md its spread over rounds was 2-7 times narrower than the server CPU's own);
with the same gateway and different clients (`--client-loop`), its inverse is the client's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_enroll  # noqa: E402

SIDES = ("baseline", "candidate")
FIGURES = ("per_s", "server_cpu_ms_per_op", "client_cpu_ms_per_op", "p95_ms", "server_per_client_cpu")


def one(root: Path, args: list[str]) -> dict:
    """One bench run against the gateway of `root`: {mode: its figures}."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = bench_enroll.main([*args, "--no-baselines", "--quiet", "--server-root", str(root)])
    doc = json.loads(buf.getvalue())
    out = {}
    for mode in ("enroll", "renew"):
        if mode in doc:
            r = doc[mode]
            if code != 0 or r["errors"]:
                raise SystemExit(f"errors in a run against {root}: {r.get('first_failures')}")
            out[mode] = {"per_s": r["per_s"], "server_cpu_ms_per_op": r["server_cpu_ms_per_op"],
                         "client_cpu_ms_per_op": r["client_cpu_ms_per_op"], "p95_ms": r["latency_ms"]["p95"],
                         "server_per_client_cpu": round(r["server_cpu_ms_per_op"] / r["client_cpu_ms_per_op"], 4)
                         if r["server_cpu_ms_per_op"] and r["client_cpu_ms_per_op"] else None}
    return out


def print_summary(summary: dict, rounds: int, labels: dict, ratio_name: str) -> None:
    """Per mode: each side's medians (`labels`: side -> its name in the table) and the
    candidate/baseline ratios (`ratio_name`) as medians of the paired rounds with their range."""
    width = max(10, *(len(label) for label in labels.values()))
    for mode in ("enroll", "renew"):
        if mode not in summary:
            continue
        s = summary[mode]
        print(f"{mode:{width}s} {'per_s':>8s} {'server ms':>10s} {'client ms':>10s} {'p95 ms':>8s}   "
              f"(medians of {rounds} rounds)")
        for side, label in labels.items():
            f = s[side]
            print(f"{label:{width}s} {f['per_s']:8.1f} {f['server_cpu_ms_per_op'] or 0:10.3f} "
                  f"{f['client_cpu_ms_per_op']:10.3f} {f['p95_ms']:8.1f}")
        rr = s["ratios_candidate_to_baseline"]

        def show(k):
            x = rr[k]
            return "-" if x is None else f"{x['median']:.3f} ({x['min']:.3f}..{x['max']:.3f})"
        print(f"{ratio_name} (median of paired rounds, range): server CPU {show('server_cpu_ms_per_op')}, "
              f"client CPU {show('client_cpu_ms_per_op')}, rate {show('per_s')}, p95 {show('p95_ms')}; "
              f"server CPU per client CPU {show('server_per_client_cpu')}")


def median(values):
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[dict]) -> dict:
    """Per mode: each side's medians, and the candidate/baseline ratios (median of the per-round
    pairs, and their min and max)."""
    out = {}
    for mode in rounds[0]["baseline"]:
        s = {side: {k: median(r[side][mode][k] for r in rounds) for k in FIGURES} for side in SIDES}
        ratios = {}
        for k in FIGURES:
            pairs = [r["candidate"][mode][k] / r["baseline"][mode][k] for r in rounds
                     if r["baseline"][mode][k] and r["candidate"][mode][k] is not None]
            ratios[k] = ({"median": round(statistics.median(pairs), 3), "min": round(min(pairs), 3),
                          "max": round(max(pairs), 3)} if pairs else None)
        s["ratios_candidate_to_baseline"] = ratios
        out[mode] = s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, default=ROOT, help="the baseline's checkout of devid (default: this one)")
    ap.add_argument("--candidate", type=Path, default=ROOT, help="the candidate's checkout (default: this one)")
    ap.add_argument("--baseline-args", default="", help="bench options for the baseline's runs only")
    ap.add_argument("--candidate-args", default="", help="bench options for the candidate's runs only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args, passthrough = ap.parse_known_args(argv)
    for side in SIDES:
        if not (getattr(args, side) / "gateway").is_dir():
            ap.error(f"--{side} {getattr(args, side)}: not a devid checkout")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    sides = {side: (getattr(args, side).resolve(), [*passthrough, *shlex.split(getattr(args, f"{side}_args"))])
             for side in SIDES}
    rounds = []
    for r in range(args.rounds):
        got = {}
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            got[side] = one(*sides[side])
            for mode, f in got[side].items():
                print(f"round {r + 1} {side:9s} {mode:6s} {f['per_s']:7.1f}/s  server {f['server_cpu_ms_per_op'] or 0:.3f} ms"
                      f"  client {f['client_cpu_ms_per_op']:.3f} ms  p95 {f['p95_ms']} ms", file=sys.stderr, flush=True)
        rounds.append(got)
    summary = summarize(rounds)
    summary["rounds"] = rounds
    summary["settings"] = {side: {"root": str(sides[side][0]), "bench": sides[side][1]} for side in SIDES}
    summary["settings"]["rounds"] = args.rounds
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print_summary(summary, args.rounds, {side: side for side in SIDES}, "candidate/baseline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
