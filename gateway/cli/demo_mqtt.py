"""`devid demo`'s service-access part: a real Mosquitto broker on loopback, on the files `devid
mqtt broker-config` writes, kept current by the demo gateway (`--mqtt-broker`); each enrolled
device publishes with its operational identity, and the revoked one is refused by the broker.

Skipped, with the reason said, when Mosquitto is not installed (`./scripts/demo` installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from devid.gateway.app.broker import broker_config
from devid.gateway.app.mosquitto import broker_user, program, start_mosquitto, stop_process
from devid.gateway.device.mqtt import Connection, MQTTFailed, service, topic_under
from devid.gateway.errors import ConfigError
from devid.gateway.store.configuration import DEFAULT_TEMPLATE

# how devid's client reports a broker that refused the device's certificate (gateway/device/mqtt.py)
CERTIFICATE_REFUSED = ("closed the connection before CONNACK", "refused the TLS handshake")

DEMO_TEMPLATE_HEAD = "# Written by `devid demo` because no template existed for this type (docs/mqtt.md).\n"


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoBroker:
    """One Mosquitto for the length of a demo run, in a directory of its own (removed at stop)."""

    def __init__(self, data) -> None:
        self.data = data
        self.port = _free_tcp_port()
        self.url = f"mqtts://localhost:{self.port}"
        self.home: Path | None = None
        self.proc = None

    @staticmethod
    def missing() -> str | None:
        """Why the MQTT part cannot run here, or None."""
        if program("mosquitto") is None:
            return "mosquitto is not installed (./scripts/demo installs it; Debian: apt-get install mosquitto)"
        if broker_user() is not None and program("setpriv") is None:
            return "setpriv (util-linux) is needed to run mosquitto as its own user"
        return None

    def write_template(self, device_type: str) -> Path | None:
        """The device type's configuration template with an [mqtt] table, if it has no template
        yet (as the demo writes its policy): enrolled devices are then told their broker."""
        path = self.data.path / "config" / f"{device_type}.toml"
        if path.exists():
            import tomllib
            try:
                named = "mqtt" in tomllib.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: unreadable ({exc})") from None
            if not named:
                raise ConfigError(f"{path} has no [mqtt] table: its devices are told no broker "
                                  "(add one, docs/mqtt.md, or run with --no-mqtt)")
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DEMO_TEMPLATE_HEAD + DEFAULT_TEMPLATE.replace(
            '# [mqtt]\n# broker = "mqtts://localhost:8883"\n# topics = ["devices/{serial}/#"]',
            '[mqtt]\nbroker = "mqtts://localhost:8883"\ntopics = ["devices/{serial}/#"]'))
        return path

    @property
    def directory(self) -> Path:
        assert self.home is not None
        return self.home / "broker"

    def start(self) -> None:
        """broker-config into a fresh directory, then the broker on it (blocking)."""
        self.home = Path(tempfile.mkdtemp(prefix="devid-demo-mqtt-"))
        os.chmod(self.home, 0o755)              # the broker's account enters it
        broker_config(self.data, self.directory, hostnames=["localhost"], port=self.port, listen="127.0.0.1",
                      owner=broker_user(), now=datetime.now(timezone.utc))
        self.proc = start_mosquitto(self.directory / "mosquitto.conf", self.port, self.home / "broker.log")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def in_acl(self, serials: list[str]) -> bool:
        text = (self.directory / "acl").read_text()
        return all(f"user device-{s}\n" in text for s in serials)

    def publish(self, bundle: Path, deadline: float, echo: bool = False) -> str:
        """The device publishes a reading (and with `echo` subscribes to its own tree first and
        waits for it to come back); the topic. Refusals while the broker reloads its ACL (0x87)
        are tried again until `deadline` (monotonic)."""
        while True:
            try:
                svc = service(bundle, broker=self.url)
                topic = topic_under(svc.topic_prefix, "telemetry")
                with Connection(svc) as conn:
                    if echo:
                        conn.subscribe(f"{svc.topic_prefix}/#")
                    conn.publish(topic, b'{"temperature": 21.5}')
                    if echo and not conn.wait_messages(1, 10):
                        raise MQTTFailed(f"{topic}: its own message did not come back")
                return topic
            except MQTTFailed as exc:
                if "0x87" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def refusal(self, bundle: Path, deadline: float) -> str | None:
        """The broker's refusal of the device's certificate once its reload is in force, or None
        if it still admits the device at `deadline`. Only a refused certificate counts: a
        broker that is down (or any other error) raises."""
        while True:
            try:
                with Connection(service(bundle, broker=self.url), timeout=5):
                    pass
            except MQTTFailed as exc:
                if not any(m in str(exc) for m in CERTIFICATE_REFUSED):
                    raise
                if self.proc.poll() is not None:
                    raise MQTTFailed(f"the broker exited ({self.proc.returncode})") from None
                return str(exc)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)
        if self.home is not None:
            shutil.rmtree(self.home, ignore_errors=True)
