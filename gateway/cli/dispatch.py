"""The `devid` command line: the top-level parser built from the command groups, the global
--data flag, and one place that turns errors into one line, an exit code and, with --json, the
JSON document of a failure (docs/cli.md).

Each command group is a module of this package that registers its subparsers (`add_commands`)
and holds its command functions: `ca` (init, ca ...), `devices` (revoke, crl, devices ...),
`provision`, `serve`, `device` (enroll, renew, simulate), `agent`, `se` (a device whose keys are in a
secure element), `bench`, `registry` (migrate, check), `attest`; `demo` is registered here because its module imports the server and the device client, which the other
commands do not need to start."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

from devid.ca.errors import CAError
from devid.attestation.errors import AttestationError

from devid.gateway.cli import agent, attest, bench, ca, device, devices, mqtt, operator, output, provision, registry, se, serve
from devid.gateway.cli.base import Parser, data_dir, wants_json
from devid.gateway.app.datadir import ENV_DATA, ENV_REGISTRY
from devid.gateway.errors import GatewayError

# the order of `devid --help`
GROUPS = (ca, devices, provision, serve, device, agent, se, mqtt, bench, registry, operator)
DATA_HELP = f"the data directory (default: ${ENV_DATA}, else ./devid-data); before or after the command"
REGISTRY_HELP = (f"the registry on PostgreSQL, postgresql://USER@HOST:PORT/DB (default: ${ENV_REGISTRY}, else "
                 "devid.toml's [registry] url, else SQLite in the data directory); with init: written into devid.toml")


def cmd_demo(args) -> int:
    from devid.gateway.cli.demo import run_demo
    return run_demo(data_dir(args), count=args.count, json_mode=args.json, mqtt=not args.no_mqtt)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", metavar="DIR", default=argparse.SUPPRESS, help=DATA_HELP)
    common.add_argument("--registry", metavar="URL", default=argparse.SUPPRESS, help=REGISTRY_HELP)
    p = Parser(prog="devid", parents=[common],
               description="devid: device identity gateway. Factory identities, attested enrollment over "
                           "CoAP/DTLS, operational certificates, revocation. Conventions (--data, --json, "
                           "exit codes, serials): docs/cli.md.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add_commands(sub, common)

    s = sub.add_parser("demo", parents=[common],
                       help="the main job on the embedded default: init if needed, provision, enroll, "
                            "publish over MQTT, renew, revoke, list")
    s.add_argument("--count", type=output.positive_int, default=5, metavar="N",
                   help="devices to provision (default: 5)")
    s.add_argument("--no-mqtt", action="store_true",
                   help="leave out the MQTT broker part (it runs when Mosquitto is installed)")
    s.add_argument("--json", action="store_true", help="one JSON document at the end instead of the steps")
    s.set_defaults(func=cmd_demo)

    attest.add_commands(sub, common)
    return p


def _bench_argv(argv: list[str]) -> tuple[str | None, list[str]] | None:
    """`[--data DIR] bench ARGS`: (DIR, ARGS); None for any other command. bench has its own
    option parser (benchmarks/bench_enroll.py), which takes --data after `bench` as well."""
    data, i = None, 0
    while i < len(argv):
        if argv[i] == "--data" and i + 1 < len(argv):
            data, i = argv[i + 1], i + 2
        elif argv[i].startswith("--data="):
            data, i = argv[i][len("--data="):], i + 1
        else:
            break
    return (data, argv[i + 1:]) if argv[i:i + 1] == ["bench"] else None


def _fail(message: str, code: int, json_mode: bool, details: dict | None = None, prefix: str = "error: ") -> int:
    print(f"devid: {prefix}{message}", file=sys.stderr)
    if json_mode:
        try:
            output.emit({"ok": False, "error": message, **(details or {})})
        except BrokenPipeError:
            pass
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    json_mode = wants_json(argv)
    Parser.json_errors = json_mode
    bench_call = _bench_argv(argv)
    if bench_call is not None:
        func = lambda: bench.cmd_bench(*bench_call)   # noqa: E731
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
        path = (args.command, getattr(args, "mqtt_command", None) or "")
        if hasattr(args, "data") and device.is_device_path(path):
            parser.error(f"--data: '{' '.join(path).strip()}' uses no data directory (a device knows its bundle "
                         "and its gateway, not the CA)")
        if hasattr(args, "registry") and device.is_device_path(path):
            parser.error(f"--registry: '{' '.join(path).strip()}' uses no registry (a device knows its bundle and its "
                         "gateway)")
        if not hasattr(args, "data"):
            args.data = None
        if getattr(args, "registry", None):
            # for this command and every process it starts (serve's workers): as if $DEVID_REGISTRY
            os.environ[ENV_REGISTRY] = args.registry
        if not hasattr(args, "json"):
            args.json = False
        func = lambda: args.func(args)   # noqa: E731
    try:
        return func()
    except output.CommandFailed as exc:
        return _fail(str(exc), exc.code, json_mode, exc.details)
    except (CAError, GatewayError, AttestationError) as exc:
        return _fail(str(exc), 1, json_mode)
    except sqlite3.Error as exc:
        return _fail(f"registry: {exc}", 1, json_mode)
    except BrokenPipeError:
        return 0
    except OSError as exc:        # e.g. --out names a file, a full disk, a directory we may not write
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 1, json_mode)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, json_mode, prefix="")


if __name__ == "__main__":
    sys.exit(main())
