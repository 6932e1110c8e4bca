#!/usr/bin/env python3
"""A lean load generator for the gateway's zero-touch enrollment and renewal.

    python benchmarks/loadgen.py --gateway coaps://127.0.0.1:PORT --bundles DIR [--concurrency C] [--renew]

Per device, ONE DTLS 1.2 session (mutual X.509 authentication, the gateway's certificate
checked) and, over it, the same protocol as the field engineer's script (`gateway/device/enroll.py`):

    enroll   factory identity:  GET /attest/nonce, POST /attest/evidence (an EAT signed with the
             factory key by `attestation.evidence.sign_evidence`), POST /.well-known/est/sen (a DER
             CSR of a new P-256 key, Accept 287), GET /config (Accept 60)
    renew    operational identity:  POST /.well-known/est/sren

Every answer is checked: response codes, the nonce, an acceptable verdict, the issued
certificate (for the new key, the device's serial, validated to the operational CA) and the
configuration (CBOR, for this device).

What makes it lean, compared with the script (gateway/device/simulator.py):
- the sans-I/O `ClientEngine` on one non-blocking UDP socket per session, no aiocoap Context;
  CoAP requests and responses through the small codec below (CON requests with piggybacked or
  separate responses, Block2 for large answers, retransmission after ACK_TIMEOUT);
- one pyOpenSSL Context per process for all devices (each connection gets its device's
  certificate and key), bundles loaded and keys converted before the timed run;
- trust: before the timed run, each process validates the gateway's chain to the root and gets
  the CA certificates from EST /crts (each checked to be issued by the root). The operational CA
  is then a trust anchor for the handshakes and the issued certificates, so the P-384 root
  signature (0.7 ms here) is not checked again per device (the gateway does the same with its
  issuing CAs). `--full-chain` checks every chain up to the root instead;
- no files written during the run; operational identities are saved afterwards (op-key.pem,
  op-cert.pem, op-chain.pem, as the script does) so that --renew can use them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.hazmat.primitives.serialization import pkcs7  # noqa: E402
from cryptography.x509.verification import PolicyBuilder, Store  # noqa: E402
from OpenSSL import SSL, crypto  # noqa: E402

from devid.attestation.evidence import Evidence, sign_evidence  # noqa: E402
from devid.gateway.device.client import load_bundle  # noqa: E402
from devid.gateway.device.enroll import Firmware, device_csr, device_type_of, pen_of, serial_of  # noqa: E402
from devid.gateway.dtls import contexts  # noqa: E402
from devid.gateway.dtls.engine import (ApplicationData, ClientEngine, HandshakeComplete, HandshakeFailed,  # noqa: E402
                                 SessionClosed)

ACK_TIMEOUT = 2.0           # RFC 7252 4.8 (without the random factor: a load generator wants it plain)
CT_CBOR, CT_PROBLEM, CT_PKCS7_CERTS, CT_PKCS10, CT_PKIX_CERT = 60, 257, 281, 286, 287

# -- CoAP (RFC 7252, Block2 of RFC 7959): just what this client sends and reads -----------------

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST = 1, 2
OPT_URI_PATH, OPT_CONTENT_FORMAT, OPT_ACCEPT, OPT_BLOCK2 = 11, 12, 17, 23


def _uint(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _ext(n: int) -> tuple[int, bytes]:
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    """Options as (number, value) pairs, in ascending order of number."""
    out = bytearray()
    last = 0
    for number, value in options:
        d, dx = _ext(number - last)
        n, nx = _ext(len(value))
        out.append(d << 4 | n)
        out += dx
        out += nx
        out += value
        last = number
    return bytes(out)


def request_options(path: str, content_format: int | None = None, accept: int | None = None) -> list:
    opts = [(OPT_URI_PATH, seg.encode()) for seg in path.strip("/").split("/")]
    if content_format is not None:
        opts.append((OPT_CONTENT_FORMAT, _uint(content_format)))
    if accept is not None:
        opts.append((OPT_ACCEPT, _uint(accept)))
    return opts


def encode_message(mtype: int, code: int, mid: int, token: bytes, options: bytes, payload: bytes = b"") -> bytes:
    head = bytes((0x40 | mtype << 4 | len(token), code, mid >> 8, mid & 0xFF)) + token + options
    return head + b"\xff" + payload if payload else head


class Response:
    __slots__ = ("mtype", "code", "mid", "token", "content_format", "block2", "payload")

    def __init__(self, mtype, code, mid, token, content_format, block2, payload) -> None:
        self.mtype, self.code, self.mid, self.token = mtype, code, mid, token
        self.content_format, self.block2, self.payload = content_format, block2, payload

    @property
    def code_text(self) -> str:
        return f"{self.code >> 5}.{self.code & 31:02d}"


def decode_message(data: bytes) -> Response:
    """Raises ValueError for a malformed message."""
    if len(data) < 4 or data[0] >> 6 != 1:
        raise ValueError("not a CoAP version 1 message")
    tkl = data[0] & 15
    if tkl > 8 or len(data) < 4 + tkl:
        raise ValueError("bad token length")
    pos, n, number = 4 + tkl, len(data), 0
    content_format = block2 = None
    payload = b""
    while pos < n:
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            payload = data[pos:]
            if not payload:
                raise ValueError("payload marker without payload")
            break
        delta, length = byte >> 4, byte & 15
        if delta == 15 or length == 15:
            raise ValueError("reserved option nibble")
        if delta == 13:
            delta, pos = data[pos] + 13, pos + 1
        elif delta == 14:
            delta, pos = int.from_bytes(data[pos:pos + 2], "big") + 269, pos + 2
        if length == 13:
            length, pos = data[pos] + 13, pos + 1
        elif length == 14:
            length, pos = int.from_bytes(data[pos:pos + 2], "big") + 269, pos + 2
        number += delta
        value = data[pos:pos + length]
        if len(value) != length:
            raise ValueError("truncated option")
        pos += length
        if number == OPT_CONTENT_FORMAT:
            content_format = int.from_bytes(value, "big")
        elif number == OPT_BLOCK2:
            block2 = int.from_bytes(value, "big")
    return Response(data[0] >> 4 & 3, data[1], int.from_bytes(data[2:4], "big"), data[4:4 + tkl],
                    content_format, block2, payload)


def problem_text(r: Response) -> str:
    """`4.03 title: detail` from an RFC 9290 problem details answer, else the code and some text."""
    if r.content_format == CT_PROBLEM:
        try:
            body = cbor2.loads(r.payload)
            return f"{r.code_text} {body.get(-1, '')}" + (f": {body[-2]}" if -2 in body else "")
        except Exception:
            pass
    text = r.payload[:200].decode("utf-8", "replace")
    return r.code_text + (f" {text}" if text else "")


# requests, encoded once
NONCE_OPTS = request_options("attest/nonce")
EVIDENCE_OPTS = request_options("attest/evidence", CT_CBOR)
SEN_OPTS = request_options(".well-known/est/sen", CT_PKCS10, CT_PKIX_CERT)
SREN_OPTS = request_options(".well-known/est/sren", CT_PKCS10, CT_PKIX_CERT)
CONFIG_OPTS = request_options("config", accept=CT_CBOR)
CRTS_OPTS = request_options(".well-known/est/crts", accept=CT_PKCS7_CERTS)


# -- devices -------------------------------------------------------------------------------------

class Failed(Exception):
    """One device's failure: the step it failed in and why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason


@dataclass
class Device:
    """A device bundle, loaded: what one session needs, converted before the run."""

    directory: Path
    serial: str                      # from the factory certificate
    device_type: str
    key: ec.EllipticCurvePrivateKey  # the identity the session authenticates with
    intermediates: tuple[bytes, ...] # DER, sent after the leaf (the Context's extra chain certs)
    root: x509.Certificate
    x509: crypto.X509
    pkey: crypto.PKey
    factory_key: ec.EllipticCurvePrivateKey | None = None   # for the evidence (enroll mode)
    ueid: bytes = b""
    oemid: int = 0


def load_device(directory: Path, operational: bool = False) -> Device:
    """Raises gateway.client.BundleError or ca.keys.KeyFileError."""
    factory, f_inter, f_key, root = load_bundle(directory)
    if operational:
        leaf, inter, key, root = load_bundle(directory, "op-chain.pem", "op-key.pem")
    else:
        leaf, inter, key = factory, f_inter, f_key
    pub = f_key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return Device(Path(directory), serial_of(factory), device_type_of(factory), key,
                  tuple(c.public_bytes(serialization.Encoding.DER) for c in inter), root,
                  crypto.X509.from_cryptography(leaf), crypto.PKey.from_cryptography_key(key),
                  factory_key=f_key, ueid=b"\x01" + hashlib.sha256(pub).digest()[:16], oemid=pen_of(factory) or 0)


# -- trust -----------------------------------------------------------------------------------------

class Trust:
    """What one client process trusts: the root of the bundles, and after `pin`, the CA
    certificates it got from the gateway's EST /crts (each checked to be issued by the root)."""

    def __init__(self, root: x509.Certificate, host: str, full_chain: bool = False) -> None:
        self.root = root
        self.host = host
        self.full_chain = full_chain
        self.cas: list[x509.Certificate] = []          # validated issuing CAs (from /crts)
        self._contexts: dict[tuple, SSL.Context] = {}
        self._server_ok: dict[tuple, tuple[float, str]] = {}
        self._verifier = None
        self._verifier_at = 0.0
        self._issuers: dict[bytes, list[x509.Certificate]] = {}
        try:
            import ipaddress
            self._subject = x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            self._subject = x509.DNSName(host)

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.root] if self.full_chain or not self.cas else self.cas

    def pin(self, certs: list[x509.Certificate], now: datetime) -> None:
        cas = []
        for c in certs:
            if c == self.root:
                continue
            try:
                c.verify_directly_issued_by(self.root)
                ca = c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            except Exception as exc:
                raise Failed("trust", f"CA certificate {c.subject.rfc4514_string()} from /crts is not "
                                      f"issued by the root: {exc}") from None
            if not ca or not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise Failed("trust", f"{c.subject.rfc4514_string()} from /crts is not a valid CA certificate")
            cas.append(c)
        if not cas:
            raise Failed("trust", "the gateway's /crts holds no CA certificate besides the root")
        self.cas = cas
        self._issuers.clear()
        self._contexts.clear()
        self._server_ok.clear()
        self._verifier = None

    def context(self, device: Device) -> SSL.Context:
        """One Context per set of intermediates (in practice: one per process)."""
        ctx = self._contexts.get(device.intermediates)
        if ctx is None:
            chain = [x509.load_der_x509_certificate(d) for d in device.intermediates]
            ctx = self._contexts[device.intermediates] = contexts.client_context(None, chain, None, self.anchors)
        return ctx

    def check_server(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> str:
        """ClientEngine's server check, after OpenSSL's own chain check of this handshake: path
        validation with serverAuth and the host name. A chain that passed it in the last minute
        is not validated again (an identical certificate chain, compared byte for byte)."""
        key = (leaf.public_bytes(serialization.Encoding.DER),
               *(c.public_bytes(serialization.Encoding.DER) for c in intermediates))
        now = time.monotonic()
        hit = self._server_ok.get(key)
        if hit is not None and now - hit[0] < 60:
            return hit[1]
        verifier = (PolicyBuilder().store(Store(self.anchors)).time(datetime.now(timezone.utc))
                    .build_server_verifier(self._subject))
        verifier.verify(leaf, intermediates)
        name = leaf.subject.rfc4514_string()
        self._server_ok[key] = (now, name)
        return name

    def issuers_of(self, cert: x509.Certificate) -> list[x509.Certificate]:
        """The pinned CA certificates named as `cert`'s issuer (for op-chain.pem)."""
        issuer = cert.issuer.public_bytes()
        found = self._issuers.get(issuer)
        if found is None:
            found = self._issuers[issuer] = [c for c in self.cas if c.subject.public_bytes() == issuer]
        return found

    def check_issued(self, der_cert: bytes, key: ec.EllipticCurvePrivateKey, serial: str) -> x509.Certificate:
        """The certificate from /sen or /sren: for our new key, our serial, valid to the anchors."""
        try:
            cert = x509.load_der_x509_certificate(der_cert)
        except ValueError:
            raise Failed("certificate", "the gateway's answer is not a DER certificate") from None
        if cert.public_key() != key.public_key():
            raise Failed("certificate", "the certificate is not for the new key")
        got = serial_of(cert)
        if got != serial:
            raise Failed("certificate", f"issued for {got!r}, not {serial!r}")
        now = time.monotonic()
        if self._verifier is None or now - self._verifier_at > 60:
            self._verifier = (PolicyBuilder().store(Store(self.anchors)).time(datetime.now(timezone.utc))
                              .build_client_verifier())
            self._verifier_at = now
        try:
            self._verifier.verify(cert, self.cas if self.full_chain else [])
        except Exception as exc:
            raise Failed("certificate", f"the certificate does not validate: {exc}") from None
        return cert


# -- one DTLS session with CoAP on it ----------------------------------------------------------------

class Session:
    """One device's DTLS session on its own connected UDP socket, one CoAP request at a time."""

    __slots__ = ("loop", "sock", "engine", "timer", "ready", "pending", "mid", "tok", "closed")
    # of all sessions of this process: DTLS handshake timer expiries (retransmissions) and CoAP
    # request retransmissions; a sign of lost datagrams or of a gateway slower than the timers
    counters = {"dtls_timeouts": 0, "coap_retransmissions": 0}

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple, family: int, ctx: SSL.Context,
                 device: Device, trust: Trust, timeout: float) -> None:
        self.loop = loop
        # pyOpenSSL key and certificate objects converted once, before the run (converting from
        # cryptography objects costs ~0.1 ms per connection); pyOpenSSL calls that deprecated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.engine = ClientEngine(ctx, peer, handshake_timeout=timeout, server_check=trust.check_server,
                                       certificate=device.x509, private_key=device.pkey, takeover=True)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(peer)
        self.timer: asyncio.TimerHandle | None = None
        self.ready: asyncio.Future | None = None
        self.pending: _Exchange | None = None
        self.mid = int.from_bytes(os.urandom(2), "big")
        self.tok = 0
        self.closed: str | None = None
        loop.add_reader(self.sock.fileno(), self._readable)

    # -- datagrams and events

    def _readable(self) -> None:
        recv, engine, loop = self.sock.recv, self.engine, self.loop
        while True:
            try:
                data = recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:            # ICMP port unreachable and the like
                self._fail(f"cannot reach the gateway: {exc.strerror or exc}")
                return
            self._process(engine.receive(data, loop.time()))
            if self.closed:
                return

    def _process(self, out) -> None:
        send = self.sock.send
        for _, datagram in out.datagrams:
            try:
                send(datagram)
            except (BlockingIOError, InterruptedError):
                pass                          # lost like any datagram: retransmission covers it
            except OSError as exc:
                self._fail(f"cannot reach the gateway: {exc.strerror or exc}")
                return
        for ev in out.events:
            if type(ev) is ApplicationData:
                self._coap(ev.data)
            elif type(ev) is HandshakeComplete:
                if self.ready is not None and not self.ready.done():
                    self.ready.set_result(None)
            elif type(ev) is HandshakeFailed:
                self._fail(f"the DTLS handshake failed ({ev.reason})")
            elif type(ev) is SessionClosed:
                self._fail(f"the gateway ended the DTLS session ({ev.reason})")
        if self.ready is not None and not self.ready.done():
            self._arm(self.engine.next_deadline())

    def _fail(self, reason: str) -> None:
        if self.closed is None:
            self.closed = reason
        for fut in (self.ready, self.pending.future if self.pending else None):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(reason))

    def _arm(self, when: float | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None if when is None else self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.loop.time()
        if self.ready is not None and not self.ready.done():
            Session.counters["dtls_timeouts"] += 1
            self._process(self.engine.handle_timeouts(now))
            return
        ex = self.pending
        if ex is None or ex.future.done():
            return
        if now >= ex.deadline:
            ex.future.set_exception(TimeoutError())
            return
        if not ex.acked:                      # CON retransmission with exponential back-off
            Session.counters["coap_retransmissions"] += 1
            ex.interval *= 2
            self._send(ex.message)
        self._arm(min(ex.deadline, now + ex.interval) if not ex.acked else ex.deadline)

    def _send(self, message: bytes) -> None:
        try:
            self._process(self.engine.send(message, self.loop.time()))
        except (ConnectionError, SSL.Error) as exc:
            self._fail(f"cannot send: {exc}")

    def _coap(self, data: bytes) -> None:
        try:
            m = decode_message(data)
        except ValueError:
            return
        ex = self.pending
        if m.mtype == CON:                     # a separate response (or anything else): ACK it
            self._send(encode_message(ACK, 0, m.mid, b"", b""))
        if ex is None or ex.future.done():
            return
        if m.mtype == RST and m.mid == ex.mid:
            ex.future.set_exception(ConnectionError("the gateway reset the request (RST)"))
        elif m.mtype == ACK and m.mid == ex.mid and m.code == 0:
            ex.acked = True                   # empty ACK: the response comes separately
            self._arm(ex.deadline)
        elif m.token == ex.token and m.code != 0 and (m.mtype != ACK or m.mid == ex.mid):
            ex.future.set_result(m)

    # -- the API

    async def connect(self, timeout: float) -> None:
        self.ready = self.loop.create_future()
        self._process(self.engine.start(self.loop.time()))
        try:
            await self.ready
        finally:
            self._arm(None)
            self.ready = None

    async def request(self, code: int, options: list, payload: bytes, timeout: float) -> Response:
        """One CON request; its response (payload of all Block2 blocks). Raises TimeoutError and
        ConnectionError."""
        body = b""
        block = None
        while True:
            opts = options if block is None else [*options, (OPT_BLOCK2, _uint(block))]
            r = await self._exchange(code, encode_options(opts), payload, timeout)
            if r.block2 is None:
                if body:
                    r.payload = body + r.payload
                return r
            num, more, szx = r.block2 >> 4, r.block2 >> 3 & 1, r.block2 & 7
            if num * (16 << szx) != len(body):
                raise ConnectionError(f"unexpected Block2 block {num} (have {len(body)} bytes)")
            body += r.payload
            if not more or r.code >> 5 != 2:
                r.payload = body
                return r
            block = (num + 1) << 4 | szx

    async def _exchange(self, code: int, options: bytes, payload: bytes, timeout: float) -> Response:
        if self.closed:
            raise ConnectionError(self.closed)
        self.mid = (self.mid + 1) & 0xFFFF
        self.tok = (self.tok + 1) & 0xFFFF
        token = self.tok.to_bytes(2, "big")
        message = encode_message(CON, code, self.mid, token, options, payload)
        now = self.loop.time()
        ex = self.pending = _Exchange(self.mid, token, message, self.loop.create_future(), now + timeout)
        self._send(message)
        self._arm(min(ex.deadline, now + ex.interval))
        try:
            return await ex.future
        finally:
            self._arm(None)
            self.pending = None

    def close(self) -> None:
        self._arm(None)
        try:
            self._process(self.engine.close(self.loop.time()))
        except Exception:
            pass
        self.closed = self.closed or "closed"
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class _Exchange:
    __slots__ = ("mid", "token", "message", "future", "deadline", "interval", "acked")

    def __init__(self, mid, token, message, future, deadline) -> None:
        self.mid, self.token, self.message, self.future, self.deadline = mid, token, message, future, deadline
        self.interval = ACK_TIMEOUT
        self.acked = False


# -- the flows ---------------------------------------------------------------------------------------

@dataclass
class Target:
    uri: str
    host: str
    peer: tuple
    family: int

    @classmethod
    def parse(cls, uri: str) -> "Target":
        parts = urlsplit(uri)
        if parts.scheme != "coaps" or not parts.hostname:
            raise ValueError(f"expected coaps://HOST[:PORT], got {uri!r}")
        info = socket.getaddrinfo(parts.hostname, parts.port or 5684, type=socket.SOCK_DGRAM)[0]
        return cls(uri, parts.hostname, info[4][:2], info[0])


@dataclass
class Outcome:
    serial: str
    seconds: float
    steps: dict[str, float]
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]      # after the leaf, for op-chain.pem
    verdict: str | None = None


async def _call(sess: Session, step: str, code: int, options: list, payload: bytes, timeout: float,
                ok: int) -> Response:
    try:
        r = await sess.request(code, options, payload, timeout)
    except TimeoutError:
        raise Failed(step, f"no answer from the gateway within {timeout:.0f} s") from None
    except ConnectionError as exc:
        raise Failed(step, str(exc)) from None
    if r.code != ok:
        raise Failed(step, problem_text(r))
    return r


def _cbor(step: str, r: Response) -> dict:
    if r.content_format != CT_CBOR:
        raise Failed(step, f"content format {r.content_format}, expected CBOR ({CT_CBOR})")
    try:
        body = cbor2.loads(r.payload)
    except Exception:
        raise Failed(step, "the answer is not CBOR") from None
    if not isinstance(body, dict):
        raise Failed(step, "the answer is not a CBOR map")
    return body


CONTENT, CHANGED = 0x45, 0x44


async def _connect(loop, target: Target, dev: Device, trust: Trust, timeout: float) -> Session:
    sess = Session(loop, target.peer, target.family, trust.context(dev), dev, trust, timeout)
    try:
        await sess.connect(timeout)
    except ConnectionError as exc:
        sess.close()
        text = str(exc)
        if "server certificate refused" in text:
            raise Failed("connect", f"the gateway's certificate is not acceptable: {text}") from None
        raise Failed("connect", text) from None
    return sess


async def enroll_device(target: Target, dev: Device, trust: Trust, firmware: Firmware, timeout: float,
                        secure_boot: bool = True, dbgstat: int = 2, bootcount: int = 1) -> Outcome:
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    started = clock()
    steps: dict[str, float] = {}
    sess = await _connect(loop, target, dev, trust, timeout)
    try:
        t = clock()
        steps["connect"] = t - started
        r = await _call(sess, "nonce", GET, NONCE_OPTS, b"", timeout, CONTENT)
        nonce = _cbor("nonce", r).get("nonce")
        if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
            raise Failed("nonce", "the answer holds no nonce of 8 to 64 bytes")
        t, steps["nonce"] = clock(), clock() - t

        evidence = Evidence(nonce=nonce, ueid=dev.ueid, oemid=dev.oemid, hwmodel=dev.device_type.encode(),
                            swname=firmware.name, swversion=firmware.version, fw_alg=firmware.alg,
                            fw_digest=firmware.digest, secure_boot=secure_boot, dbgstat=dbgstat,
                            bootcount=bootcount, iat=int(time.time()), swversion_scheme=1)
        token = sign_evidence(evidence, dev.factory_key)
        r = await _call(sess, "evidence", POST, EVIDENCE_OPTS, token, timeout, CHANGED)
        result = _cbor("evidence", r)
        verdict = result.get("verdict")
        if result.get("acceptable") is not True:
            reasons = ", ".join(str(x.get("code", "?")) for x in result.get("reasons", []) if isinstance(x, dict))
            raise Failed("evidence", f"verdict {verdict}: {reasons or 'no findings'}")
        t, steps["evidence"] = clock(), clock() - t

        op_key = ec.generate_private_key(ec.SECP256R1())
        r = await _call(sess, "enroll", POST, SEN_OPTS, device_csr(op_key, dev.serial), timeout, CHANGED)
        if r.content_format != CT_PKIX_CERT:
            raise Failed("enroll", f"content format {r.content_format}, expected {CT_PKIX_CERT}")
        try:
            cert = trust.check_issued(r.payload, op_key, dev.serial)
        except Failed as exc:
            raise Failed("enroll", exc.reason) from None
        t, steps["enroll"] = clock(), clock() - t

        r = await _call(sess, "config", GET, CONFIG_OPTS, b"", timeout, CONTENT)
        config = _cbor("config", r)
        if config.get("device") != dev.serial or config.get("device_type") != dev.device_type:
            raise Failed("config", f"configuration for {config.get('device')!r} ({config.get('device_type')!r}), "
                                   f"not this device")
        if not isinstance(config.get("trust_anchors"), list) or not config["trust_anchors"]:
            raise Failed("config", "the configuration holds no trust anchors")
        end = clock()
        steps["config"] = end - t
    finally:
        sess.close()
    return Outcome(dev.serial, end - started, steps, cert, op_key, trust.issuers_of(cert), verdict)


async def renew_device(target: Target, dev: Device, trust: Trust, timeout: float) -> Outcome:
    loop = asyncio.get_running_loop()
    clock = time.perf_counter
    started = clock()
    steps: dict[str, float] = {}
    sess = await _connect(loop, target, dev, trust, timeout)
    try:
        t = clock()
        steps["connect"] = t - started
        key = ec.generate_private_key(ec.SECP256R1())
        r = await _call(sess, "renew", POST, SREN_OPTS, device_csr(key, dev.serial), timeout, CHANGED)
        if r.content_format != CT_PKIX_CERT:
            raise Failed("renew", f"content format {r.content_format}, expected {CT_PKIX_CERT}")
        try:
            cert = trust.check_issued(r.payload, key, dev.serial)
        except Failed as exc:
            raise Failed("renew", exc.reason) from None
        end = clock()
        steps["renew"] = end - t
    finally:
        sess.close()
    return Outcome(dev.serial, end - started, steps, cert, key, trust.issuers_of(cert))


async def fetch_ca_certs(target: Target, dev: Device, trust: Trust, timeout: float = 30.0) -> None:
    """Before the timed run: one session with the full chain check to the root, EST /crts, and
    the operational CA pinned as an anchor (unless --full-chain)."""
    sess = await _connect(asyncio.get_running_loop(), target, dev, trust, timeout)
    try:
        r = await _call(sess, "crts", GET, CRTS_OPTS, b"", timeout, CONTENT)
    finally:
        sess.close()
    try:
        certs = pkcs7.load_der_pkcs7_certificates(r.payload)
    except ValueError:
        raise Failed("crts", "the answer is not a PKCS#7 certificate bag") from None
    trust.pin(certs, datetime.now(timezone.utc))


# -- a run ----------------------------------------------------------------------------------------------

@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)     # serial -> "step: reason"
    seconds: float = 0.0
    cpu_seconds: float = 0.0          # this process, over the run
    counters: dict = field(default_factory=dict)   # Session.counters over the run

    def summary(self) -> dict:
        lat = [o.seconds for o in self.outcomes]
        names = ("connect", "nonce", "evidence", "enroll", "config", "renew")
        return {"done": len(self.outcomes), "errors": len(self.failures), "seconds": round(self.seconds, 3),
                "per_s": round(len(lat) / self.seconds, 1) if self.seconds else None,
                "latency_ms": {f"p{p}": pct(lat, p) for p in (50, 95, 99)},
                "step_latency_ms": {n: {f"p{p}": pct([o.steps[n] for o in self.outcomes if n in o.steps], p)
                                        for p in (50, 95, 99)}
                                    for n in names if any(n in o.steps for o in self.outcomes)},
                "client_cpu_ms_per_op": round(self.cpu_seconds * 1000 / len(lat), 3) if lat else None,
                **self.counters,
                "first_failures": dict(list(self.failures.items())[:5])}


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))] * 1000, 1)


async def run(target: Target, devices: list[Device], trust: Trust, *, renew: bool = False,
              firmware: Firmware | Callable[[Device], Firmware] | None = None, concurrency: int = 16,
              timeout: float = 30.0, started: Callable[[], None] | None = None) -> Report:
    """Enroll (or renew) every device, `concurrency` at a time. `started` is called right before
    the timed part (after the trust set-up)."""
    if not trust.cas and devices:
        for i, dev in enumerate(devices[:3]):     # a device the gateway refuses must not stop the run
            try:
                await fetch_ca_certs(target, dev, trust, timeout)
                break
            except Failed:
                if i == min(2, len(devices) - 1):
                    raise
    for dev in devices:                    # Contexts built before the timed part
        trust.context(dev)
    fw_of = firmware if callable(firmware) else (lambda dev: firmware)
    report = Report()
    queue = iter(devices)

    async def worker() -> None:
        for dev in queue:
            try:
                if renew:
                    outcome = await renew_device(target, dev, trust, timeout)
                else:
                    outcome = await enroll_device(target, dev, trust, fw_of(dev), timeout)
                report.outcomes.append(outcome)
            except Failed as exc:
                report.failures[dev.serial] = str(exc)
            except Exception as exc:           # a load generator reports, it does not crash
                report.failures[dev.serial] = f"unexpected: {exc!r}"

    if started is not None:
        started()
    before = dict(Session.counters)
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(devices))))))
    report.seconds = time.perf_counter() - t0
    report.cpu_seconds = time.process_time() - cpu0
    report.counters = {k: v - before[k] for k, v in Session.counters.items()}
    return report


def save_operational(devices: list[Device], report: Report) -> None:
    """After the run: op-key.pem (0600), op-cert.pem, op-chain.pem in each device's bundle."""
    by_serial = {d.serial: d for d in devices}
    for o in report.outcomes:
        directory = by_serial[o.serial].directory
        pem = [c.public_bytes(serialization.Encoding.PEM) for c in (o.cert, *o.chain)]
        key = o.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        for name, data, mode in (("op-key.pem", key, 0o600), ("op-cert.pem", pem[0], 0o644),
                                 ("op-chain.pem", b"".join(pem), 0o644)):
            tmp = directory / f".{name}.tmp-{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            os.replace(tmp, directory / name)


def load_devices(bundles: Iterable[Path], operational: bool = False) -> tuple[list[Device], dict[str, str]]:
    devices, failures = [], {}
    for b in bundles:
        try:
            devices.append(load_device(Path(b), operational))
        except Exception as exc:
            failures[Path(b).name] = f"bundle: {exc}"
    return devices, failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", required=True, help="coaps://HOST:PORT")
    ap.add_argument("--bundles", required=True, type=Path, help="directory of device bundles (devid provision --out)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--renew", action="store_true", help="renew (EST /sren) with the operational identities")
    ap.add_argument("--timeout", type=float, default=30.0, help="per step (default 30 s)")
    ap.add_argument("--full-chain", action="store_true", help="check every chain up to the root (P-384) per device")
    ap.add_argument("--firmware-name"), ap.add_argument("--firmware-version")
    ap.add_argument("--firmware-digest", help="sha-256 hex (default: the bench firmware of bench_enroll.py)")
    ap.add_argument("--no-save", action="store_true", help="do not save the operational identities afterwards")
    ap.add_argument("--profile", type=Path, help="write a cProfile of the timed part to this file")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_enroll import FW_NAME, FW_VERSION, IMAGE
    fw = Firmware("sha-256", bytes.fromhex(args.firmware_digest) if args.firmware_digest
                  else hashlib.sha256(IMAGE).digest(), args.firmware_name or FW_NAME,
                  args.firmware_version or FW_VERSION)
    target = Target.parse(args.gateway)
    bundles = sorted(p for p in args.bundles.iterdir() if (p / "chain.pem").exists())
    devices, failures = load_devices(bundles, args.renew)
    if not devices:
        print(json.dumps({"error": "no loadable device bundles", "failures": dict(list(failures.items())[:5])}))
        return 1
    trust = Trust(devices[0].root, target.host, args.full_chain)
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
    try:
        report = asyncio.run(run(target, devices, trust, renew=args.renew, firmware=fw,
                                 concurrency=args.concurrency, timeout=args.timeout,
                                 started=prof.enable if prof else None))
    except Failed as exc:
        print(json.dumps({"error": f"set-up failed: {exc}"}))
        return 1
    if prof:
        prof.disable()
        prof.dump_stats(str(args.profile))
    report.failures.update(failures)
    if not args.no_save:
        save_operational(devices, report)
    print(json.dumps(dict(mode="renew" if args.renew else "enroll", devices=len(bundles),
                          client="lean", **report.summary()), indent=2))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
