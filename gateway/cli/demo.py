"""`devid demo`: the main job on the embedded default, end to end on one machine.

Create the CA on first use (and a demo attestation policy if there is none), provision a
handful of factory identities, start the gateway on loopback, enroll every device over
CoAP/DTLS exactly as the field engineer's script does (nonce, signed evidence, EST /sen,
configuration), renew one, revoke one and show that it is refused, then print the device table
and the attestation log and stop the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from datetime import datetime, timezone

from devid.ca.revocation import revoke_device

from devid.gateway.cli import output
from devid.gateway.cli.output import CommandFailed
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.app.datadir import DataDir
from devid.gateway.device.enroll import EnrollFailed, Firmware, renew
from devid.gateway.factory.provisioning import provision
from devid.gateway.app.server import POLICY_FILE, Gateway, GatewayConfig
from devid.gateway.device.simulator import simulate

DEVICE_TYPE = "temperature-sensor"
DEMO_IMAGE = b"devid demo firmware image, version 1.0.0\n"
DEMO_FIRMWARE = ("demo-sensor-fw", "1.0.0")

DEMO_POLICY = """\
# Written by `devid demo` because no policy existed. Format: docs/attestation.md.
version = 1

[device_types.{device_type}]
attestation = "required"
accept = "affirming"
revoke_on_contraindicated = true

[[device_types.{device_type}.firmware]]
name = "{name}"
version = "{version}"
digest = "sha-256:{digest}"
"""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Report:
    """What the demo did: printed as it goes, or (--json) gathered into one document."""

    def __init__(self, json_mode: bool) -> None:
        self.json = json_mode
        self.doc: dict = {}

    def say(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)


def run_demo(data: DataDir, count: int = 5, json_mode: bool = False) -> int:
    out = _Report(json_mode)
    out.doc["data"] = str(data.path)
    out.doc["created_ca"] = not data.exists()
    if not data.exists():
        out.say(f"== no CA in {data.path}: creating one")
        data.init(_now())
    data.require()
    digest = hashlib.sha256(DEMO_IMAGE).hexdigest()
    policy_path = data.path / POLICY_FILE
    out.doc["wrote_policy"] = None
    if not policy_path.exists():
        policy_path.write_text(DEMO_POLICY.format(device_type=DEVICE_TYPE, name=DEMO_FIRMWARE[0],
                                                  version=DEMO_FIRMWARE[1], digest=digest))
        out.doc["wrote_policy"] = str(policy_path)
        out.say(f"== wrote a demo attestation policy to {policy_path}")
    registry = data.open_registry()
    try:
        bundle_dir = data.path / "devices"
        result = provision(data.authority(registry), count=count, device_type=DEVICE_TYPE, out=bundle_dir,
                           manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                           serial_prefix="DEMO", now=_now)
        out.doc["provisioned"] = {"count": len(result.serials), "out": str(bundle_dir)}
        out.say(f"== provisioned {len(result.serials)} factory identities into {bundle_dir}")
        bundles = [bundle_dir / s for s in result.serials]
        for b in bundles:      # what the device's firmware would know about itself
            (b / "firmware.json").write_text(json.dumps({"name": DEMO_FIRMWARE[0], "version": DEMO_FIRMWARE[1],
                                                         "digest": f"sha-256:{digest}"}) + "\n")
        failed = asyncio.run(_run(data, bundles, out))
        _print_registry(registry, result.serials, out, data)
    finally:
        registry.close()
    if failed:
        raise CommandFailed(failed, out.doc)
    if out.json:
        output.emit({"ok": True, **out.doc})
    return 0


async def _run(data: DataDir, bundles, out: _Report) -> str | None:
    """The gateway's part of the demo; what went wrong, or None."""
    port = _free_port()
    gateway = Gateway(data, GatewayConfig(listen=[("127.0.0.1", port)]))
    await gateway.start()
    uri = f"coaps://127.0.0.1:{port}"
    out.doc["gateway"] = uri
    out.say(f"== gateway listening on {uri}; enrolling over CoAP/DTLS")
    try:
        report = await simulate(uri, bundles, lambda b: Firmware.from_options(b, None, None, None, None),
                                concurrency=4)
        out.doc["enrolled"] = []
        for r in sorted(report.results, key=lambda r: r.serial):
            serial = output.format_serial(r.certificate.serial_number)
            until = output.ts(r.certificate.not_valid_after_utc)
            out.doc["enrolled"].append({"serial": r.serial, "verdict": r.verdict, "certificate_serial": serial,
                                        "not_after": until, "ms": round(r.seconds * 1000, 1)})
            out.say(f"   {r.serial}: verdict {r.verdict}, operational certificate {serial} until {until}, "
                    f"{r.seconds * 1000:.0f} ms")
        out.doc["failures"] = dict(sorted(report.failures.items()))
        for serial, reason in sorted(report.failures.items()):
            out.say(f"   {serial}: FAILED {reason}")
        if report.failures:
            out.say(f"== {len(report.failures)} device(s) failed; check {data.path / POLICY_FILE}")
            return f"{len(report.failures)} device(s) failed to enroll; check {data.path / POLICY_FILE}"
        first, last = bundles[0], bundles[-1]
        cert = await renew(first, uri)
        out.doc["renewed"] = {"serial": first.name, "certificate_serial": output.format_serial(cert.serial_number)}
        out.say(f"== renewed {first.name} through EST /sren: certificate {output.format_serial(cert.serial_number)}")
        revoked = revoke_device(gateway.registry, last.name, "keyCompromise", _now())
        out.doc["revoked"] = {"serial": last.name, "certificates": len(revoked)}
        out.say(f"== revoked {last.name} ({len(revoked)} certificates); it tries to renew:")
        try:
            await renew(last, uri, timeout=5)
            out.say("   UNEXPECTED: the revoked device renewed")
            return f"the revoked device {last.name} renewed"
        except EnrollFailed as exc:
            out.doc["revoked"]["refused"] = {"step": exc.step, "reason": exc.reason}
            out.say(f"   refused at {exc.step}: {exc.reason}")
        return None
    finally:
        await gateway.stop()
        out.say("== gateway stopped")


def _print_registry(registry, serials, out: _Report, data: DataDir) -> None:
    devices = [registry.get_device(s) for s in serials]
    store = AttestationStore(registry)
    entries = [e for e in store.log_entries() if e.device_serial in set(serials)]
    counts = registry.count_devices()
    out.doc["devices"] = [{"serial": d.serial, "device_type": d.device_type, "state": d.state.value}
                          for d in devices]
    out.doc["attestation_log_entries"] = len(entries)
    out.doc["registry"] = dict(sorted(counts.items()))
    if out.json:
        return
    print("== devices")
    output.table(["serial", "type", "state", "enrolled", "revoked"],
                 [(d.serial, d.device_type, d.state.value, output.ts(d.enrolled_at), output.ts(d.revoked_at))
                  for d in devices])
    print("== attestation log (this run)")
    output.table(["seq", "time", "device", "verdict", "accepted", "firmware", "reasons"],
                 [(e.seq, e.time, e.device_serial, e.tier.value, "yes" if e.acceptable else "no",
                   f"{e.claims.get('swname')} {e.claims.get('swversion')}" if e.claims else "-",
                   ", ".join(e.codes) or "-") for e in entries])
    print("registry totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    where = "" if str(data.path) == "devid-data" else f" --data {data.path}"
    print("next steps (docs/gateway.md, docs/enrollment.md):")
    for command in ("devices list", "attest log", "serve"):
        print(f"  .venv/bin/devid {command}{where}")
