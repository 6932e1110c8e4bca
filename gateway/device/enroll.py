"""The device side of zero-touch enrollment, as a field engineer's script runs it.

From a factory bundle (`devid provision`), in one DTLS session with the factory identity, by one
of two flows (`FLOWS`):

- `one-request` (the default, flow_one.py): a new operational key, signed attestation evidence
  for the session's own nonce (its exporter value, computed here; a server nonce from GET
  /attest/nonce when the session has none) bound to that key, inside the CSR sent to EST /sen
  with Accept 62; the one answer carries the verdict, the certificate and the configuration;
- `classic` (flow.py): fetch a nonce, send the evidence, send a CSR to EST /sen, then fetch the
  configuration (the gateway serves /config to the factory identity of an enrolled device).

Either way the certificate is checked and stored, then the configuration. `renew` does /sren
with the operational identity (by default for the certificate alone; with the `one-request`
flow asking for the configuration in the same answer). Each step reports through a callback; every failure is an `EnrollFailed` naming
the step and the gateway's reason. The DTLS handshake is a step of its own (`connect`), before
the first request: a gateway that cannot be reached, or refuses the device, fails there. A
failure after the operational certificate was stored (the configuration step) is
`ConfigNotFetched`: the device is enrolled, and `fetch_config` gets the configuration later.

The protocol itself (requests, checks, problem details) is `flow.py` and `protocol.py`; this
module runs it over aiocoap (`client.py`) and keeps the files of the bundle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca import keys
from devid.ca.identity import format_serial
from devid.gateway.device.client import coap_exchange, open_session
from devid.gateway.device.flow import Config, Done, Issued, config_flow, drive, enroll_flow, renew_flow
from devid.gateway.device.flow_one import one_request_flow, renew_one_flow
from devid.gateway.device.identity import (DeviceIdentity, Firmware, device_csr, device_type_of, load_bundle,
                                           operational_files, pen_of, root_verifier, serial_of, token_section)
from devid.gateway.device.protocol import (CLASSIC, DEFAULT_FLOW, DEFAULT_RENEW_FLOW, FLOWS, ONE_REQUEST, EnrollFailed,
                                           parse_gateway)
from devid.gateway.errors import BundleError
from devid.gateway.system.fs import write_atomic

# the names the CLI, the demo and the tests import from here
__all__ = ["CLASSIC", "ConfigNotFetched", "DEFAULT_FLOW", "DEFAULT_RENEW_FLOW", "EnrollFailed", "EnrollResult", "FLOWS", "Firmware",
           "ONE_REQUEST", "as_operational", "device_csr", "device_type_of", "enroll", "fetch_config", "pen_of", "renew",
           "serial_of", "store_config"]

OPERATIONAL = {"cert_name": "op-chain.pem", "key_name": "op-key.pem"}


def _check_flow(flow: str) -> None:
    if flow not in FLOWS:
        raise EnrollFailed("flow", f"unknown flow {flow!r} (one of: {', '.join(FLOWS)})")


class ConfigNotFetched(EnrollFailed):
    """The device is enrolled (its operational identity is stored in `directory`), but its
    configuration could not be fetched; `fetch_config` gets it with the operational identity."""

    def __init__(self, reason: str, directory: Path, certificate: x509.Certificate) -> None:
        super().__init__("config", reason)
        self.directory = directory
        self.certificate = certificate


@dataclass
class EnrollResult:
    serial: str
    certificate: x509.Certificate
    verdict: str | None
    config: dict
    seconds: float
    steps: dict[str, float]
    flow: str = DEFAULT_FLOW
    nonce: str | None = None           # the evidence's nonce: "session", "server", or None (no evidence)


async def enroll(directory: Path, gateway_uri: str, firmware: Firmware | None, *, flow: str = DEFAULT_FLOW,
                 timeout: float = 30.0, report: Callable[[str, str], None] = lambda step, text: None,
                 secure_boot: bool = True, dbgstat: int = 2, bootcount: int = 1,
                 store: Callable[[Path, Issued], None] | None = None) -> EnrollResult:
    """Enroll the device of the bundle `directory` at `gateway_uri` by `flow` (FLOWS), with
    evidence of `firmware` (None: no evidence). `store(directory, issued)` writes the new
    operational identity (default: the three files, each atomically; `devid agent` passes its
    journaled install)."""
    _check_flow(flow)
    directory = Path(directory)
    gateway = parse_gateway(gateway_uri)
    started = time.perf_counter()
    try:
        factory, _, factory_key, root = load_bundle(directory)
    except (BundleError, keys.KeyFileError) as exc:
        raise EnrollFailed("bundle", str(exc)) from None
    identity = DeviceIdentity.of(factory, factory_key)
    stored: list[Issued] = []

    def on_step(done: Done) -> None:
        if done.step == "nonce":
            report("nonce", f"{len(done.value)} bytes, from {gateway.base}")
        elif done.step == "evidence":
            report("evidence", f"verdict {done.value.tier} ({done.value.reasons_text})")
        elif done.step == "enroll":
            (store or _store_operational)(directory, done.value)
            stored.append(done.value)
            report("enroll", _certificate_text(done.value.certificate))
        elif done.step == "config":
            store_config(directory, done.value)

    t0 = time.perf_counter()
    ctx, exporter = await open_session(directory, gateway, timeout)
    connected = time.perf_counter()
    claims = dict(secure_boot=secure_boot, dbgstat=dbgstat, bootcount=bootcount)
    try:
        if flow == CLASSIC:
            steps_of = enroll_flow(identity, firmware, root_verifier(root), **claims)
        else:
            if firmware is not None and exporter is not None:
                report("nonce", f"the session's own ({len(exporter)} bytes, its DTLS exporter value), no request")
            steps_of = one_request_flow(identity, firmware, root_verifier(root), session_nonce=exporter, **claims)
        done, steps = await drive(steps_of, coap_exchange(ctx, gateway.base, timeout), on_step, started=connected)
    except EnrollFailed as exc:
        if not stored:
            raise
        # only the configuration is missing: the certificate is the device's, stored and current
        raise ConfigNotFetched(exc.reason if exc.step == "config" else str(exc), directory,
                               stored[-1].certificate) from None
    finally:
        await ctx.shutdown()
    config = done.config.data
    report("config", _config_text(config))
    nonce = None if firmware is None else "server" if "nonce" in steps else "session"
    return EnrollResult(done.serial, done.issued.certificate, done.verdict.tier if done.verdict else None, config,
                        time.perf_counter() - started, {"connect": connected - t0, **steps}, flow, nonce)


async def as_operational(directory: Path, gateway_uri: str, timeout: float, make_flow, on_step=None):
    """Run the flow `make_flow(factory certificate, root)` in a new session with the bundle's
    operational identity; its result. EnrollFailed at `bundle` if the device is not enrolled."""
    gateway = parse_gateway(gateway_uri)
    try:
        factory, _, _, root = load_bundle(directory)
        load_bundle(directory, **OPERATIONAL)
    except (BundleError, keys.KeyFileError) as exc:
        hint = "" if token_section(directory) is not None else " (enroll the device first)"
        raise EnrollFailed("bundle", f"{exc}{hint}") from None
    ctx, _ = await open_session(directory, gateway, timeout, **OPERATIONAL)
    try:
        result, _ = await drive(make_flow(factory, root), coap_exchange(ctx, gateway.base, timeout), on_step)
    finally:
        await ctx.shutdown()
    return result


async def fetch_config(directory: Path, gateway_uri: str, timeout: float = 30.0) -> dict:
    """GET /config with the operational identity (a new session): the configuration of an
    enrolled device, stored as config.cbor and config.json. A device that keeps a config.cbor
    asks with its ETag: while it is current the gateway answers 2.03 Valid, without a body."""
    directory = Path(directory)
    try:
        held = (directory / "config.cbor").read_bytes()
    except OSError:
        held = None
    config = await as_operational(directory, gateway_uri, timeout,
                                   lambda factory, root: config_flow(serial_of(factory), device_type_of(factory),
                                                                     held))
    store_config(directory, config)
    return config.data


async def renew(directory: Path, gateway_uri: str, *, flow: str = DEFAULT_RENEW_FLOW, timeout: float = 30.0,
                report: Callable[[str, str], None] = lambda step, text: None) -> x509.Certificate:
    """A new operational certificate (EST /sren with the operational identity), stored. By
    default (`classic`) the answer is the certificate alone; with the `one-request` flow the
    configuration comes in the same answer and is stored too (a failure reading it after the
    certificate was stored is ConfigNotFetched)."""
    _check_flow(flow)
    directory = Path(directory)
    if flow == CLASSIC:
        issued = await as_operational(directory, gateway_uri, timeout,
                                       lambda factory, root: renew_flow(serial_of(factory), root_verifier(root)))
        _store_operational(directory, issued)
        report("renew", _certificate_text(issued.certificate))
        return issued.certificate
    stored: list[Issued] = []

    def on_step(done: Done) -> None:
        if done.step == "renew":
            _store_operational(directory, done.value)
            stored.append(done.value)
            report("renew", _certificate_text(done.value.certificate))
        elif done.step == "config":
            store_config(directory, done.value)
            report("config", _config_text(done.value.data))
    try:
        issued, _ = await as_operational(directory, gateway_uri, timeout, lambda factory, root: renew_one_flow(
            serial_of(factory), device_type_of(factory), root_verifier(root)), on_step)
    except EnrollFailed as exc:
        if not stored:
            raise
        raise ConfigNotFetched(exc.reason if exc.step == "config" else str(exc), directory,
                               stored[-1].certificate) from None
    return issued.certificate


def _config_text(config: dict) -> str:
    return f"configuration for {config.get('device_type')} ({len(config.get('trust_anchors', []))} trust anchors)"


def _certificate_text(cert: x509.Certificate) -> str:
    return (f"operational certificate {format_serial(cert.serial_number)}, "
            f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def _store_operational(directory: Path, issued: Issued) -> None:
    for name, data, mode in operational_files(issued.key, issued.chain):
        write_atomic(directory / name, data, mode)


def store_config(directory: Path, config: Config) -> None:
    write_atomic(directory / "config.cbor", config.raw)
    def pem(der: bytes) -> str:
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()
    view = dict(config.data, trust_anchors=[pem(d) for d in config.data.get("trust_anchors", [])])
    mqtt = config.data.get("mqtt")
    if isinstance(mqtt, dict) and isinstance(mqtt.get("trust_anchor"), bytes):
        view["mqtt"] = dict(mqtt, trust_anchor=pem(mqtt["trust_anchor"]))
    write_atomic(directory / "config.json", (json.dumps(view, indent=2) + "\n").encode())
