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
from devid.gateway.store.attestation_store import SQLiteAttestationStore
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


def run_demo(data: DataDir, count: int = 5) -> int:
    if not data.exists():
        print(f"== no CA in {data.path}: creating one")
        data.init(_now())
    data.require()
    digest = hashlib.sha256(DEMO_IMAGE).hexdigest()
    policy_path = data.path / POLICY_FILE
    if not policy_path.exists():
        policy_path.write_text(DEMO_POLICY.format(device_type=DEVICE_TYPE, name=DEMO_FIRMWARE[0],
                                                  version=DEMO_FIRMWARE[1], digest=digest))
        print(f"== wrote a demo attestation policy to {policy_path}")
    registry = data.open_registry()
    try:
        out = data.path / "devices"
        result = provision(data.authority(registry), count=count, device_type=DEVICE_TYPE, out=out,
                           manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                           serial_prefix="DEMO", now=_now)
        print(f"== provisioned {len(result.serials)} factory identities into {out}")
        bundles = [out / s for s in result.serials]
        for b in bundles:      # what the device's firmware would know about itself
            (b / "firmware.json").write_text(json.dumps({"name": DEMO_FIRMWARE[0], "version": DEMO_FIRMWARE[1],
                                                         "digest": f"sha-256:{digest}"}) + "\n")
        code = asyncio.run(_run(data, bundles))
        _print_registry(registry, result.serials)
        return code
    finally:
        registry.close()


async def _run(data: DataDir, bundles) -> int:
    port = _free_port()
    gateway = Gateway(data, GatewayConfig(listen=[("127.0.0.1", port)]))
    await gateway.start()
    uri = f"coaps://127.0.0.1:{port}"
    print(f"== gateway listening on {uri}; enrolling over CoAP/DTLS")
    try:
        report = await simulate(uri, bundles, lambda b: Firmware.from_options(b, None, None, None, None),
                                concurrency=4)
        for r in sorted(report.results, key=lambda r: r.serial):
            print(f"   {r.serial}: verdict {r.verdict}, operational certificate {r.certificate.serial_number:x} "
                  f"until {output.ts(r.certificate.not_valid_after_utc)}, {r.seconds * 1000:.0f} ms")
        for serial, reason in sorted(report.failures.items()):
            print(f"   {serial}: FAILED {reason}")
        if report.failures:
            print(f"== {len(report.failures)} device(s) failed; check {data.path / POLICY_FILE}")
            return 1
        first, last = bundles[0], bundles[-1]
        cert = await renew(first, uri)
        print(f"== renewed {first.name} through EST /sren: certificate {cert.serial_number:x}")
        revoked = revoke_device(gateway.registry, last.name, "keyCompromise", _now())
        print(f"== revoked {last.name} ({len(revoked)} certificates); it tries to renew:")
        try:
            await renew(last, uri, timeout=5)
            print("   UNEXPECTED: the revoked device renewed")
            return 1
        except EnrollFailed as exc:
            print(f"   refused at {exc.step}: {exc.reason}")
        return 0
    finally:
        await gateway.stop()
        print("== gateway stopped")


def _print_registry(registry, serials) -> None:
    print("== devices")
    devices = [registry.get_device(s) for s in serials]
    output.table(["serial", "type", "state", "enrolled", "revoked"],
                 [(d.serial, d.device_type, d.state.value, output.ts(d.enrolled_at), output.ts(d.revoked_at))
                  for d in devices])
    print("== attestation log (this run)")
    store = SQLiteAttestationStore(registry)
    entries = [e for e in store.log_entries() if e.device_serial in set(serials)]
    output.table(["seq", "time", "device", "verdict", "accepted", "firmware", "reasons"],
                 [(e.seq, e.time, e.device_serial, e.tier.value, "yes" if e.acceptable else "no",
                   f"{e.claims.get('swname')} {e.claims.get('swversion')}" if e.claims else "-",
                   ", ".join(e.codes) or "-") for e in entries])
    counts = registry.count_devices()
    print("registry totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    where = "" if str(registry.path.parent) == "devid-data" else f" --data {registry.path.parent}"
    print("next steps (docs/gateway.md, docs/enrollment.md):")
    for command in ("devices list", "attest log", "serve"):
        print(f"  .venv/bin/devid {command}{where}")
