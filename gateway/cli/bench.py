"""`devid bench`: the fleet enrollment benchmark (benchmarks/bench_enroll.py, from a source checkout),
with its own option parser: `devid bench ARGS` hands ARGS over as they are, and a `--data DIR`
given before `bench` as `--data DIR` (the data directory of the gateway under test, --gateway)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from devid.gateway.cli.base import Parser
from devid.gateway.cli.output import CommandFailed
from devid.gateway.errors import CLIError


def cmd_bench(data: str | None, bench_args: list[str]) -> int:
    bench_dir = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (bench_dir / "bench_enroll.py").exists():
        raise CLIError(f"the benchmarks are not here ({bench_dir}): run devid bench from a source checkout")
    if str(bench_dir) not in sys.path:
        sys.path.insert(0, str(bench_dir))
    import bench_enroll
    forwarded = list(bench_args) + (["--data", data] if data is not None else [])
    try:
        return bench_enroll.main(forwarded, parser_class=Parser)
    except SystemExit as exc:
        if isinstance(exc.code, str):          # the benchmark could not run (its message)
            raise CommandFailed(exc.code.removeprefix("devid bench: ")) from None
        raise


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    # listed for `devid --help`; `devid [--data DIR] bench ...` is dispatched before this parser
    s = sub.add_parser("bench", parents=[common], add_help=False,
                       help="fleet enrollment benchmark (one JSON document; progress on stderr); "
                            "'devid bench --help' for its options")
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=lambda args: cmd_bench(args.data, args.bench_args))
