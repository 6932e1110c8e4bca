"""The device side of zero-touch enrollment, as a field engineer's script runs it.

From a factory bundle (`devid provision`): fetch a nonce, send signed attestation evidence, send a
CSR for a new operational key to EST /sen, check the certificate, store it, then fetch the
configuration, all in one DTLS session with the factory identity (one handshake: the gateway
serves /config to the factory identity of an enrolled device). `renew` does /sren with the operational
identity. Each step reports through a callback; every failure is an `EnrollFailed` naming the
step and the gateway's reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import aiocoap
import cbor2
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from devid.attestation.evidence import Evidence, fw_digest_of, sign_evidence
from devid.ca import der, keys

from devid.gateway.device.client import device_context, load_bundle
from devid.gateway.errors import BundleError
from devid.gateway.coap.transport import DTLSHandshakeError
from devid.gateway.system.fs import write_atomic

CT_CBOR = 60
CT_PKCS7_CERTS = 281
CT_PKCS10 = 286
CT_PROBLEM = 257
DIGEST_ALGS = {64: "sha-256", 96: "sha-384", 128: "sha-512"}


class EnrollFailed(Exception):
    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class Firmware:
    alg: str
    digest: bytes
    name: str
    version: str

    @classmethod
    def from_options(cls, directory: Path, image: Path | None, digest_hex: str | None,
                     name: str | None, version: str | None) -> "Firmware | None":
        """From --firmware/--firmware-digest (+ name and version), or DIR/firmware.json; None: no
        attestation evidence will be sent."""
        meta = {}
        meta_path = Path(directory) / "firmware.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                raise EnrollFailed("firmware", f"{meta_path}: {exc}") from None
        if image is not None:
            try:
                alg, digest = "sha-256", fw_digest_of(Path(image).read_bytes())
            except OSError as exc:
                raise EnrollFailed("firmware", f"cannot read {image}: {exc.strerror}") from None
        elif digest_hex or meta.get("digest"):
            text = (digest_hex or meta["digest"]).lower()
            if ":" in text:
                alg, _, text = text.partition(":")
            else:
                alg = DIGEST_ALGS.get(len(text), "")
            try:
                digest = bytes.fromhex(text)
            except ValueError:
                raise EnrollFailed("firmware", "the firmware digest is not hex") from None
            if alg not in DIGEST_ALGS.values() or DIGEST_ALGS.get(len(digest) * 2) != alg:
                raise EnrollFailed("firmware", "the firmware digest must be a sha-256, sha-384 or sha-512 value "
                                               "(64, 96 or 128 hex digits)")
        else:
            return None
        name = name or meta.get("name")
        version = version or meta.get("version")
        if not name or not version:
            raise EnrollFailed("firmware", "give --firmware-name and --firmware-version (or DIR/firmware.json)")
        return cls(alg, digest, name, version)


def _gateway(uri: str) -> tuple[str, str]:
    try:
        parts = urlsplit(uri)
        parts.port                          # a port that is not a number in 0-65535 raises here
    except ValueError as exc:
        raise EnrollFailed("gateway", f"expected coaps://HOST[:PORT], got {uri!r} ({exc})") from None
    if parts.scheme != "coaps" or not parts.hostname:
        raise EnrollFailed("gateway", f"expected coaps://HOST[:PORT], got {uri!r}")
    return parts.hostname, f"coaps://{parts.netloc}"


def _problem(response) -> str:
    if response.opt.content_format == CT_PROBLEM:
        try:
            body = cbor2.loads(response.payload)
            return f"{response.code} {body.get(-1, '')}" + (f": {body[-2]}" if -2 in body else "")
        except Exception:
            pass
    text = response.payload.decode("utf-8", "replace")[:200]
    return f"{response.code}" + (f" {text}" if text else "")


async def _request(ctx, step: str, timeout: float, **kw):
    try:
        response = await asyncio.wait_for(ctx.request(aiocoap.Message(**kw)).response, timeout)
    except asyncio.TimeoutError:
        raise EnrollFailed(step, f"no answer from the gateway within {timeout:.0f} s") from None
    except DTLSHandshakeError as exc:
        text = str(exc)
        if text.startswith("server certificate refused"):
            raise EnrollFailed("connect", f"the gateway's certificate is not acceptable: {text}") from None
        hint = ("; the gateway refused this device's certificate (revoked, expired or unknown)"
                if "alert" in text else "")
        raise EnrollFailed("connect", f"the DTLS handshake failed ({text}){hint}") from None
    except OSError as exc:          # name resolution, unreachable network
        raise EnrollFailed("connect", f"cannot reach the gateway: {exc.strerror or exc}") from None
    except aiocoap.error.Error as exc:
        raise EnrollFailed(step, str(exc) or exc.__class__.__name__) from None
    if not response.code.is_successful():
        raise EnrollFailed(step, _problem(response))
    return response


def device_csr(key: ec.EllipticCurvePrivateKey, serial: str) -> bytes:
    """The DER CSR a device sends to /sen or /sren (the CA takes only its key)."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}")]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


def serial_of(cert: x509.Certificate) -> str:
    """The device serial in a device certificate's subject (serialNumber), or ''."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return attrs[0].value if attrs else ""


def pen_of(cert: x509.Certificate) -> int | None:
    """The manufacturer's PEN from the certificate's `urn:dev:os:<PEN>-<serial>` SAN, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("urn:dev:os:"):
            pen = uri[len("urn:dev:os:"):].split("-", 1)[0]
            if pen.isdigit():
                return int(pen)
    return None


def check_operational(der_or_p7: bytes, key: ec.EllipticCurvePrivateKey, factory: x509.Certificate,
                      root: x509.Certificate) -> list[x509.Certificate]:
    """The certificate(s) from /sen or /sren: [leaf, operational CA], validated to our root, for
    our key and our serial. Raises EnrollFailed."""
    try:
        certs = pkcs7.load_der_pkcs7_certificates(der_or_p7)
    except ValueError:
        try:
            certs = [x509.load_der_x509_certificate(der_or_p7)]
        except ValueError:
            raise EnrollFailed("certificate", "the gateway's answer is not a certificate") from None
    leaf = next((c for c in certs if c.public_key() == key.public_key()), None)
    if leaf is None:
        raise EnrollFailed("certificate", "no certificate for the new key in the answer")
    chain = [c for c in certs if c is not leaf]
    try:
        PolicyBuilder().store(Store([root])).time(datetime.now(timezone.utc)) \
            .build_client_verifier().verify(leaf, chain)
    except Exception as exc:
        raise EnrollFailed("certificate", f"the new certificate does not validate to the root: {exc}") from None
    if serial_of(leaf) != serial_of(factory):
        raise EnrollFailed("certificate", f"issued for {serial_of(leaf)!r}, not this device")
    return [leaf, *chain]


@dataclass
class EnrollResult:
    serial: str
    certificate: x509.Certificate
    verdict: str | None
    config: dict
    seconds: float
    steps: dict[str, float]


async def enroll(directory: Path, gateway_uri: str, firmware: Firmware | None, *, timeout: float = 30.0,
                 report: Callable[[str, str], None] = lambda step, text: None,
                 secure_boot: bool = True, dbgstat: int = 2, bootcount: int = 1) -> EnrollResult:
    directory = Path(directory)
    host, base = _gateway(gateway_uri)
    started = time.perf_counter()
    steps: dict[str, float] = {}

    def mark(step: str, t0: float) -> None:
        steps[step] = time.perf_counter() - t0

    try:
        factory, _, factory_key, root = load_bundle(directory)
    except (BundleError, keys.KeyFileError) as exc:
        raise EnrollFailed("bundle", str(exc)) from None
    serial = serial_of(factory)
    t0 = time.perf_counter()
    try:
        ctx, _ = await device_context(directory, host, handshake_timeout=timeout)
    except Exception as exc:
        raise EnrollFailed("connect", str(exc)) from None
    verdict = None
    try:
        if firmware is not None:
            r = await _request(ctx, "nonce", timeout, code=codes.GET, uri=f"{base}/attest/nonce")
            mark("nonce", t0)
            nonce = cbor2.loads(r.payload)["nonce"]
            report("nonce", f"{len(nonce)} bytes, from {base}")
            t0 = time.perf_counter()
            pub = factory_key.public_key().public_bytes(serialization.Encoding.X962,
                                                        serialization.PublicFormat.UncompressedPoint)
            evidence = Evidence(nonce=nonce, ueid=b"\x01" + hashlib.sha256(pub).digest()[:16],
                                oemid=pen_of(factory) or 0,
                                hwmodel=device_type_of(factory).encode(), swname=firmware.name,
                                swversion=firmware.version, fw_alg=firmware.alg, fw_digest=firmware.digest,
                                secure_boot=secure_boot, dbgstat=dbgstat, bootcount=bootcount,
                                iat=int(time.time()), swversion_scheme=1)
            token = sign_evidence(evidence, factory_key)
            r = await _request(ctx, "evidence", timeout, code=codes.POST, uri=f"{base}/attest/evidence",
                               payload=token, content_format=CT_CBOR)
            mark("evidence", t0)
            result = cbor2.loads(r.payload)
            verdict = result.get("verdict")
            reasons = ", ".join(x.get("code", "?") for x in result.get("reasons", [])) or "no findings"
            report("evidence", f"verdict {verdict} ({reasons})")
            if not result.get("acceptable"):
                raise EnrollFailed("evidence", f"verdict {verdict}: {reasons}")
        t0 = time.perf_counter()
        op_key = ec.generate_private_key(ec.SECP256R1())
        r = await _request(ctx, "enroll", timeout, code=codes.POST, uri=f"{base}/.well-known/est/sen",
                           payload=device_csr(op_key, serial), content_format=CT_PKCS10, accept=CT_PKCS7_CERTS)
        chain = check_operational(r.payload, op_key, factory, root)
        mark("enroll", t0)
        report("enroll", f"operational certificate {chain[0].serial_number:x}, valid until "
                         f"{chain[0].not_valid_after_utc:%Y-%m-%d}")
        _store_operational(directory, op_key, chain)
        t0 = time.perf_counter()
        config = await _get_config(ctx, base, directory, timeout)     # same session: one handshake
        mark("config", t0)
    finally:
        await ctx.shutdown()
    report("config", f"configuration for {config.get('device_type')} ({len(config.get('trust_anchors', []))} "
                     "trust anchors)")
    return EnrollResult(serial, chain[0], verdict, config, time.perf_counter() - started, steps)


def device_type_of(cert: x509.Certificate) -> str:
    """The device type from the certificate's private extension (the only UTF8String extension
    value devid puts in device certificates)."""
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            try:
                return der.decode_utf8_string(ext.value.value)
            except der.DERError:
                continue
    return ""


def _store_operational(directory: Path, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> None:
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
    write_atomic(directory / "op-key.pem", keys.plain_key(key), 0o600)
    write_atomic(directory / "op-cert.pem", pem[0])
    write_atomic(directory / "op-chain.pem", b"".join(pem))


async def fetch_config(directory: Path, gateway_uri: str, timeout: float = 30.0) -> dict:
    """GET /config with the operational identity (a new session)."""
    host, base = _gateway(gateway_uri)
    try:
        ctx, _ = await device_context(directory, host, cert_name="op-chain.pem", key_name="op-key.pem",
                                      handshake_timeout=timeout)
    except Exception as exc:
        raise EnrollFailed("config", f"cannot connect with the operational identity: {exc}") from None
    try:
        return await _get_config(ctx, base, directory, timeout)
    finally:
        await ctx.shutdown()


async def _get_config(ctx, base: str, directory: Path, timeout: float) -> dict:
    r = await _request(ctx, "config", timeout, code=codes.GET, uri=f"{base}/config", accept=CT_CBOR)
    try:
        config = cbor2.loads(r.payload)
    except Exception:
        raise EnrollFailed("config", "the configuration is not CBOR") from None
    write_atomic(directory / "config.cbor", r.payload)
    view = dict(config, trust_anchors=[x509.load_der_x509_certificate(d).public_bytes(
        serialization.Encoding.PEM).decode() for d in config.get("trust_anchors", [])])
    write_atomic(directory / "config.json", (json.dumps(view, indent=2) + "\n").encode())
    return config


async def renew(directory: Path, gateway_uri: str, *, timeout: float = 30.0,
                report: Callable[[str, str], None] = lambda step, text: None) -> x509.Certificate:
    directory = Path(directory)
    host, base = _gateway(gateway_uri)
    try:
        factory, _, _, root = load_bundle(directory)
        load_bundle(directory, "op-chain.pem", "op-key.pem")
    except (BundleError, keys.KeyFileError) as exc:
        raise EnrollFailed("bundle", f"{exc} (enroll the device first)") from None
    try:
        ctx, _ = await device_context(directory, host, cert_name="op-chain.pem", key_name="op-key.pem",
                                      handshake_timeout=timeout)
    except Exception as exc:
        raise EnrollFailed("connect", str(exc)) from None
    try:
        key = ec.generate_private_key(ec.SECP256R1())
        r = await _request(ctx, "renew", timeout, code=codes.POST, uri=f"{base}/.well-known/est/sren",
                           payload=device_csr(key, serial_of(factory)), content_format=CT_PKCS10, accept=CT_PKCS7_CERTS)
        chain = check_operational(r.payload, key, factory, root)
    finally:
        await ctx.shutdown()
    _store_operational(directory, key, chain)
    report("renew", f"operational certificate {chain[0].serial_number:x}, valid until "
                    f"{chain[0].not_valid_after_utc:%Y-%m-%d}")
    return chain[0]
