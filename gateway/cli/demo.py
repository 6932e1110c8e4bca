"""`devid demo`: the main job on the embedded default, end to end on one machine.

Create the CA on first use (and a demo attestation policy if there is none), provision a
handful of factory identities, start the gateway on loopback, enroll every device over
CoAP/DTLS exactly as the field engineer's script does (nonce, signed evidence, EST /sen,
configuration), let each publish over MQTT to a real Mosquitto broker with its operational
identity (demo_mqtt.py; skipped, with the reason, without Mosquitto), renew one, revoke one and
show that it is refused at the gateway and at the broker, then print the device table and the
attestation log and stop the gateway and the broker.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from datetime import datetime, timezone

from devid.ca.revocation import revoke_device

from devid.gateway.cli import output
from devid.gateway.cli.output import CommandFailed
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.app.datadir import DataDir
from devid.gateway.device.enroll import EnrollFailed, Firmware, renew
from devid.gateway.device.mqtt import MQTTFailed
from devid.gateway.factory.provisioning import provision
from devid.gateway.app.server import POLICY_FILE, Gateway, GatewayConfig
from devid.gateway.device.simulator import simulate
from devid.gateway.cli.demo_mqtt import DemoBroker
from devid.gateway.errors import ConfigError

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


def run_demo(data: DataDir, count: int = 5, json_mode: bool = False, mqtt: bool = True) -> int:
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
    broker = None
    skipped = "--no-mqtt given" if not mqtt else DemoBroker.missing()
    if skipped is None:
        broker = DemoBroker(data)
        try:
            template = broker.write_template(DEVICE_TYPE)
            if template is not None:
                out.say(f"== wrote a configuration template naming an MQTT broker to {template}")
        except ConfigError as exc:          # the user's own template names no broker
            broker, skipped = None, str(exc)
    if skipped is not None:
        out.doc["mqtt"] = {"skipped": skipped}
        out.say(f"== MQTT skipped: {skipped}")
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
        failed = asyncio.run(_run(data, bundles, out, broker))
        _print_registry(registry, result.serials, out, data)
    finally:
        registry.close()
    if failed:
        raise CommandFailed(failed, out.doc)
    if out.json:
        output.emit({"ok": True, **out.doc})
    return 0


async def _run(data: DataDir, bundles, out: _Report, broker: DemoBroker | None) -> str | None:
    """The gateway's part of the demo (and the broker's); what went wrong, or None."""
    port = _free_port()
    config = GatewayConfig(listen=[("127.0.0.1", port)])
    if broker is not None:
        await asyncio.to_thread(broker.start)
        out.doc["mqtt"] = {"broker": broker.url}
        out.say(f"== MQTT broker (Mosquitto) listening on {broker.url}, from devid mqtt broker-config")
        # the gateway keeps the broker's CRL and ACL current (devid serve --mqtt-broker), looking often
        config.mqtt_broker, config.mqtt_broker_pid = broker.directory, broker.pid
        config.mqtt_broker_check_interval, config.mqtt_broker_batch = 0.2, 0.0
    gateway = None
    try:
        gateway = Gateway(data, config)
        await gateway.start()
        return await _life(gateway, f"coaps://127.0.0.1:{port}", bundles, out, broker)
    finally:
        if gateway is not None:
            await gateway.stop()
            out.say("== gateway stopped")
        if broker is not None:
            await asyncio.to_thread(broker.stop)
            out.say("== MQTT broker stopped")


async def _life(gateway: Gateway, uri: str, bundles, out: _Report, broker: DemoBroker | None) -> str | None:
    data = gateway.data
    out.doc["gateway"] = uri
    out.say(f"== gateway listening on {uri}; enrolling over CoAP/DTLS")
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
    if broker is not None:
        failed = await _publish(broker, bundles, out)
        if failed:
            return failed
    cert = await renew(first, uri)
    out.doc["renewed"] = {"serial": first.name, "certificate_serial": output.format_serial(cert.serial_number)}
    out.say(f"== renewed {first.name} through EST /sren: certificate {output.format_serial(cert.serial_number)}")
    refreshes = gateway.broker_keeper.refreshes if broker is not None else 0
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
    if broker is None:
        return None
    out.say("   and connects to the MQTT broker once the gateway has republished its CRL:")
    deadline = time.monotonic() + 30
    while gateway.broker_keeper.refreshes <= refreshes and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    refusal = await asyncio.to_thread(broker.refusal, last, deadline)
    if refusal is None:
        out.say("   UNEXPECTED: the broker admitted the revoked device")
        return f"the broker admitted the revoked device {last.name}"
    out.doc["revoked"]["broker_refused"] = refusal
    out.say(f"   refused by the broker: {refusal}")
    # the control: the broker is up and still admits a good device (the renewed one, new certificate)
    topic = await asyncio.to_thread(broker.publish, first, time.monotonic() + 15)
    out.doc["revoked"]["control"] = {"serial": first.name, "topic": topic}
    out.say(f"   while {first.name}, renewed, still publishes to {topic}")
    return None


async def _publish(broker: DemoBroker, bundles, out: _Report) -> str | None:
    """Each enrolled device publishes once over MQTT (the first also reads its own message back),
    once the gateway has put them in the broker's ACL."""
    serials = [b.name for b in bundles]
    deadline = time.monotonic() + 30
    while not broker.in_acl(serials):
        if time.monotonic() > deadline:
            return "the gateway did not put the enrolled devices in the broker's ACL within 30 s"
        await asyncio.sleep(0.05)
    out.say(f"== each device publishes over MQTT (TLS, its operational certificate) to {broker.url}")
    published = []
    for n, bundle in enumerate(bundles):
        try:
            topic = await asyncio.to_thread(broker.publish, bundle, time.monotonic() + 15, n == 0)
        except MQTTFailed as exc:
            out.say(f"   {bundle.name}: FAILED {exc}")
            return f"{bundle.name} could not publish over MQTT: {exc}"
        published.append({"serial": bundle.name, "topic": topic})
        out.say(f"   {bundle.name}: published to {topic}" + (" and received it back" if n == 0 else ""))
    out.doc["mqtt"]["published"] = published
    return None


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
