"""A PSK device on tinydtls: aiocoap's `coaps://` client over DTLSSocket, the stack constrained
devices run (docs/enrollment.md#psk-devices). DTLSSocket is an optional dependency (`pip install
'devid-gateway[psk]'`; it builds tinydtls from source: autoconf, automake, libtool, pkg-config and a
C compiler).

tinydtls speaks TLS_PSK_WITH_AES_128_CCM_8 only and exports no session value, so the evidence of a
PSK device carries a server nonce (GET /attest/nonce), signed with the device's attestation key
(its factory key, key.pem or its secure element: the device has ECC even if its DTLS stack does
not use it). A PSK is a string in flash, not a key, so the gateway takes no verdict of an earlier
request from a PSK session: the evidence travels inside the CSR of /sen and of /sren (the
one-request flow, its cnf claim binding it to the CSR's key). After /sen the device fetches its
operational PSK (GET /psk) in the same session (no other session gets it; it comes sealed to the
new certificate's key, which opens it: ca/sealed.py) and uses it for its later
sessions; each renewal (/sren, with fresh evidence) rotates it, fetched in the renewal's session.

aiocoap keeps one tinydtls connection per remote address in a Context and reuses it whatever the
credentials, so each identity gets a Context of its own (`psk_context`), closed after use.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import aiocoap
import aiocoap.error
import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from devid.ca import keys, psk as ca_psk, sealed
from devid.ca.hierarchy import GATEWAY_COMMON_NAME
from devid.gateway.device.client import coap_exchange
from devid.gateway.device.enroll import EnrollResult, _store_operational, store_config
from devid.gateway.device.flow import (Config, Done, Flow, Issued, Verify, config_flow, drive, read_verdict,
                                       take_nonce)
from devid.gateway.device.flow_one import _certificate, _config, _part, _send, _shape, one_request_flow, read_parts
from devid.gateway.device.identity import DeviceIdentity, Firmware, device_csr, load_bundle, new_p256_key, root_verifier
from devid.gateway.device.protocol import CT_CBOR, CT_MULTIPART, SREN, EnrollFailed, Request, parse_gateway
from devid.gateway.errors import BundleError, GatewayError
from devid.gateway.system.fs import write_atomic

IDENTITY_FILE = "psk-identity.txt"
KEY_FILE = "psk-key.txt"
OPERATIONAL_IDENTITY_FILE = "operational-psk-identity.txt"
OPERATIONAL_KEY_FILE = "operational-psk-key.txt"
CT_COSE_SIGN1 = 18      # application/cose; cose-type="cose-sign1": the answer of GET /psk
_KEY_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class PskUnavailable(GatewayError):
    """DTLSSocket is not installed, or a bundle has no PSK."""


@dataclass(frozen=True)
class Psk:
    identity: bytes
    key: bytes = field(repr=False)          # a secret: never in a repr, a log or an error

    @property
    def kind(self) -> str:
        parsed = ca_psk.parse_identity(self.identity)
        return parsed[0] if parsed else "unknown"


def read_psk(directory: Path, operational: bool = False) -> Psk:
    """The factory PSK of a bundle (`devid provision --psk`), or the operational one `save_psk` kept."""
    names = (OPERATIONAL_IDENTITY_FILE, OPERATIONAL_KEY_FILE) if operational else (IDENTITY_FILE, KEY_FILE)
    try:
        return Psk((directory / names[0]).read_bytes().strip(), (directory / names[1]).read_bytes().strip())
    except FileNotFoundError as exc:
        raise PskUnavailable(f"{directory}: no {Path(exc.filename).name} (provisioned without --psk?)") from None


def save_psk(directory: Path, psk: Psk) -> None:
    """Keep the operational PSK beside the bundle (mode 0600), replacing the previous one."""
    for name, value in ((OPERATIONAL_IDENTITY_FILE, psk.identity), (OPERATIONAL_KEY_FILE, psk.key)):
        write_atomic(directory / name, value, mode=0o600)


def require_dtlssocket() -> None:
    try:
        import DTLSSocket  # noqa: F401
    except ImportError:
        raise PskUnavailable("PSK devices need DTLSSocket: pip install 'devid-gateway[psk]' (it builds tinydtls: "
                             "apt-get install autoconf automake libtool pkg-config build-essential python3-dev first)") from None


async def psk_context(psk: Psk, base: str) -> aiocoap.Context:
    """An aiocoap client Context whose coaps:// requests to `base` (coaps://HOST:PORT) run over
    tinydtls with `psk`."""
    require_dtlssocket()
    ctx = await aiocoap.Context.create_client_context(transports=["tinydtls"])
    ctx.client_credentials.load_from_dict({f"{base}/*": {"dtls": {
        "psk": {"ascii": psk.key.decode("ascii")}, "client-identity": {"ascii": psk.identity.decode("ascii")}}}})
    return ctx


def gateway_check(root: x509.Certificate, host: str, issuer: x509.Name, now: datetime | None = None):
    """check_chain for `sealed.verify`: the signer must be the gateway. Its chain leads to the
    device's `root` and its certificate is valid for `host`, the gateway the device reached (what
    an X.509 device checks of the gateway in its handshake); and, since the operational CA
    issues other server certificates too (the MQTT broker's, the operator listener's, which may
    name the same host), it is issued by `issuer` (the CA of the device's own operational
    certificate) with the gateway's commonName."""
    try:
        subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)

    def check(leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> None:
        verifier = (PolicyBuilder().store(Store([root])).time(now or datetime.now(timezone.utc))
                    .build_server_verifier(subject))
        verifier.verify(leaf, intermediates)
        if leaf.issuer != issuer:
            raise ValueError("not issued by the CA of the device's operational certificate")
        names = [a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
        if names != [GATEWAY_COMMON_NAME]:
            raise ValueError(f"its commonName is not {GATEWAY_COMMON_NAME!r}")
    return check


def read_operational_psk(payload: bytes, key: ec.EllipticCurvePrivateKey, *, serial: str,
                         certificate: x509.Certificate, check_chain) -> tuple[Psk, bytes | None]:
    """The answer of GET /psk (docs/enrollment.md#the-answer): a COSE_Sign1 by the gateway
    (`check_chain` judges its signer) of CBOR {"identity", "certificate", "sealed_key", "config"}
    for this device (`serial`) and the certificate it was just issued (`certificate`, whose
    private key `key` opens the sealed key). (the operational PSK, the digest of the
    configuration the gateway served in the same session: None if it could not build one)."""
    try:
        body = cbor2.loads(sealed.verify(payload, check_chain))
        identity, cert_digest, sealed_key, config_digest = (body["identity"], body["certificate"],
                                                            body["sealed_key"], body["config"])
        if not (isinstance(identity, str) and isinstance(cert_digest, bytes)
                and (config_digest is None or isinstance(config_digest, bytes))):
            raise PskUnavailable("the answer of /psk is not the documented map")
    except sealed.SealError as exc:
        raise PskUnavailable(f"the answer of /psk: {exc}") from None
    except PskUnavailable:
        raise
    except Exception:
        raise PskUnavailable("the answer of /psk is not the documented map") from None
    if identity != ca_psk.operational_identity(serial):
        raise PskUnavailable(f"the answer of /psk is for {identity[:40]!r}, not this device")
    if cert_digest != hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest():
        raise PskUnavailable("the answer of /psk goes with another certificate than the one just issued")
    try:
        psk = Psk(identity.encode("ascii"), sealed.unseal(key, sealed_key))
    except sealed.SealError as exc:
        raise PskUnavailable(f"the answer of /psk: {exc}") from None
    if len(psk.key) != ca_psk.KEY_CHARS or not all(c in _KEY_ALPHABET for c in psk.key):
        raise PskUnavailable("the answer of /psk is not an operational PSK")
    return psk, config_digest


async def fetch_operational_psk(ctx: aiocoap.Context, base: str, key: ec.EllipticCurvePrivateKey, timeout: float,
                                **expect) -> tuple[Psk, bytes | None]:
    """GET /psk over the session `ctx` holds with the gateway; `key`: the new certificate's;
    `expect`: what `read_operational_psk` checks."""
    message = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/psk", accept=CT_COSE_SIGN1)
    response = await asyncio.wait_for(ctx.request(message).response, timeout)
    if response.code != aiocoap.CONTENT:
        raise PskUnavailable(f"/psk: {response.code} {response.payload[:200]!r}")
    return read_operational_psk(response.payload, key, **expect)


# -- the PSK device's flows: enrollment and renewal over tinydtls -----------------------------------

async def enroll_psk(directory: Path, gateway_uri: str, firmware: Firmware | None, *,
                     timeout: float = 30.0) -> EnrollResult:
    """Enroll the PSK device of the bundle `directory`, in one session with its factory PSK: a
    server nonce, /sen with evidence signed with the factory key inside the CSR (the one-request
    flow; without `firmware` no evidence, for device types whose policy waives attestation), then
    GET /psk (signed by the gateway, the key sealed to the new certificate's key: checked and
    opened with it). Keeps op-chain.pem and op-key.pem, the operational PSK, and config.cbor/json
    once the signed answer vouches for it (`_settle`)."""
    directory = Path(directory)
    gateway = parse_gateway(gateway_uri)
    try:
        factory, _, factory_key, root = load_bundle(directory)
        psk = read_psk(directory)
    except (BundleError, PskUnavailable, keys.KeyFileError) as exc:
        raise EnrollFailed("bundle", str(exc)) from None
    identity = DeviceIdentity.of(factory, factory_key)
    started = time.perf_counter()

    def on_step(done: Done) -> None:
        if done.step == "enroll":
            _store_operational(directory, done.value)

    new_key = _KeyKept()
    ctx = await psk_context(psk, gateway.base)
    try:
        # `exchange` holds the session until GET /psk (coap_exchange: aiocoap holds it weakly)
        exchange = coap_exchange(ctx, gateway.base, timeout)
        done, steps = await drive(one_request_flow(identity, firmware, root_verifier(root), new_key=new_key),
                                  exchange, on_step)
        t = time.perf_counter()
        op_psk, digest = await _fetch(ctx, gateway.base, new_key.key, timeout, serial=identity.serial,
                                      certificate=done.issued.certificate,
                                      check_chain=gateway_check(root, gateway.host, done.issued.certificate.issuer))
        save_psk(directory, op_psk)
        del exchange
        steps["psk"] = time.perf_counter() - t
    finally:
        await ctx.shutdown()
    config = await _settle(directory, gateway.base, identity, op_psk, done.config, digest, timeout)
    return EnrollResult(done.serial, done.issued.certificate, done.verdict.tier if done.verdict else None,
                        config.data, time.perf_counter() - started, steps, "psk",
                        None if firmware is None else "server")


async def renew_psk(directory: Path, gateway_uri: str, firmware: Firmware | None, *,
                    timeout: float = 30.0) -> x509.Certificate:
    """Renew in a session with the operational PSK: a server nonce, /sren with fresh evidence
    (signed with the factory key, bound to the new key) in the CSR, then GET /psk for the new key
    (the old one stops working with the new certificate). Keeps both, like `enroll_psk`."""
    directory = Path(directory)
    gateway = parse_gateway(gateway_uri)
    try:
        factory, _, factory_key, root = load_bundle(directory)
        psk = read_psk(directory, operational=True)
    except (BundleError, PskUnavailable, keys.KeyFileError) as exc:
        raise EnrollFailed("bundle", f"{exc} (enroll the device first)") from None
    identity = DeviceIdentity.of(factory, factory_key)
    new_key = _KeyKept()
    configs: list[Config] = []
    ctx = await psk_context(psk, gateway.base)
    try:
        exchange = coap_exchange(ctx, gateway.base, timeout)       # holds the session (enroll_psk)
        issued, _ = await drive(renew_psk_flow(identity, firmware, root_verifier(root), new_key=new_key), exchange,
                                lambda done: configs.append(done.value) if done.step == "config" else None)
        _store_operational(directory, issued)
        op_psk, digest = await _fetch(ctx, gateway.base, new_key.key, timeout, serial=identity.serial,
                                      certificate=issued.certificate,
                                      check_chain=gateway_check(root, gateway.host, issued.certificate.issuer))
        save_psk(directory, op_psk)
        del exchange
    finally:
        await ctx.shutdown()
    await _settle(directory, gateway.base, identity, op_psk, configs[0] if configs else None, digest, timeout)
    return issued.certificate


def renew_psk_flow(identity: DeviceIdentity, firmware: Firmware | None, verify: Verify, *,
                   new_key=new_p256_key, clock=time.time) -> Flow[Issued]:
    """/sren of a PSK device in one request: evidence for a server nonce, bound to the new key,
    inside the CSR (without `firmware`: none, for a policy that waives attestation); the
    multipart answer carries the certificate, the configuration and the verdict."""
    key = new_key()
    token = None
    if firmware is not None:
        nonce = yield from take_nonce(None)
        token = identity.evidence(nonce, firmware, iat=int(clock()), bound_key=key.public_key())
    reply = yield from _send(Request(SREN[CT_MULTIPART], device_csr(key, identity.serial, token)))
    parts = read_parts("renew", reply)
    _shape("renew", parts, verdict=token is not None)
    if token is not None:
        verdict = read_verdict(_part(reply, CT_CBOR, parts[2][1]))
        yield Done("evidence", verdict)
        if not verdict.acceptable:
            raise EnrollFailed("evidence", f"verdict {verdict.tier}: {verdict.reasons_text}")
    issued = yield from _certificate(reply, parts, key, identity.serial, verify)
    yield Done("renew", issued)
    yield Done("config", _config(reply, parts, identity.serial, identity.device_type))
    return issued


class _KeyKept:
    """new_key for a flow that keeps the key it made: the operational PSK is sealed to it."""

    key: ec.EllipticCurvePrivateKey | None = None

    def __call__(self) -> ec.EllipticCurvePrivateKey:
        self.key = new_p256_key()
        return self.key


async def _settle(directory: Path, base: str, identity: DeviceIdentity, op_psk: Psk, config: Config | None,
                  digest: bytes | None, timeout: float) -> Config:
    """Keep the configuration the session served if the gateway's signed answer vouches for it
    (its SHA-256 is the answer's `config`); else (the factory PSK's session could have been a
    PSK holder's on the path, or the configuration changed in between) fetch it again in a
    session with the new operational PSK, which only the gateway shares."""
    if config is None or hashlib.sha256(config.raw).digest() != digest:
        ctx = await psk_context(op_psk, base)
        try:
            exchange = coap_exchange(ctx, base, timeout)
            config, _ = await drive(config_flow(identity.serial, identity.device_type), exchange)
        finally:
            await ctx.shutdown()
    store_config(directory, config)
    return config


async def _fetch(ctx: aiocoap.Context, base: str, key: ec.EllipticCurvePrivateKey | None, timeout: float,
                 **expect) -> tuple[Psk, bytes | None]:
    if key is None:
        raise EnrollFailed("psk", "no certificate key was made in this session")
    try:
        return await fetch_operational_psk(ctx, base, key, timeout, **expect)
    except asyncio.TimeoutError:
        raise EnrollFailed.no_answer("psk", timeout) from None
    except (PskUnavailable, aiocoap.error.Error) as exc:
        raise EnrollFailed("psk", str(exc) or exc.__class__.__name__) from None
