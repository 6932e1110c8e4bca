"""The device side of service access: MQTT 5 over TLS with the device's operational identity
(`devid mqtt publish`, `devid mqtt subscribe`; docs/mqtt.md).

paho-mqtt (Eclipse, the reference Python client: MQTT 5, TLS from an `ssl.SSLContext`, and the
PUBACK/SUBACK reason codes a refusal is read from) runs its network loop in a thread of its own;
this module waits on its callbacks with a deadline. aiomqtt wraps the same client for asyncio but
does not surface a PUBACK's reason code, which is how a broker says "not authorized" (0x87).
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.gateway.errors import BundleError, GatewayError

DEFAULT_PORT = 8883


class MQTTFailed(GatewayError):
    """The broker could not be reached, refused the device, or refused a publish."""


@dataclass(frozen=True)
class Service:
    """Where and as whom a device uses MQTT: from its configuration (config.cbor) and bundle."""

    host: str
    port: int
    client_id: str
    topic_prefix: str
    trust_pem: bytes            # the anchor the broker's certificate must chain to
    chain: Path                 # op-chain.pem: the operational certificate, then its CA
    key: Path                   # op-key.pem

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"


def parse_broker(url: str) -> tuple[str, int]:
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise MQTTFailed(f"{url!r} is not an mqtts://HOST[:PORT] URL") from None
    if parts.scheme != "mqtts" or not host or parts.path not in ("", "/"):
        raise MQTTFailed(f"{url!r} is not an mqtts://HOST[:PORT] URL")
    return host, port or DEFAULT_PORT


def topic_under(prefix: str, suffix: str) -> str:
    """PREFIX/SUFFIX: a topic name (no wildcard, no empty level) in the device's own tree."""
    levels = suffix.strip("/").split("/")
    if not suffix.strip("/") or any(not level or "+" in level or "#" in level for level in levels):
        raise MQTTFailed(f"--topic {suffix!r}: a topic under {prefix}/: levels of text, no + or #, none empty")
    return f"{prefix}/{'/'.join(levels)}"


def service(directory: Path, broker: str | None = None) -> Service:
    """The device's MQTT service from its bundle: op-chain.pem and op-key.pem (enrolled), and the
    [mqtt] part of its configuration (config.cbor), or `broker` instead of its URL."""
    directory = Path(directory)
    for name in ("op-chain.pem", "op-key.pem"):
        if not (directory / name).exists():
            raise BundleError(f"{directory}: no {name}: enroll the device first (devid enroll)")
    try:
        config = cbor2.loads((directory / "config.cbor").read_bytes())
    except FileNotFoundError:
        config = {}
    except (OSError, ValueError, cbor2.CBORDecodeError) as exc:
        raise BundleError(f"{directory / 'config.cbor'}: unreadable ({exc})") from None
    mqtt = config.get("mqtt") if isinstance(config, dict) else None
    if not isinstance(mqtt, dict):
        if broker is None:
            raise MQTTFailed(f"{directory}: its configuration names no MQTT broker (no [mqtt] in its type's "
                             "template; docs/mqtt.md): give --broker mqtts://HOST:PORT")
        mqtt = {}
    host, port = parse_broker(broker or str(mqtt.get("broker", "")))
    try:
        cert = x509.load_pem_x509_certificates((directory / "op-chain.pem").read_bytes())[0]
    except (OSError, ValueError, IndexError) as exc:
        raise BundleError(f"{directory / 'op-chain.pem'}: not a PEM certificate chain ({exc})") from None
    serial = next((a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)), "")
    anchor = mqtt.get("trust_anchor")
    if isinstance(anchor, bytes):
        try:
            trust = x509.load_der_x509_certificate(anchor).public_bytes(serialization.Encoding.PEM)
        except ValueError:
            raise BundleError(f"{directory / 'config.cbor'}: its mqtt trust anchor is not a certificate") from None
    else:
        try:
            trust = (directory / "ca.pem").read_bytes()
        except OSError as exc:
            raise BundleError(f"{directory / 'ca.pem'}: {exc.strerror}") from None
    # the broker takes the certificate's common name as the client id (use_username_as_clientid):
    # one session per device; a second connection of the same device takes the first one's place
    return Service(host, port, str(mqtt.get("client_id") or f"device-{serial}"),
                   str(mqtt.get("topic_prefix") or f"devices/{serial}"),
                   trust, directory / "op-chain.pem", directory / "op-key.pem")


def _context(svc: Service) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)           # hostname checked, certificate required
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=svc.trust_pem.decode())
    try:
        ctx.load_cert_chain(str(svc.chain), str(svc.key))
    except (OSError, ssl.SSLError) as exc:
        raise BundleError(f"{svc.chain}: cannot use the operational identity ({exc})") from None
    return ctx


class Connection:
    """One MQTT 5 session to the broker, as the device."""

    def __init__(self, svc: Service, timeout: float = 10.0) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion
        self.svc, self.timeout = svc, timeout
        self._paho = paho
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=svc.client_id, protocol=paho.MQTTv5)
        self.client.tls_set_context(_context(svc))
        self._connected = threading.Event()
        self._acks: dict[int, object] = {}
        self._ack = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []
        self._connect_code = None
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # paho's callbacks (its network thread)
    def _on_connect(self, client, userdata, flags, reason, properties):
        self._connect_code = reason
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        if not self._connected.is_set():            # closed before any CONNACK
            self._connected.set()
        with self._ack:
            self._ack.notify_all()

    def _on_publish(self, client, userdata, mid, reason, properties):
        with self._ack:
            self._acks[mid] = reason
            self._ack.notify_all()

    def _on_subscribe(self, client, userdata, mid, reasons, properties):
        with self._ack:
            self._acks[mid] = reasons
            self._ack.notify_all()

    def _on_message(self, client, userdata, message):
        with self._ack:
            self.messages.append((message.topic, bytes(message.payload)))
            self._ack.notify_all()

    def __enter__(self) -> "Connection":
        svc = self.svc
        try:
            self.client.connect(svc.host, svc.port, keepalive=60)
        except ssl.SSLCertVerificationError as exc:
            raise MQTTFailed(f"the broker at {svc.url} is not trusted: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise MQTTFailed(f"the broker at {svc.url} refused the TLS handshake ({_tls_reason(exc)}): it refused "
                             "the device's certificate, or speaks no TLS 1.2 or later") from None
        except (ConnectionRefusedError, socket.gaierror, socket.timeout, OSError) as exc:
            raise MQTTFailed(f"cannot reach the broker at {svc.url}: {exc.strerror or exc}") from None
        self.client.loop_start()
        if not self._connected.wait(self.timeout):
            self.close()
            raise MQTTFailed(f"the broker at {svc.url} did not answer CONNECT within {self.timeout:g} s")
        code = self._connect_code
        if code is None:                # the TLS session ended before CONNACK: the broker's verdict on
            self.close()                # the certificate comes after the client's handshake (TLS 1.3)
            raise MQTTFailed(f"the broker at {svc.url} closed the connection before CONNACK: it refused the "
                             "device's certificate (not an operational one, revoked, or of another CA)")
        if code.is_failure:
            self.close()
            raise MQTTFailed(f"the broker at {svc.url} refused the connection: {_reason(code)}")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _wait(self, mid: int, what: str):
        with self._ack:
            if not self._ack.wait_for(lambda: mid in self._acks or not self.client.is_connected(), self.timeout):
                raise MQTTFailed(f"no {what} from the broker within {self.timeout:g} s")
            if mid not in self._acks:
                raise MQTTFailed(f"the broker closed the connection before its {what} (not authorized?)")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        code = self._wait(info.mid, "PUBACK")
        if code is not None and getattr(code, "is_failure", False):
            raise MQTTFailed(f"the broker refused the publish to {topic}: {_reason(code)}")
        return code

    def subscribe(self, topic: str, qos: int = 1):
        result, mid = self.client.subscribe(topic, qos=qos)
        codes = self._wait(mid, "SUBACK")
        for code in codes or ():
            if code.is_failure:
                raise MQTTFailed(f"the broker refused the subscription to {topic}: {_reason(code)}")
        return codes

    def wait_messages(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        with self._ack:
            self._ack.wait_for(lambda: len(self.messages) >= count, timeout)
            return list(self.messages[:count])


def _reason(code) -> str:
    return f"{code} (0x{code.value:02X})"


def _tls_reason(exc: ssl.SSLError) -> str:
    return getattr(exc, "reason", None) or str(exc)


def publish_each(bundles: list[Path], *, suffix: str = "hello", concurrency: int = 16,
                 timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    """Each device publishes one message (`devid simulate --mqtt`): its serial and the time, to
    PREFIX/`suffix`, from its own bundle and configuration. (how many published, serial -> reason)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    def one(bundle: Path) -> str | None:
        try:
            svc = service(bundle)
            with Connection(svc, timeout=timeout) as conn:
                conn.publish(topic_under(svc.topic_prefix, suffix), f"{bundle.name} {time.time():.3f}".encode())
            return None
        except GatewayError as exc:
            return f"mqtt: {exc}"
    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        for bundle, reason in zip(bundles, pool.map(one, bundles)):
            if reason is not None:
                failures[bundle.name] = reason
    return len(bundles) - len(failures), failures
