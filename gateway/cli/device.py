"""`devid enroll`, `devid renew`, `devid fetch-config` and `devid simulate`: the device side, through
the device client (gateway/device/), imported when a command runs so the other commands start
without aiocoap."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from devid.gateway.cli import output
from devid.gateway.device.protocol import DEFAULT_FLOW, DEFAULT_RENEW_FLOW, FLOWS
from devid.gateway.errors import CLIError

# `devid enroll`: enrolled (the operational identity is stored) but the configuration was not fetched
EXIT_CONFIG_NOT_FETCHED = 3
NO_FIRMWARE = "enrolling without attestation evidence (only for device types whose policy waives it)"


def _warn(args, text: str) -> None:
    """A warning: with the output on stdout, or on stderr when stdout carries --json."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def _firmware(args, directory):
    from devid.gateway.device.enroll import Firmware
    return Firmware.from_options(Path(directory), Path(args.firmware) if args.firmware else None,
                                 args.firmware_digest, args.firmware_name, args.firmware_version)


def _config_not_fetched(args, exc, done: str, what: str, files: str = "") -> output.CommandFailed:
    """Exit 3: the device is `done` (enrolled, renewed) and its new identity stored, but `what`."""
    serial = output.format_serial(exc.certificate.serial_number)
    return output.CommandFailed(
        f"{done}, but {what} ({exc.reason}): operational certificate {serial} is stored in {exc.directory}{files}; "
        f"get the configuration with: devid fetch-config --gateway {shlex.quote(args.gateway)} "
        f"--device {shlex.quote(str(exc.directory))}",
        {"flow": args.flow, "step": exc.step, "reason": exc.reason, done: True, "certificate_serial": serial,
         "directory": str(exc.directory)}, code=EXIT_CONFIG_NOT_FETCHED)


def cmd_enroll(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import ConfigNotFetched, EnrollFailed, enroll
    steps = ["nonce", "evidence", "enroll", "config"]

    def report(step, text):
        if not args.json:
            print(f"[{steps.index(step) + 1}/{len(steps)}] {step:<9} {text}", flush=True)
    try:
        firmware = _firmware(args, args.device)
        if firmware is None:
            _warn(args, f"no firmware given: {NO_FIRMWARE}")
        result = asyncio.run(enroll(Path(args.device), args.gateway, firmware, flow=args.flow, timeout=args.timeout,
                                    report=report))
    except ConfigNotFetched as exc:
        raise _config_not_fetched(args, exc, "enrolled", "the configuration could not be fetched",
                                  " (op-key.pem, op-cert.pem, op-chain.pem)") from None
    except EnrollFailed as exc:
        raise output.CommandFailed(f"enrollment failed at step {exc.step}: {exc.reason}",
                                   {"flow": args.flow, "step": exc.step, "reason": exc.reason}) from None
    serial = output.format_serial(result.certificate.serial_number)
    if args.json:
        output.emit({"ok": True, "flow": result.flow, "serial": result.serial, "certificate_serial": serial,
                     "not_after": output.ts(result.certificate.not_valid_after_utc), "verdict": result.verdict,
                     "nonce": result.nonce,
                     "seconds": round(result.seconds, 3),
                     "steps_ms": {k: round(v * 1000, 1) for k, v in result.steps.items()}})
    else:
        print(f"OK: device {result.serial} holds operational certificate {serial} "
              f"(op-key.pem, op-cert.pem, op-chain.pem, config.cbor, config.json in {args.device}) "
              f"in {result.seconds:.2f} s")
    return 0


def _device_serial(cert) -> str | None:
    from cryptography.x509.oid import NameOID
    values = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    return values[0] if len(values) == 1 else None


def cmd_renew(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import ConfigNotFetched, EnrollFailed, renew

    def report(step, text):
        if not args.json:
            print(f"{step}: {text}", flush=True)
    try:
        cert = asyncio.run(renew(Path(args.device), args.gateway, flow=args.flow, timeout=args.timeout,
                                 report=report))
    except ConfigNotFetched as exc:
        raise _config_not_fetched(args, exc, "renewed", "the configuration in the answer could not be read") from None
    except EnrollFailed as exc:
        raise output.CommandFailed(f"renewal failed at step {exc.step}: {exc.reason}",
                                   {"flow": args.flow, "step": exc.step, "reason": exc.reason}) from None
    if args.json:
        output.emit({"ok": True, "flow": args.flow, "serial": _device_serial(cert), "certificate_serial":
                     output.format_serial(cert.serial_number), "not_after": output.ts(cert.not_valid_after_utc)})
        return 0
    print(f"OK: renewed; operational certificate {output.format_serial(cert.serial_number)} until "
          f"{output.ts(cert.not_valid_after_utc)}")
    return 0


def cmd_fetch_config(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import EnrollFailed, fetch_config
    where = Path(args.device) / "config.cbor"
    try:
        before = where.read_bytes()
    except OSError:
        before = None
    try:
        config = asyncio.run(fetch_config(Path(args.device), args.gateway, timeout=args.timeout))
    except EnrollFailed as exc:
        raise output.CommandFailed(f"fetching the configuration failed at step {exc.step}: {exc.reason}",
                                   {"step": exc.step, "reason": exc.reason}) from None
    unchanged = before is not None and where.read_bytes() == before
    if args.json:
        output.emit({"ok": True, "device_type": config.get("device_type"), "config": str(where),
                     "trust_anchors": len(config.get("trust_anchors", [])), "unchanged": unchanged})
        return 0
    print(f"OK: configuration for {config.get('device_type')} ({len(config.get('trust_anchors', []))} trust anchors) "
          f"in {where} and config.json" + (" (unchanged)" if unchanged else ""))
    return 0


def cmd_simulate(args) -> int:
    import asyncio
    from devid.gateway.device.enroll import EnrollFailed
    from devid.gateway.device.simulator import simulate
    root = Path(args.devices)
    bundles = sorted(p for p in root.iterdir() if (p / "cert.pem").exists()) if root.is_dir() else []
    if not bundles:
        raise CLIError(f"no device bundles in {root} (make some with 'devid provision')")
    if args.limit:
        bundles = bundles[:args.limit]
    if args.psk:
        from devid.gateway.device.psk import IDENTITY_FILE, PskUnavailable, require_dtlssocket
        try:
            require_dtlssocket()
        except PskUnavailable as exc:
            raise CLIError(str(exc)) from None
        if args.flow is not None and args.flow != "classic":
            raise CLIError("--psk runs the classic flow (tinydtls exports no session nonce): leave out --flow")
        missing = [b.name for b in bundles if not (b / IDENTITY_FILE).exists()]
        if missing:
            raise CLIError(f"--psk: {len(missing)} bundle(s) have no {IDENTITY_FILE} (e.g. {missing[0]}): "
                           f"provision them with 'devid provision --psk'")
    try:
        firmware = {b: _firmware(args, b) for b in bundles}
    except EnrollFailed as exc:
        raise output.CommandFailed(f"{exc.step}: {exc.reason}", {"step": exc.step, "reason": exc.reason}) from None
    without = sum(1 for fw in firmware.values() if fw is None)
    if without and (not args.renew or args.psk):       # a PSK device renews with evidence too
        which = "" if without == len(bundles) else f" for {without} of {len(bundles)} devices"
        _warn(args, f"no firmware given{which} (no --firmware or --firmware-digest, no firmware.json in the bundle): "
                    f"{NO_FIRMWARE}")
    progress = output.Progress("simulating") if not args.json else None
    report = asyncio.run(simulate(args.gateway, bundles, firmware.get, concurrency=args.concurrency,
                                  timeout=args.timeout, renew_only=args.renew, flow=args.flow, progress=progress,
                                  psk=args.psk))
    summary = report.summary()
    doc = dict(summary, failures=report.failures)
    failed = (f"{len(report.failures)} of {report.devices} devices failed to "
              f"{'renew' if args.renew else 'enroll'}") if report.failures else None
    if args.mqtt:           # each device that enrolled (or renewed) publishes once with its new identity
        from devid.gateway.device.mqtt import publish_each
        done = [b for b in bundles if b.name not in report.failures]
        published, mqtt_failures = publish_each(done, concurrency=args.concurrency, timeout=args.timeout)
        doc["mqtt"] = {"published": published, "failures": mqtt_failures}
        if mqtt_failures and not failed:
            failed = f"{len(mqtt_failures)} of {len(done)} devices failed to publish over MQTT"
    if not args.json:
        lat = summary["latency_ms"]
        latency = (f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, p99 {lat['p99']} ms" if report.enrolled
                   else "no device succeeded, so no latency figures")
        print(f"{report.enrolled}/{report.devices} devices {'renewed' if args.renew else 'enrolled'} in "
              f"{report.seconds:.2f} s ({summary['enrollments_per_s']}/s); {latency}; {len(report.failures)} failed")
        for serial, reason in list(report.failures.items())[:10]:
            print(f"  {serial}: {reason}")
        if args.mqtt:
            print(f"{doc['mqtt']['published']} device(s) published once over MQTT; "
                  f"{len(doc['mqtt']['failures'])} failed")
            for serial, reason in list(doc["mqtt"]["failures"].items())[:10]:
                print(f"  {serial}: {reason}")
    if failed:
        raise output.CommandFailed(failed, doc)
    if args.json:
        output.emit({"ok": True, **doc})
    return 0


FLOW_HELP = {
    "enroll": "one-request (the default): evidence bound to this DTLS session and the new key, inside the CSR; one "
              "POST /sen answers certificate, configuration and verdict. classic: nonce, evidence, /sen and /config, "
              "one request each (what libcoap-based devices do)",
    "renew": "classic (the default): /sren answers the certificate alone; one-request: the certificate and the "
             "configuration (stored as config.cbor, config.json) in the same answer",
}


def _flow_flag(s, help_text: str, default: str | None = DEFAULT_FLOW) -> None:
    s.add_argument("--flow", choices=FLOWS, default=default, help=help_text)


def _device_flags(s, firmware=True):
    """The flags every device command takes: its gateway, the per-step timeout, and the firmware it runs."""
    s.add_argument("--gateway", required=True, metavar="coaps://HOST[:PORT]", help="the gateway to talk to")
    s.add_argument("--timeout", type=float, default=30.0, metavar="S", help="per step (default 30)")
    if firmware:
        firmware_flags(s)


def firmware_flags(s) -> None:
    """The firmware a device runs, as its evidence states it (devid enroll, devid se evidence/csr)."""
    g = s.add_mutually_exclusive_group()
    g.add_argument("--firmware", metavar="FILE", help="the running firmware image (hashed with SHA-256)")
    g.add_argument("--firmware-digest", metavar="HEX", help="its digest, hex (sha-256/384/512 by length)")
    s.add_argument("--firmware-name", metavar="NAME", help="firmware name for the evidence (swname)")
    s.add_argument("--firmware-version", metavar="V", help="firmware version for the evidence (swversion)")


# the device commands take no --data: a device knows its bundle and its gateway, not the CA
# (dispatch refuses a --data given before them)
DEVICE_COMMANDS = ("enroll", "renew", "fetch-config", "simulate", "agent", "se")
# device commands inside a group whose other commands use the data directory
DEVICE_SUBCOMMANDS = (("mqtt", "publish"), ("mqtt", "subscribe"))


def is_device_path(path: tuple[str, ...]) -> bool:
    """Does the command at `path` (e.g. ("mqtt", "publish")) run on a device, with no data directory?"""
    return path[:1] and path[0] in DEVICE_COMMANDS or tuple(path[:2]) in DEVICE_SUBCOMMANDS


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("enroll", help="enroll a device: attest, get an operational identity "
                                      "and its configuration (field engineer's script)",
                       epilog=f"exit status: 0 enrolled; 1 failed; 2 bad command line; {EXIT_CONFIG_NOT_FETCHED} "
                              "enrolled (certificate stored) but the configuration was not fetched: "
                              "run 'devid fetch-config'")
    _device_flags(s)
    s.add_argument("--device", required=True, metavar="DIR", help="the device's bundle from 'devid provision'")
    _flow_flag(s, FLOW_HELP["enroll"])
    s.add_argument("--json", action="store_true", help="one JSON document instead of the steps (docs/cli.md)")
    s.set_defaults(func=cmd_enroll)

    s = sub.add_parser("renew", help="renew a device's operational certificate (EST /sren)",
                       epilog=f"exit status: 0 renewed; 1 failed; 2 bad command line; {EXIT_CONFIG_NOT_FETCHED} "
                              "(--flow one-request) renewed (certificate stored) but the configuration in the "
                              "answer could not be read: run 'devid fetch-config'")
    _device_flags(s, firmware=False)
    s.add_argument("--device", required=True, metavar="DIR")
    _flow_flag(s, FLOW_HELP["renew"], DEFAULT_RENEW_FLOW)
    s.add_argument("--json", action="store_true", help="one JSON document instead of the steps")
    s.set_defaults(func=cmd_renew)

    s = sub.add_parser("fetch-config", help="fetch an enrolled device's configuration again (GET /config with "
                                            "its operational identity)")
    _device_flags(s, firmware=False)
    s.add_argument("--device", required=True, metavar="DIR", help="the device's bundle, enrolled")
    s.add_argument("--json", action="store_true", help="one JSON document instead of the summary line")
    s.set_defaults(func=cmd_fetch_config)

    s = sub.add_parser("simulate", help="run many simulated devices through enrollment")
    _device_flags(s)
    s.add_argument("--devices", required=True, metavar="DIR", help="directory of bundles from 'devid provision'")
    s.add_argument("--concurrency", type=int, default=16, metavar="C", help="devices in flight (default 16)")
    s.add_argument("--limit", type=int, metavar="N", help="only the first N devices")
    s.add_argument("--renew", action="store_true", help="renew enrolled devices instead of enrolling")
    s.add_argument("--psk", action="store_true",
                   help="run them as PSK devices on tinydtls (DTLSSocket: pip install 'devid-gateway[psk]'), each "
                        "with the factory PSK of its bundle ('devid provision --psk'), then its operational PSK "
                        "(docs/enrollment.md#psk-devices)")
    s.add_argument("--mqtt", action="store_true", help="then each device that succeeded publishes one message to "
                                                      "PREFIX/hello on the MQTT broker its configuration names "
                                                      "(docs/mqtt.md)")
    _flow_flag(s, "the flow each device runs, as 'devid enroll --flow' (default one-request), or with --renew "
                  "as 'devid renew --flow' (default classic)", None)
    s.add_argument("--json", action="store_true", help="one JSON document: the summary and the failures")
    s.set_defaults(func=cmd_simulate)
