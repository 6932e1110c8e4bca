"""`devid agent`: the certificate lifecycle on autopilot for one enrolled device bundle
(gateway/device/agent.py; docs/enrollment.md#devid-agent), imported when the command runs so the
other commands start without aiocoap."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.errors import CLIError


def _duration(text: str):
    from devid.gateway.device.agent import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value < 10 ** 9:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def cmd_agent(args) -> int:
    import asyncio
    from devid.gateway.device.agent import AgentError, AgentSettings, run
    from devid.gateway.device.protocol import EnrollFailed
    from devid.gateway.system.logs import configure_logging

    directory = Path(args.device)
    if not directory.is_dir():
        raise CLIError(f"--device: {directory} is not a directory (a bundle from 'devid provision', enrolled)")
    if args.log is not None or not args.once:
        configure_logging(log_file=args.log)      # the decisions: JSON lines on stderr, or in --log
    settings = AgentSettings(args.gateway, directory, args.renew_before, args.timeout, args.retry_initial,
                             args.retry_max, args.max_sleep, args.once, args.attest)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run(settings, stop)

    try:
        outcome = asyncio.run(main())
    except AgentError as exc:
        raise output.CommandFailed(str(exc), {"step": "bundle"}) from None
    except EnrollFailed as exc:
        raise output.CommandFailed(f"renewal failed at step {exc.step}: {exc.reason} (the current identity is kept)",
                                   {"step": exc.step, "reason": exc.reason, "renewed": False}) from None
    cert = outcome.certificate
    serial = output.format_serial(cert.serial_number)
    threshold_days = round(outcome.threshold.total_seconds() / 86400, 3)
    if args.json:
        output.emit({"ok": True, "renewed": outcome.renewed, "certificate_serial": serial,
                     "not_after": output.ts(cert.not_valid_after_utc), "threshold_days": threshold_days,
                     "threshold_source": outcome.threshold_source, "path": outcome.path})
    elif args.once:
        what = f"renewed through the {outcome.path} path" if outcome.renewed else "not due"
        print(f"OK: {what}; operational certificate {serial} until {output.ts(cert.not_valid_after_utc)} "
              f"(renewal threshold {threshold_days:g} days, from the {outcome.threshold_source})")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("agent", help="keep a device's operational certificate renewed: renew (EST /sren, or with "
                                     "--attest the attested enrollment) when it enters its renewal threshold, "
                                     "retrying while the gateway is away",
                       epilog="exit status: 0 stopped by SIGTERM/SIGINT, or with --once renewed or not due; 1 failed "
                              "(with --once: the renewal failed, the current identity is kept); 2 bad command line. "
                              "Decisions are logged as JSON lines (docs/enrollment.md#devid-agent)")
    s.add_argument("--gateway", required=True, metavar="coaps://HOST[:PORT]", help="the gateway to renew at")
    s.add_argument("--device", required=True, metavar="DIR", help="the device's bundle, enrolled")
    s.add_argument("--renew-before", type=_duration, metavar="DURATION",
                   help="renew when less than this is left: 30d, 12h, 90m, 3600s (default: the configuration's "
                        "renewal.window_days, else 30d)")
    s.add_argument("--once", action="store_true", help="check, renew at most once, and exit")
    s.add_argument("--attest", action="store_true",
                   help="renew through the attested enrollment (factory identity, fresh evidence of the bundle's "
                        "firmware.json, EST /sen) instead of EST /sren, so each renewal proves the device's state "
                        "again (the policy must allow re-enrollment)")
    s.add_argument("--timeout", type=_seconds, default=30.0, metavar="S", help="per step of a renewal (default 30)")
    s.add_argument("--retry-initial", type=_seconds, default=10.0, metavar="S",
                   help="the first retry's backoff ceiling; it doubles with each failure (default 10)")
    s.add_argument("--retry-max", type=_seconds, metavar="S",
                   help="the backoff ceiling's cap (default: the configuration's renewal.retry_seconds, else 3600)")
    s.add_argument("--max-sleep", type=_seconds, default=3600.0, metavar="S",
                   help="the longest sleep between two checks, so a changed clock is noticed (default 3600)")
    s.add_argument("--log", metavar="FILE", help="append the JSON log lines to FILE (default: stderr; with --once: "
                                                 "none)")
    s.add_argument("--json", action="store_true", help="one JSON document at the end (docs/cli.md)")
    s.set_defaults(func=cmd_agent)
