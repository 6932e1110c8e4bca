"""The command line of `devid bench` (benchmarks/bench_enroll.py): its options, its scratch
directory, its progress on stderr and its one JSON document on stdout (docs/cli.md)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_parser(parser_class: type, description: str) -> argparse.ArgumentParser:
    ap = parser_class(prog="devid bench", description=description,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, help="devices to enroll (default 200; with --durability "
                                                "or --flood: per mode and round; with --mqtt: whose operational "
                                                "identities the connects take turns with, default 20)")
    ap.add_argument("--concurrency", type=int, default=16, help="devices in flight in all (default 16)")
    ap.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="gateway processes")
    ap.add_argument("--renew", action="store_true", help="measure renewals (EST /sren) of enrolled devices")
    ap.add_argument("--gateway", metavar="URI", help="target a running gateway instead; its data directory is --data")
    ap.add_argument("--data", metavar="DIR",
                    help="with --gateway: the data directory of that gateway, where the devices are provisioned "
                         "(default: $DEVID_DATA, else ./devid-data)")
    ap.add_argument("--workdir", metavar="DIR", type=Path,
                    help="the benchmark's own CA (without --gateway) and the device bundles go here, and stay "
                         "(an empty or new directory; default: a temporary directory, removed at the end)")
    ap.add_argument("--probe-devices", type=int, default=10, metavar="N",
                    help="devices of the write probe: before the timed runs, N more devices enroll (and renew) "
                         "one at a time while the registry's write transactions are counted in its WAL "
                         "(default 10; 0: no probe)")
    ap.add_argument("--no-baselines", action="store_true", help="skip the libcoap and crypto baselines")
    ap.add_argument("--baseline-seconds", type=float, default=5.0)
    ap.add_argument("--server-root", type=Path, default=ROOT,
                    help="run the gateway from this checkout of devid (A/B comparisons: bench_ab.py)")
    ap.add_argument("--client", choices=("lean", "script"), default="lean",
                    help="lean: benchmarks/loadgen.py (default); script: the field engineer's script per "
                         "device (gateway/device/simulator.py)")
    ap.add_argument("--flow", choices=("one-request", "classic"), default="one-request",
                    help="how the devices enroll: one-request (default: evidence in the CSR of EST /sen, the "
                         "answer with the configuration) or classic (nonce, evidence, /sen, /config)")
    ap.add_argument("--client-loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="the client processes' event loop: asyncio's own (default) or uvloop's (if installed)")
    ap.add_argument("--durability", action="store_true",
                    help="instead of the plain run: the cost of durable commits (gateway with and without "
                         "synchronous=FULL, alternating rounds; benchmarks/bench_hardening.py)")
    ap.add_argument("--flood", action="store_true",
                    help="instead of the plain run: enrollment latency while another identity floods nonce "
                         "requests, against quiet rounds (benchmarks/bench_hardening.py)")
    ap.add_argument("--workers-scaling", action="store_true",
                    help="instead of the plain run: 1 worker against --workers N (at least 2) in alternating "
                         "rounds, server CPU per enrollment and rate side by side with their ratios "
                         "(benchmarks/bench_scaling.py)")
    ap.add_argument("--sql-cost", action="store_true",
                    help="with --workers-scaling: also the gateway's CPU inside SQLite per enrollment, by kind of "
                         "statement (benchmarks/sql_cost/sitecustomize.py)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of --durability, --flood, --workers-scaling, --registry, --pkcs11 and --mqtt "
                         "(default 2)")
    ap.add_argument("--flood-sessions", type=int, default=4, help="DTLS sessions of the flooding identity")
    ap.add_argument("--flood-window", type=int, default=16, help="nonce requests in flight per flooding session")
    ap.add_argument("--registry", metavar="URL|auto",
                    help="instead of the plain run: the registry engines side by side, SQLite and this PostgreSQL "
                         "(postgresql://USER@HOST:PORT/DB; auto: a throwaway cluster for the run), each at 1 and "
                         "2 workers, in --rounds rotated rounds of --devices enrollments per configuration "
                         "(benchmarks/bench_engines.py)")
    ap.add_argument("--pkcs11", action="store_true",
                    help="instead of the plain run: keys in a SoftHSM2 token against keys in files, in alternating "
                         "rounds: issuance from a CSR (CA key in the token), factory provisioning (device keys in "
                         "the token, devid provision --secure-element), enrollment server CPU with a token-backed "
                         "CA (benchmarks/bench_pkcs11.py)")
    ap.add_argument("--issue-count", type=int, metavar="N",
                    help="with --pkcs11: certificates issued per side and round (default 1000)")
    ap.add_argument("--provision-count", type=int, metavar="N",
                    help="with --pkcs11: identities provisioned per side and round (default 200)")
    ap.add_argument("--mqtt", action="store_true",
                    help="instead of the plain run: TLS connects per second with the devices' operational "
                         "certificates against a real Mosquitto (MQTT 5 CONNECT, CONNACK, DISCONNECT) side by side "
                         "with devid serve's DTLS handshakes per second, in alternating rounds, with each server's "
                         "CPU per handshake (benchmarks/bench_mqtt.py)")
    ap.add_argument("--seconds", type=float, metavar="S",
                    help="with --mqtt: measuring time per side and round (default 5)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--json", action="store_true",
                    help="no progress on stderr (the result is one JSON document on stdout either way)")
    return ap


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data is not None and not args.gateway:
        ap.error("--data names the data directory of the gateway under test: use it with --gateway (without "
                 "--gateway, bench makes its own CA and gateway in --workdir)")
    if args.gateway and (args.durability or args.flood or args.workers_scaling):
        ap.error("--durability, --flood and --workers-scaling start their own gateways: leave out --gateway")
    if sum((args.durability, args.flood, args.workers_scaling, bool(args.registry), args.pkcs11, args.mqtt)) > 1:
        ap.error("--durability, --flood, --workers-scaling, --registry, --pkcs11 and --mqtt are separate runs: "
                 "choose one")
    import bench_mqtt
    import bench_pkcs11
    bench_pkcs11.check(ap, args)
    bench_mqtt.check(ap, args)
    if args.devices is None:
        args.devices = bench_mqtt.DEFAULT_DEVICES if args.mqtt else 200
    if args.sql_cost and not args.workers_scaling:
        ap.error("--sql-cost is a figure of --workers-scaling: use them together")
    if args.workers_scaling and args.workers < 2:
        ap.error("--workers-scaling compares 1 worker with --workers N: N must be at least 2")
    for flag in ("devices", "concurrency", "clients", "workers", "rounds"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1")
    if args.client_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            ap.error("--client-loop uvloop: uvloop is not installed here (pip install uvloop)")
    if not 0 <= args.probe_devices <= 50:
        ap.error("--probe-devices must be between 0 and 50 (the probe counts the WAL's frames before SQLite "
                 "checkpoints it)")


def workdir(ap, given: Path | None) -> tuple[Path, bool]:
    """The benchmark's scratch directory (its own CA and the device bundles), and whether it is
    removed at the end: a temporary one is; one given with --workdir is kept."""
    if given is None:
        return Path(tempfile.mkdtemp(prefix="devid-bench-")), True
    if given.exists() and (not given.is_dir() or any(given.iterdir())):
        ap.error(f"--workdir {given}: must be an empty directory or not exist yet")
    given.mkdir(parents=True, exist_ok=True)
    return given, False


def emit(summary: dict, error: str | None) -> int:
    from devid.gateway.cli.output import emit
    emit({"ok": error is None, **({"error": error} if error else {}), **summary})
    if error:
        print(f"devid bench: error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


class Reporter:
    """Progress on stderr: each stage as it starts, and how many devices are done, counted in the
    registry (`issued`: operational certificates issued so far). Quiet: nothing, and no count."""

    def __init__(self, quiet: bool = True, issued=None) -> None:
        self.quiet = quiet
        self.issued = issued

    def stage(self, text: str) -> None:
        if not self.quiet:
            print(f"devid bench: {text}", file=sys.stderr, flush=True)

    def finished(self, progress, mode: str, done: int, total: int, errors: int, seconds: float) -> None:
        if progress is not None:
            if done >= total:
                progress(done, total)       # completes the bar on a terminal
            elif progress.tty:
                progress.stream.write("\n")
        self.stage(f"{mode}: {done}/{total} done in {seconds:.1f} s, {errors} error(s)")

    def progress(self, label: str):
        if self.quiet:
            return None
        from devid.gateway.cli.output import Progress
        return Progress(f"devid bench: {label}")


# replaced by bench_enroll.main(); run_clients and start_gateway report through it (also for
# bench_hardening.py)
REPORT = Reporter()
