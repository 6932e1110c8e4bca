"""The `devid` command line: the top-level parser built from the command groups, the global
--data flag, and one place that turns errors into one line and an exit code.

Each command group is a module of this package that registers its subparsers (`add_commands`)
and holds its command functions: `ca` (init, ca ...), `devices` (revoke, crl, devices ...),
`provision`, `serve`, `device` (enroll, renew, simulate), `bench`, `attest`; `demo` is
registered here because its module imports the server and the device client, which the other
commands do not need to start."""

from __future__ import annotations

import argparse
import sqlite3
import sys

from devid.ca.errors import CAError
from devid.attestation.errors import AttestationError

from devid.gateway.cli import attest, bench, ca, device, devices, provision, serve
from devid.gateway.cli.base import Parser, data_dir
from devid.gateway.app.datadir import ENV_DATA
from devid.gateway.errors import CLIError, GatewayError

# the order of `devid --help`
GROUPS = (ca, devices, provision, serve, device, bench)


def cmd_demo(args) -> int:
    from devid.gateway.cli.demo import run_demo
    return run_demo(data_dir(args), count=args.count)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"data directory (default: ${ENV_DATA} or ./devid-data)")
    p = Parser(prog="devid", parents=[common],
               description="devid: device identity gateway. Factory identities, attested enrollment over "
                           "CoAP/DTLS, operational certificates, revocation.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add_commands(sub, common)

    s = sub.add_parser("demo", parents=[common],
                       help="the main job on the embedded default: init if needed, provision, issue, list")
    s.add_argument("--count", type=int, default=5, metavar="N", help="devices to provision (default: 5)")
    s.set_defaults(func=cmd_demo)

    attest.add_commands(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:          # its own option parser (benchmarks/bench_enroll.py)
        try:
            return bench.cmd_bench(argparse.Namespace(bench_args=argv[1:], data=None))
        except CLIError as exc:
            print(f"devid: error: {exc}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "data"):
        args.data = None
    try:
        return args.func(args)
    except (CAError, GatewayError, AttestationError) as exc:
        print(f"devid: error: {exc}", file=sys.stderr)
        return 1
    except sqlite3.Error as exc:
        print(f"devid: error: registry: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    except OSError as exc:        # e.g. --out names a file, a full disk, a directory we may not write
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"devid: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("devid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
