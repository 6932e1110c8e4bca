"""Service access over MQTT against a real Mosquitto (tests/mosquitto_helpers.py): the files
`devid mqtt broker-config` writes, devices enrolled by a real gateway publishing and receiving
with their operational identities, and every identity that must be refused, refused."""

from __future__ import annotations

import json
import os
import ssl
import subprocess

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devid.gateway.device.mqtt import Connection, MQTTFailed, Service, service
from devid.gateway.store.configuration import DEFAULT_TEMPLATE

from .conftest import ok, one_line_error, run_devid, tool
from .mosquitto_helpers import Mosquitto
from .serve_helpers import bench_common, serve

FW = bench_common.bench_firmware()
FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]


class World:
    def __init__(self, data: Path, broker: Mosquitto, factory: Path, tmp: Path) -> None:
        self.data, self.broker, self.factory, self.tmp = data, broker, factory, tmp

    def device(self, n: int) -> Path:
        return self.factory / f"MQ{n:08d}"

    def broker_config(self, *extra) -> dict:
        return json.loads(ok(run_devid("mqtt", "broker-config", "--out", self.broker.directory, "--hostname",
                                       "localhost", "--port", self.broker.port, "--listen", "127.0.0.1",
                                       "--owner", "mosquitto", "--json", *extra, data_dir=self.data)))

    def reload(self) -> None:
        """broker-config again, and SIGHUP; back when the broker has reloaded (its log says so)."""
        before = self.broker.reloads()
        self.broker_config("--reload-pid", self.broker.pid)
        wait_for(lambda: self.broker.reloads() > before, "the broker to reload")


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A CA whose default template names the broker, three devices of which two enrolled through
    a real gateway, and a Mosquitto broker on the files broker-config wrote."""
    tmp = tmp_path_factory.mktemp("mqtt")
    data = tmp / "data"
    ok(run_devid("init", data_dir=data))
    (data / "attestation-policy.toml").write_text(bench_common.bench_policy())
    broker = Mosquitto()
    (data / "config").mkdir()
    (data / "config" / "default.toml").write_text(
        DEFAULT_TEMPLATE + f'\n[mqtt]\nbroker = "mqtts://localhost:{broker.port}"\ntopics = ["devices/{{serial}}/#"]\n')
    ok(run_devid("provision", "--count", 3, "--device-type", bench_common.DEVICE_TYPE, "--out", tmp / "factory",
                 "--serial-prefix", "MQ", "--workers", 1, data_dir=data))
    served = serve(data, tmp / "gateway.log")
    try:
        for n in (1, 2):
            ok(run_devid("enroll", "--gateway", served.uri, "--device", tmp / "factory" / f"MQ{n:08d}", *FIRMWARE))
    finally:
        assert served.stop() == 0
    w = World(data, broker, tmp / "factory", tmp)
    w.first_config = w.broker_config()
    broker.start()
    try:
        yield w
    finally:
        broker.stop()


def refused(svc: Service) -> str:
    with pytest.raises(MQTTFailed) as info:
        with Connection(svc, timeout=10):
            pass
    return str(info.value)


def test_broker_config_writes_the_broker_files(world):
    doc = world.first_config
    d = world.broker.directory
    assert doc["acl_devices"] == 2 and doc["broker_certificate_reissued"] is True and doc["port"] == world.broker.port
    conf = (d / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "tls_version tlsv1.2",
                 "allow_anonymous false", "set_tcp_nodelay true", f"listener {world.broker.port} 127.0.0.1",
                 f"crlfile {d / 'crl.pem'}", f"acl_file {d / 'acl'}", f"cafile {d / 'ca.pem'}"):
        assert line in conf.splitlines(), line
    import grp
    key = (d / "broker.key.pem").stat()
    assert key.st_mode & 0o777 == 0o640 and key.st_uid == 0 and grp.getgrgid(key.st_gid).gr_name == "mosquitto"
    assert d.stat().st_uid == 0 and d.stat().st_mode & 0o777 == 0o750       # the broker's account owns nothing
    assert "use_username_as_clientid true" in (d / "mosquitto.conf").read_text().splitlines()
    acl = (d / "acl").read_text()
    assert "user device-MQ00000001\ntopic readwrite devices/MQ00000001/#\n" in acl
    assert "MQ00000003" not in acl                      # provisioned, not enrolled: no service access
    anchor = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    operational = x509.load_pem_x509_certificate((world.data / "ca" / "operational.cert.pem").read_bytes())
    assert anchor.subject == anchor.issuer == operational.subject and anchor.public_key() == operational.public_key()
    broker_cert = x509.load_pem_x509_certificates((d / "broker.cert.pem").read_bytes())
    assert broker_cert[0].issuer == operational.subject and broker_cert[1] == operational
    san = broker_cert[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"] and not san.get_values_for_type(x509.IPAddress)


def test_the_enrolled_configuration_names_the_broker(world):
    config = json.loads((world.device(1) / "config.json").read_text())
    mqtt = config["mqtt"]
    assert mqtt["broker"] == f"mqtts://localhost:{world.broker.port}" and mqtt["client_id"] == "device-MQ00000001"
    assert mqtt["topic_prefix"] == "devices/MQ00000001" and mqtt["topics"] == ["devices/MQ00000001/#"]
    root = x509.load_pem_x509_certificate((world.data / "ca" / "root.cert.pem").read_bytes())
    assert x509.load_pem_x509_certificate(mqtt["trust_anchor"].encode()) == root


def test_broker_config_refuses_a_device_tree_inside_another(world, tmp_path):
    """A type whose filter's literal level equals a device's serial (devices/MQ00000002/{serial}/#
    puts every device of that type under MQ00000002's tree): broker-config refuses, naming both
    (here, before MQ00000002 is revoked below)."""
    template = world.data / "config" / f"{bench_common.DEVICE_TYPE}.toml"
    template.write_text(DEFAULT_TEMPLATE + '\n[mqtt]\nbroker = "mqtts://localhost:1"\n'
                        'topics = ["devices/{serial}/#", "devices/MQ00000002/{serial}/#"]\n')
    try:
        one_line_error(run_devid("mqtt", "broker-config", "--out", tmp_path / "b", data_dir=world.data),
                       "is inside devices/MQ00000002, the tree of device MQ00000002")
        assert not (tmp_path / "b" / "broker.cert.pem").exists()      # refused before anything was issued
    finally:
        template.unlink()


def test_a_device_publishes_and_receives_its_own_message(world):
    """In one session (the broker allows one per device): subscribe, publish, receive; and with
    the CLI, a retained message published is what the next subscription receives."""
    with Connection(service(world.device(1))) as conn:
        conn.subscribe("devices/MQ00000001/echo")
        conn.publish("devices/MQ00000001/echo", b"hello")
        assert conn.wait_messages(1, 30) == [("devices/MQ00000001/echo", b"hello")]
    out = ok(run_devid("mqtt", "publish", "--device", world.device(1), "--topic", "state", "--message", "on",
                       "--retain"))
    assert f"published 2 bytes to devices/MQ00000001/state at mqtts://localhost:{world.broker.port}" in out
    got = json.loads(ok(run_devid("mqtt", "subscribe", "--device", world.device(1), "--topic", "state", "--json")))
    assert got["messages"] == [{"topic": "devices/MQ00000001/state", "message": "on"}]


def test_a_device_cannot_publish_or_read_in_another_devices_tree(world):
    one, two = service(world.device(1)), service(world.device(2))
    with Connection(one) as a, Connection(two) as b:
        with pytest.raises(MQTTFailed) as info:
            a.publish("devices/MQ00000002/spoof", b"x")
        assert "0x87" in str(info.value) and "Not authorized" in str(info.value)
        a.subscribe("devices/MQ00000002/#")
        a.subscribe("devices/MQ00000001/sentinel")     # (not the whole tree: a retained message is there)
        b.publish("devices/MQ00000002/secret", b"not for you")
        a.publish("devices/MQ00000001/sentinel", b"mine")
        got = a.wait_messages(1, 30)
        assert got == [("devices/MQ00000001/sentinel", b"mine")]
        assert a.messages == got                    # and nothing of MQ00000002's tree


def test_identities_that_are_not_operational_are_refused(world, tmp_path):
    svc = service(world.device(1))
    factory = world.device(1)
    # the factory certificate, sent with its whole chain
    text = refused(Service(svc.host, svc.port, "MQ00000001", svc.topic_prefix, svc.trust_pem,
                           factory / "chain.pem", factory / "key.pem"))
    assert "refused" in text
    # a certificate of another CA with the same subject
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-MQ00000001")])
    now = datetime.now(timezone.utc)
    other = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(1).not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=1))
             .sign(key, hashes.SHA256()))
    (tmp_path / "other.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "other.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    assert "refused" in refused(Service(svc.host, svc.port, "MQ00000001", svc.topic_prefix, svc.trust_pem,
                                        tmp_path / "other.pem", tmp_path / "other.key"))
    # no certificate at all: a real MQTT CONNECT over TLS without a client certificate
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=svc.trust_pem.decode())
    assert connack_without_certificate(ctx, svc.port) is None


def connack_without_certificate(ctx: ssl.SSLContext, port: int):
    """The CONNACK reason code a client without a certificate gets (None: no CONNACK, the broker
    ended the TLS session)."""
    import threading
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="anonymous", protocol=paho.MQTTv5)
    client.tls_set_context(ctx)
    done, codes = threading.Event(), []
    client.on_connect = lambda c, u, f, reason, p: (codes.append(reason), done.set())
    client.on_disconnect = lambda c, u, f, reason, p: done.set()
    try:
        client.connect("localhost", port)
    except (ssl.SSLError, OSError):
        return None
    client.loop_start()
    try:
        assert done.wait(30), "neither CONNACK nor a closed connection within 30 s"
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0] if codes else None


def test_tls_below_1_2_is_refused(world):
    proc = subprocess.run([tool("openssl"), "s_client", "-connect", f"127.0.0.1:{world.broker.port}", "-tls1_1",
                           "-cipher", "DEFAULT@SECLEVEL=0", "-brief"], input="", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "alert protocol version" in proc.stderr or "no protocols available" in proc.stderr, proc.stderr
    proc = subprocess.run([tool("openssl"), "s_client", "-connect", f"127.0.0.1:{world.broker.port}", "-tls1_2",
                           "-brief", "-CAfile", str(world.device(1) / "ca.pem"), "-cert",
                           str(world.device(1) / "op-chain.pem"), "-key", str(world.device(1) / "op-key.pem")],
                          input="", capture_output=True, text=True, timeout=60)
    assert "Protocol version: TLSv1.2" in proc.stderr, proc.stderr


def test_the_device_checks_the_brokers_name(world):
    svc = service(world.device(1), f"mqtts://127.0.0.1:{world.broker.port}")   # not in its certificate
    text = refused(svc)
    assert "not trusted" in text and "mismatch" in text.lower()


def test_broker_config_again_changes_only_the_crl(world):
    d = world.broker.directory
    files = ("mosquitto.conf", "broker.cert.pem", "broker.key.pem", "ca.pem", "acl")
    before = {n: (d / n).read_bytes() for n in files}
    crl_before = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    doc = world.broker_config()
    assert doc["broker_certificate_reissued"] is False
    assert {n: (d / n).read_bytes() for n in files} == before
    crl = x509.load_pem_x509_crl((d / "crl.pem").read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number > crl_before.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number


def test_a_revoked_device_is_refused_once_the_crl_is_republished(world):
    with Connection(service(world.device(2))) as live:
        live.publish("devices/MQ00000002/before", b"x")
        ok(run_devid("revoke", "MQ00000002", "--reason", "keyCompromise", data_dir=world.data))
        world.reload()
        assert "device-MQ00000002" not in (world.broker.directory / "acl").read_text()
        text = refused(service(world.device(2)))
        assert "refused" in text
        # a session open before the reload stays connected (Mosquitto keeps it), but the reloaded ACL
        # no longer names the device: its publishes are refused (docs/mqtt.md)
        with pytest.raises(MQTTFailed) as info:
            live.publish("devices/MQ00000002/after", b"x")
        assert "0x87" in str(info.value)
    with Connection(service(world.device(1))) as still:
        still.publish("devices/MQ00000001/ok", b"x")


def test_device_side_errors_are_one_line(world, tmp_path):
    one_line_error(run_devid("mqtt", "publish", "--device", world.device(3), "--topic", "t", "--message", "m"),
                   "enroll the device first")
    one_line_error(run_devid("mqtt", "publish", "--device", world.device(1), "--topic", "t", "--message", "m",
                             "--broker", "mqtts://127.0.0.1:1"), "cannot reach the broker at mqtts://127.0.0.1:1")
    one_line_error(run_devid("mqtt", "publish", "--device", world.device(1), "--topic", "t", "--message", "m",
                             "--broker", "http://x"), "not an mqtts://HOST[:PORT] URL")
    one_line_error(run_devid("mqtt", "broker-config", "--out", tmp_path / "b", "--owner", "no-such-user-here",
                             data_dir=world.data), "--owner no-such-user-here: no such user")
    one_line_error(run_devid("mqtt", "broker-config", "--out", tmp_path / "b", "--listen", "0.0.0.0\nallow_anonymous true",
                             data_dir=world.data), "not an IP address")
    proc = run_devid("mqtt", "broker-config", "--out", tmp_path / "b", "--hostname", "a b", data_dir=world.data)
    assert proc.returncode == 2 and "invalid host name" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    for topic in ("a/+", "a/#", "a//b"):
        one_line_error(run_devid("mqtt", "publish", "--device", world.device(1), "--topic", topic, "--message", "m"),
                       "no + or #, none empty")
    bad = world.device(1).parent / "broken"
    import shutil
    shutil.copytree(world.device(1), bad)
    (bad / "op-chain.pem").write_text("not a certificate")
    one_line_error(run_devid("mqtt", "publish", "--device", bad, "--topic", "t", "--message", "m"), "op-chain.pem")


@pytest.mark.parametrize("topics, why", [
    (["devices/+/{serial}/#"], "only literal levels come before {serial}"),
    (["devices/{device_type}/{serial}/#"], "only literal levels come before {serial}"),
    (["devices/{serial}#"], "a filter has a level that is exactly {serial}"),
    (["devices/#/{serial}"], "only literal levels come before {serial}"),
    (["devices/{serial}/telemetry"], "the first filter is PREFIX/{serial}/#"),
    (["devices/{serial}/#", "a b/{serial}/#"], "levels are non-empty"),
])
def test_template_topics_reach_only_the_devices_own_tree(topics, why, tmp_path):
    from devid.gateway.errors import ConfigError
    from devid.gateway.store.configuration import ConfigTemplates
    (tmp_path / "default.toml").write_text(DEFAULT_TEMPLATE + f'\n[mqtt]\nbroker = "mqtts://b"\ntopics = {json.dumps(topics)}\n')
    with pytest.raises(ConfigError) as info:
        ConfigTemplates(tmp_path, lambda name: None).for_device("SN1", "t")
    assert why in str(info.value)


def test_a_superseded_certificate_is_refused_once_the_crl_is_republished(world, tmp_path):
    """The operator issues MQ00000001 a new operational certificate (devid ca sign-csr supersedes
    the current one): after broker-config and a reload, the old certificate is refused (the CRL
    lists it, reason superseded) and the new one is admitted."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])).sign(key, hashes.SHA256()))
    (tmp_path / "new.csr").write_bytes(csr.public_bytes(serialization.Encoding.DER))
    ok(run_devid("ca", "sign-csr", "--profile", "operational", "--device", "MQ00000001", "--csr", tmp_path / "new.csr",
                 "--out", tmp_path / "new.pem", data_dir=world.data))
    (tmp_path / "new-chain.pem").write_bytes((tmp_path / "new.pem").read_bytes()
                                             + (world.data / "ca" / "operational.cert.pem").read_bytes())
    (tmp_path / "new.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    world.reload()
    old = service(world.device(1))
    assert "refused" in refused(old)
    new = Service(old.host, old.port, old.client_id, old.topic_prefix, old.trust_pem, tmp_path / "new-chain.pem",
                  tmp_path / "new.key")
    with Connection(new) as conn:
        conn.publish("devices/MQ00000001/renewed", b"x")
    crl = x509.load_pem_x509_crl((world.broker.directory / "crl.pem").read_bytes())
    old_serial = x509.load_pem_x509_certificates((world.device(1) / "op-chain.pem").read_bytes())[0].serial_number
    entry = crl.get_revoked_certificate_by_serial_number(old_serial)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.superseded


def test_simulate_mqtt_makes_each_device_publish_once(world, tmp_path):
    """`devid simulate --mqtt`: the devices enroll through a real gateway, then each publishes once
    with its new identity. Before broker-config has run again they are not in the ACL (every
    publish refused, 0x87, the command fails); after it, a renewal run publishes for all."""
    ok(run_devid("provision", "--count", 2, "--device-type", bench_common.DEVICE_TYPE, "--out", tmp_path / "sim",
                 "--serial-prefix", "SIM", "--workers", 1, data_dir=world.data))
    served = serve(world.data, tmp_path / "gateway.log")
    try:
        proc = run_devid("simulate", "--gateway", served.uri, "--devices", tmp_path / "sim", "--mqtt", "--json",
                         *FIRMWARE)
        doc = json.loads(proc.stdout)
        assert proc.returncode != 0 and doc["enrolled"] == 2 and doc["mqtt"]["published"] == 0
        assert all("0x87" in reason for reason in doc["mqtt"]["failures"].values()), doc
        world.reload()
        doc = json.loads(ok(run_devid("simulate", "--gateway", served.uri, "--devices", tmp_path / "sim", "--renew",
                                      "--mqtt", "--json")))
        assert doc["enrolled"] == 2 and doc["mqtt"] == {"published": 2, "failures": {}}
    finally:
        assert served.stop() == 0


def documented_broker_lines() -> list[dict]:
    """The example log lines of docs/mqtt.md "Keeping the broker current"."""
    import re
    text = (Path(__file__).resolve().parent.parent / "docs" / "mqtt.md").read_text()
    section = text[text.index("\n## Keeping the broker current\n"):]
    section = section[:section.index("\n## ", 1)]
    return [json.loads(line) for block in re.findall(r"```json\n(.*?)```", section, re.S)
            for line in block.splitlines() if line.strip()]


def test_serve_keeps_the_broker_current_after_enrollments_and_revocations(world, tmp_path):
    """`devid serve --mqtt-broker DIR --mqtt-broker-pid PID`: a device enrolled through the gateway
    is in the broker's ACL (and publishes) without anyone running broker-config, and once
    `devid revoke` has run (another process) the broker refuses it: the gateway saw the registry
    change, wrote the CRL and the ACL again and sent the broker SIGHUP. Its log lines are the
    documented ones."""
    before = world.broker.reloads()
    served = serve(world.data, tmp_path / "gateway.log",
                   args=["--mqtt-broker", world.broker.directory, "--mqtt-broker-pid", world.broker.pid,
                         "--mqtt-broker-batch", 0])
    try:
        wait_for(lambda: world.broker.reloads() > before, "the first refresh at start")
        device = world.device(3)
        ok(run_devid("provision", "--count", 1, "--device-type", bench_common.DEVICE_TYPE, "--out", tmp_path / "more",
                     "--serial-prefix", "MK", "--workers", 1, data_dir=world.data))
        other = tmp_path / "more" / "MK00000001"
        reloads = world.broker.reloads()
        for bundle in (device, other):
            ok(run_devid("enroll", "--gateway", served.uri, "--device", bundle, *FIRMWARE))
        wait_for(lambda: "device-MK00000001" in (world.broker.directory / "acl").read_text(),
                 "both enrollments in the ACL")
        wait_for(lambda: world.broker.reloads() > reloads, "a refresh after the enrollment")
        assert "device-MQ00000003" in (world.broker.directory / "acl").read_text()
        for bundle in (device, other):
            with Connection(service(bundle)) as conn:
                conn.publish(f"devices/{bundle.name}/hello", b"x")
        reloads = world.broker.reloads()
        ok(run_devid("revoke", "MQ00000003", "--reason", "keyCompromise", data_dir=world.data))
        wait_for(lambda: world.broker.reloads() > reloads, "a refresh after the revocation")
        assert "closed the connection before CONNACK" in refused(service(device))
        assert "device-MQ00000003" not in (world.broker.directory / "acl").read_text()
        with Connection(service(other)) as control:      # the broker is up, and admits a good device
            control.publish("devices/MK00000001/control", b"x")
    finally:
        assert served.stop() == 0
    lines = [json.loads(line) for line in (tmp_path / "gateway.log").read_text().splitlines()
             if line.startswith("{")]
    refreshes = [line for line in lines if line.get("event") == "mqtt-broker"]
    assert [line["trigger"] for line in refreshes][0] == "start" and refreshes[-1]["trigger"] == "revocation", refreshes
    assert {line["trigger"] for line in refreshes[1:-1]} == {"registry changed"}, refreshes
    assert all(line["result"] == "refreshed" for line in refreshes)
    # each refresh that wrote something signalled the broker; the revocation wrote both files
    assert all(line["broker_pid"] == world.broker.pid for line in refreshes if line["crl_written"] or line["acl_written"])
    assert refreshes[-1]["crl_written"] and refreshes[-1]["acl_written"]
    assert refreshes[1]["acl_written"] and not refreshes[1]["crl_written"]      # an enrollment lists nothing
    example = next(e for e in documented_broker_lines() if e["result"] == "refreshed")
    assert set(example) <= set(refreshes[0]) | {"worker"}, (example, refreshes[0])


def test_a_refresh_that_cannot_signal_the_broker_is_logged_and_retried_after_a_minute(world, tmp_path, caplog):
    """The broker's pid file names no process: the files are written, the failure is one
    documented log line, and the keeper's next look waits RETRY_AFTER (not CHECK_INTERVAL)."""
    import asyncio
    import logging
    from devid.gateway.app.broker_keeper import RETRY_AFTER, BrokerKeeper
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.system.logs import LineFormatter
    pidfile = tmp_path / "mosquitto.pid"
    pidfile.write_text("4194304\n")            # above pid_max: no such process
    (world.broker.directory / "crl.pem").unlink()         # something for the refresh to write (the broker
    #                                                       keeps the CRL it loaded)
    delays: list[float] = []

    async def sleep(seconds: float) -> None:     # the keeper's waits, recorded; the second one ends the run
        delays.append(seconds)
        if len(delays) == 2:
            raise asyncio.CancelledError
        await asyncio.sleep(0)

    keeper = BrokerKeeper(DataDir(world.data), world.broker.directory, str(pidfile),
                          lambda: datetime.now(timezone.utc), check_interval=0.01, sleep=sleep)
    with caplog.at_level(logging.INFO, logger="devid.gateway"):
        async def run():
            try:
                await keeper.run()
            except asyncio.CancelledError:
                pass
            await keeper.stop()
        asyncio.run(run())
    records = [r for r in caplog.records if r.getMessage() == "mqtt-broker"]
    lines = [json.loads(LineFormatter().format(r)) for r in records]
    failed = [line for line in lines if line["result"] == "failed"]
    assert failed and delays[0] == RETRY_AFTER, (lines, delays)
    line = failed[0]
    assert "no such process" in line["reason"] and line["retry_seconds"] == RETRY_AFTER
    example = next(e for e in documented_broker_lines() if e["result"] == "failed")
    assert (example["logger"], example["level"], example["event"]) == (line["logger"], line["level"], line["event"])
    assert set(example) == set(line), (example, line)


def test_a_bad_template_does_not_hold_back_the_crl(world, tmp_path):
    """A template the ACL cannot be made from: the CRL is still written (and the old ACL kept),
    then the refresh fails with one line naming the ACL."""
    from devid.gateway.app import broker
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.errors import ConfigError
    template = world.data / "config" / "default.toml"
    good = template.read_text()
    acl = (world.broker.directory / "acl").read_bytes()
    crl = x509.load_pem_x509_crl((world.broker.directory / "crl.pem").read_bytes())
    ok(run_devid("revoke", "MQ00000001", "--reason", "keyCompromise", data_dir=world.data))
    template.write_text("[mqtt\n")
    try:
        with pytest.raises(ConfigError) as info:
            broker.refresh(DataDir(world.data), world.broker.directory, now=datetime.now(timezone.utc))
    finally:
        template.write_text(good)
    assert "the ACL is not written" in str(info.value) and "\n" not in str(info.value)
    assert (world.broker.directory / "acl").read_bytes() == acl
    new = x509.load_pem_x509_crl((world.broker.directory / "crl.pem").read_bytes())
    serial = x509.load_pem_x509_certificates((world.device(1) / "op-chain.pem").read_bytes())[0].serial_number
    def reason(c):      # the bundle's certificate: listed as superseded (renewed earlier), then as compromised
        entry = c.get_revoked_certificate_by_serial_number(serial)
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason(crl) is x509.ReasonFlags.superseded and reason(new) is x509.ReasonFlags.key_compromise


def test_a_refresh_replaces_only_regular_files_and_signals_only_mosquitto(world, tmp_path):
    from devid.gateway.app import broker
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.errors import ConfigError
    d = world.broker.directory
    for name in ("crl.pem", "acl"):
        st = (d / name).stat()
        assert st.st_gid == d.stat().st_gid and st.st_mode & 0o777 == 0o640      # the broker's group reads
    with pytest.raises(ConfigError) as info:
        broker.signal_broker(os.getpid(), "--mqtt-broker-pid")
    assert "not a Mosquitto broker" in str(info.value)
    (tmp_path / "elsewhere").write_text("x")
    (d / "acl").rename(tmp_path / "acl.saved")
    (d / "acl").symlink_to(tmp_path / "elsewhere")
    try:
        with pytest.raises(ConfigError) as info:
            broker.refresh(DataDir(world.data), d, now=datetime.now(timezone.utc))
        assert "not a regular file" in str(info.value)
        assert (tmp_path / "elsewhere").read_text() == "x" and (tmp_path / "elsewhere").stat().st_mode & 0o777 == 0o644
    finally:
        (d / "acl").unlink()
        (tmp_path / "acl.saved").rename(d / "acl")


def test_serve_refuses_a_broker_directory_broker_config_did_not_make(world, tmp_path):
    one_line_error(run_devid("serve", "--listen", "127.0.0.1:0", "--mqtt-broker", tmp_path, data_dir=world.data),
                   "run devid mqtt broker-config")
    for flag in (["--mqtt-broker-pid", "123"], ["--mqtt-broker-batch", "5"]):
        one_line_error(run_devid("serve", "--listen", "127.0.0.1:0", *flag, data_dir=world.data), "need --mqtt-broker")
