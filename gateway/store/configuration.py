"""Operational configuration for enrolled devices, from per-device-type templates.

    DATA/config/<device-type>.toml   (falls back to DATA/config/default.toml)

A template names the operational endpoints, the renewal window and which CA certificates the
device gets as trust anchors. `GET /config` serves the result as CBOR (text keys; trust anchors
as DER byte strings).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization


from devid.gateway.errors import ConfigError

from devid.gateway.system.fs import write_atomic

DEFAULT_TEMPLATE = """\
# Operational configuration served to enrolled devices at GET /config (as CBOR).
# One file per device type: DATA/config/<device-type>.toml; this file serves every other type.

[endpoints]
# where the device renews its certificate (EST-coaps /sren) and fetches this configuration
gateway = "coaps://localhost:5684"

[renewal]
# When to renew is the attestation policy's renewal_threshold_days for the device type (default
# 30 days): the device is told it as renewal.window_days (a window_days here is overridden).
# The longest wait between two tries of a failed renewal (devid agent's backoff cap):
retry_seconds = 3600

[trust]
# CA certificates the device keeps as trust anchors: any of root, operational, manufacturing
anchors = ["root", "operational"]

# Service access over MQTT (docs/mqtt.md): uncomment to tell devices where their broker is.
# `devid mqtt broker-config` writes each enrolled device's topics (below) into the broker's ACL.
# [mqtt]
# broker = "mqtts://localhost:8883"
# topics = ["devices/{serial}/#"]
"""

DEFAULT_MQTT_TOPICS = ["devices/{serial}/#"]
LEVEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

_ANCHORS = ("root", "operational", "manufacturing")


class ConfigTemplates:
    def __init__(self, directory: Path, certificate: Callable[[str], x509.Certificate]) -> None:
        self.directory = Path(directory)
        self._certificate = certificate
        self._cache: dict[Path, tuple[float, dict]] = {}
        self._der: dict[str, bytes] = {}

    def ensure_default(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "default.toml"
        if not path.exists():
            # several gateway workers may get here at once: each writes its own file, and the
            # atomic replace leaves one complete template whoever wins
            write_atomic(path, DEFAULT_TEMPLATE.encode())

    def _template(self, device_type: str) -> dict:
        for path in (self.directory / f"{device_type}.toml", self.directory / "default.toml"):
            try:
                mtime = path.stat().st_mtime
            except FileNotFoundError:
                continue
            cached = self._cache.get(path)
            if cached and cached[0] == mtime:
                return cached[1]
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{path}: {exc}") from None
            self._check(doc, path)
            self._cache[path] = (mtime, doc)
            return doc
        raise ConfigError(f"no configuration template for device type {device_type} in {self.directory}")

    @staticmethod
    def _check(doc: dict, path: Path) -> None:
        try:
            gateway = doc["endpoints"]["gateway"]
            renewal = doc.get("renewal", {})
            if not isinstance(renewal, dict):
                raise ConfigError(f"{path}: [renewal] must be a table")
            window = renewal.get("window_days", 1)      # optional: the policy's threshold replaces it
            retry = renewal.get("retry_seconds", 1)
            anchors = doc["trust"]["anchors"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{path}: missing {exc}") from None
        if not isinstance(gateway, str) or not gateway.startswith("coaps://"):
            raise ConfigError(f"{path}: endpoints.gateway must be a coaps:// URI")
        if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
            raise ConfigError(f"{path}: renewal.window_days must be a positive integer")
        if not isinstance(retry, int) or isinstance(retry, bool) or retry <= 0:
            raise ConfigError(f"{path}: renewal.retry_seconds must be a positive integer")
        if not isinstance(anchors, list) or not anchors or any(a not in _ANCHORS for a in anchors):
            raise ConfigError(f"{path}: trust.anchors must list some of {', '.join(_ANCHORS)}")
        mqtt = doc.get("mqtt")
        if mqtt is not None:
            check_mqtt(mqtt, path)

    def _anchor(self, name: str) -> bytes:
        der = self._der.get(name)
        if der is None:
            der = self._der[name] = self._certificate(name).public_bytes(serialization.Encoding.DER)
        return der

    def for_device(self, serial: str, device_type: str) -> dict:
        doc = self._template(device_type)
        config = {
            "device": serial,
            "device_type": device_type,
            "endpoints": dict(doc["endpoints"]),
            "renewal": dict(doc.get("renewal", {})),
            "trust_anchors": [self._anchor(name) for name in doc["trust"]["anchors"]],
        }
        if "mqtt" in doc:
            topics = device_topics(doc["mqtt"], serial, device_type)
            config["mqtt"] = {"broker": doc["mqtt"]["broker"], "client_id": f"device-{serial}",
                              "topic_prefix": topics[0].removesuffix("/#"), "topics": topics,
                              "trust_anchor": self._anchor("root")}
        return config

    def mqtt_topics(self, serial: str, device_type: str) -> tuple[list[str], list[str]] | None:
        """(the topics the broker's ACL gives this device, the roots of its trees); None: its
        template names no broker."""
        doc = self._template(device_type)
        if "mqtt" not in doc:
            return None
        return device_topics(doc["mqtt"], serial, device_type), device_roots(doc["mqtt"], serial)


def check_mqtt(mqtt, path) -> None:
    """A template's [mqtt] table: broker = "mqtts://HOST[:PORT]"; topics: MQTT topic filters, each
    with a level that is exactly {serial}, after literal levels only (a device's own tree: the
    filter cannot reach another device's), and maybe {device_type}, + or a final # after it. The
    first filter is PREFIX/{serial}/#: the device's topic prefix."""
    if not isinstance(mqtt, dict):
        raise ConfigError(f"{path}: [mqtt] must be a table")
    broker = mqtt.get("broker")
    if not isinstance(broker, str) or not broker.startswith("mqtts://") or len(broker) <= len("mqtts://"):
        raise ConfigError(f"{path}: mqtt.broker must be an mqtts://HOST[:PORT] URL")
    topics = mqtt.get("topics", DEFAULT_MQTT_TOPICS)
    if not isinstance(topics, list) or not topics:
        raise ConfigError(f"{path}: mqtt.topics must be a non-empty list of topic filters")
    for n, topic in enumerate(topics):
        levels = topic.split("/") if isinstance(topic, str) else []
        why = _filter_problem(levels)
        if why is None and n == 0 and levels[-2:] != ["{serial}", "#"]:
            why = "the first filter is PREFIX/{serial}/# (it gives the device its topic prefix)"
        if why:
            raise ConfigError(f"{path}: mqtt.topics: {topic!r}: {why}")


def _filter_problem(levels: list[str]) -> str | None:
    if not levels or "{serial}" not in levels:
        return "a filter has a level that is exactly {serial}"
    at = levels.index("{serial}")
    for i, level in enumerate(levels):
        literal = level not in ("{serial}", "{device_type}", "+", "#")
        if not level or (literal and not set(level) <= LEVEL_CHARS):
            return "levels are non-empty: letters, digits, - _ . or exactly {serial}, {device_type}, +, #"
        if i < at and not literal:
            return "only literal levels come before {serial} (no +, #, {device_type}: another device's tree)"
        if level == "#" and i != len(levels) - 1:
            return "# is the last level"
        if level == "{serial}" and i != at:
            return "{serial} once"
    return None


def device_topics(mqtt: dict, serial: str, device_type: str) -> list[str]:
    return [t.replace("{serial}", serial).replace("{device_type}", device_type)
            for t in mqtt.get("topics", DEFAULT_MQTT_TOPICS)]


def device_roots(mqtt: dict, serial: str) -> list[str]:
    """The root of each of the device's trees: a filter's literal levels, then the serial."""
    roots = []
    for t in mqtt.get("topics", DEFAULT_MQTT_TOPICS):
        levels = t.split("/")
        roots.append("/".join(levels[:levels.index("{serial}")] + [serial]))
    return roots
