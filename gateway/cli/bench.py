"""`devid bench`: the fleet enrollment benchmark (benchmarks/bench_enroll.py, from a source checkout),
with its own option parser: `devid bench ARGS` hands ARGS over as they are."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devid.gateway.errors import CLIError


def cmd_bench(args) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (bench_dir / "bench_enroll.py").exists():
        raise CLIError(f"the benchmarks are not here ({bench_dir}): run devid bench from a source checkout")
    sys.path.insert(0, str(bench_dir))
    import bench_enroll
    forwarded = list(args.bench_args)
    if args.data:
        forwarded += ["--data", args.data]
    return bench_enroll.main(forwarded)


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("bench", parents=[common], add_help=False,
                       help="fleet enrollment benchmark (JSON summary); 'devid bench --help' for its options")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_bench)
