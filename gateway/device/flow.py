"""The zero-touch flows, once, as sans-I/O generators (the h11 manner): a flow yields a `Request`
and is sent the `Reply` to it, or yields a `Done` when a step's answer has been accepted (its
value: the nonce, the verdict, the issued certificate, the configuration) and is sent None; it
returns its result or raises `EnrollFailed(step, reason)`.

    enroll_flow    the classic flow: GET /attest/nonce, POST /attest/evidence, POST /.well-known/est/sen,
                   GET /config (one session, factory identity; nonce and evidence only with firmware
                   to claim; with `session_nonce`, the session's exporter value, no GET /attest/nonce)
    renew_flow     POST /.well-known/est/sren (operational identity)

and, in flow_one.py, the one-request flow (the default): evidence inside the CSR, one POST
/.well-known/est/sen whose multipart-core answer carries the certificate, the configuration and
the verdict (`one_request_flow`, `renew_one_flow`).
    config_flow    GET /config
    crts_flow      GET /.well-known/est/crts

`drive` runs a flow over any transport: a coroutine `exchange(request) -> reply` (aiocoap's in
`client.py` for `devid enroll`, `renew` and `simulate`; the load generator's own DTLS sessions in
benchmarks/), timing each step, and hands each `Done` to the caller, who stores and reports.
Clock, key generation and the certificate check are passed in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Generator, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.gateway.device.identity import DeviceIdentity, Firmware, device_csr, new_p256_key, serial_of
from devid.gateway.device.protocol import (CONFIG, CONTENT, CRTS, CT_CBOR, CT_PKCS7_CERTS, CT_PKIX_CERT, EVIDENCE,
                                           NONCE, SEN, SREN, VALID, Answer, EnrollFailed, Endpoint, Reply, Request,
                                           cbor_map, check, config_etag)

T = TypeVar("T")
Verify = Callable[[x509.Certificate, list[x509.Certificate]], Any]


@dataclass(frozen=True)
class Done:
    """A step whose answer was accepted, and what it gave (an unacceptable verdict is given too,
    then the flow raises)."""

    step: str
    value: Any


Flow = Generator["Request | Done", "Reply | None", T]


@dataclass(frozen=True)
class Verdict:
    tier: str | None
    acceptable: bool
    reasons: tuple[str, ...]          # the reason codes
    log_seq: int | None = None        # the appraisal's entry in the gateway's attestation log, if said

    @property
    def reasons_text(self) -> str:
        return ", ".join(self.reasons) or "no findings"


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]     # the new certificate, then the CAs the answer held

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]


@dataclass(frozen=True)
class Config:
    data: dict
    raw: bytes                        # the answer as received (config.cbor)
    unchanged: bool = False           # the gateway said the configuration the device held is current


@dataclass(frozen=True)
class Enrolled:
    serial: str
    verdict: Verdict | None
    issued: Issued
    config: Config


# -- reading answers -----------------------------------------------------------------------------------

def read_nonce(reply: Reply) -> bytes:
    nonce = cbor_map("nonce", reply).get("nonce")
    if not isinstance(nonce, bytes) or not 8 <= len(nonce) <= 64:
        raise EnrollFailed("nonce", "the answer holds no nonce of 8 to 64 bytes")
    return nonce


def read_verdict(reply: Reply) -> Verdict:
    body = cbor_map("evidence", reply)
    reasons = body.get("reasons")
    codes = tuple(str(r.get("code", "?")) for r in reasons if isinstance(r, dict)) if isinstance(reasons, list) else ()
    tier = body.get("verdict")
    seq = body.get("log_seq")
    return Verdict(tier if isinstance(tier, str) else None, body.get("acceptable") is True, codes,
                   seq if type(seq) is int else None)


def read_certificates(reply: Reply) -> list[x509.Certificate]:
    """The certificates of a 287 (one DER certificate) or 281 (PKCS#7 certs-only) answer."""
    try:
        if reply.content_format == CT_PKIX_CERT:
            return [x509.load_der_x509_certificate(reply.payload)]
        return pkcs7.load_der_pkcs7_certificates(reply.payload)
    except ValueError:
        raise EnrollFailed("certificate", "the gateway's answer is not a certificate") from None


def find_leaf(certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey, serial: str) -> x509.Certificate:
    """The certificate of the answer for our new key and our serial; EnrollFailed at step
    `certificate` if there is none."""
    public = key.public_key()
    leaf = next((c for c in certs if c.public_key() == public), None)
    if leaf is None:
        raise EnrollFailed("certificate", "no certificate for the new key in the answer")
    got = serial_of(leaf)
    if got != serial:
        raise EnrollFailed("certificate", f"issued for {got!r}, not this device")
    return leaf


def check_issued(certs: list[x509.Certificate], key: ec.EllipticCurvePrivateKey, serial: str,
                 verify: Verify) -> list[x509.Certificate]:
    """[the certificate for `key`, the other certificates of the answer]: for our new key, our
    serial, and accepted by `verify(leaf, others)`. EnrollFailed at step `certificate`."""
    leaf = find_leaf(certs, key, serial)
    chain = [c for c in certs if c is not leaf]
    try:
        verify(leaf, chain)
    except Exception as exc:
        raise EnrollFailed("certificate", f"the new certificate does not validate to the root: {exc}") from None
    return [leaf, *chain]


def read_config(reply: Reply, serial: str | None = None, device_type: str | None = None) -> Config:
    """The configuration (a CBOR map) for this device: its serial and type if given, and trust anchors."""
    config = cbor_map("config", reply)
    if (serial is not None and config.get("device") != serial) or \
            (device_type is not None and config.get("device_type") != device_type):
        raise EnrollFailed("config", f"configuration for {config.get('device')!r} ({config.get('device_type')!r}), "
                                     "not this device")
    anchors = config.get("trust_anchors")
    if not isinstance(anchors, list) or not anchors or not all(isinstance(a, bytes) for a in anchors):
        raise EnrollFailed("config", "the configuration holds no trust anchors")
    return Config(config, bytes(reply.payload))


# -- the flows ---------------------------------------------------------------------------------------

def take_nonce(session_nonce: bytes | None) -> Flow[bytes]:
    """The nonce evidence carries: the session's (its exporter value, no request) when the
    session has one, else a server nonce (GET /attest/nonce, reported as step `nonce`)."""
    if session_nonce is not None:
        return session_nonce
    nonce = read_nonce((yield from ask(NONCE)))
    yield Done("nonce", nonce)
    return nonce


def ask(endpoint: Endpoint, payload: bytes = b"") -> Generator[Request, Reply, Reply]:
    """One request; its answer once `check` accepts it."""
    request = Request(endpoint, payload)
    reply = yield request
    return check(request, reply)


def enroll_flow(identity: DeviceIdentity, firmware: Firmware | None, verify: Verify, *,
                cert_format: int = CT_PKCS7_CERTS, new_key: Callable[[], ec.EllipticCurvePrivateKey] = new_p256_key,
                clock: Callable[[], float] = time.time, secure_boot: bool = True, dbgstat: int = 2,
                bootcount: int = 1, session_nonce: bytes | None = None) -> Flow[Enrolled]:
    """The first enrollment, in one session with the factory identity. Without firmware no
    evidence is sent (for device types whose policy waives attestation).

    `session_nonce`: the exporter value of the DTLS session the flow's requests go over
    (`ClientEngine.exporter`, docs/evidence.md#session-nonces), read once that session is up;
    the evidence then carries it and the flow asks for no server nonce."""
    verdict = None
    if firmware is not None:
        nonce = yield from take_nonce(session_nonce)
        token = identity.evidence(nonce, firmware, iat=int(clock()), secure_boot=secure_boot, dbgstat=dbgstat,
                                  bootcount=bootcount)
        verdict = read_verdict((yield from ask(EVIDENCE, token)))
        yield Done("evidence", verdict)          # reported even when it refuses: the device learns why
        if not verdict.acceptable:
            raise EnrollFailed("evidence", f"verdict {verdict.tier}: {verdict.reasons_text}")
    issued = yield from _issue(SEN[cert_format], identity.serial, verify, new_key)
    yield Done("enroll", issued)
    config = read_config((yield from ask(CONFIG)), identity.serial, identity.device_type)
    yield Done("config", config)
    return Enrolled(identity.serial, verdict, issued, config)


def renew_flow(serial: str, verify: Verify, *, cert_format: int = CT_PKCS7_CERTS,
               new_key: Callable[[], ec.EllipticCurvePrivateKey] = new_p256_key) -> Flow[Issued]:
    """A new operational certificate, in a session with the current operational identity."""
    issued = yield from _issue(SREN[cert_format], serial, verify, new_key)
    yield Done("renew", issued)
    return issued


def config_flow(serial: str | None = None, device_type: str | None = None,
                held: bytes | None = None) -> Flow[Config]:
    """GET /config; with `held` (the config.cbor the device keeps) a conditional GET with its
    ETag: 2.03 Valid means it is current, and it is read back as the answer (`unchanged`)."""
    request = Request(CONFIG, etag=None if held is None else config_etag(held))
    reply = check(request, (yield request))
    if reply.code == VALID:
        config = replace(read_config(Answer(CONTENT, CT_CBOR, held), serial, device_type), unchanged=True)
    else:
        config = read_config(reply, serial, device_type)
    yield Done("config", config)
    return config


def crts_flow() -> Flow[list[x509.Certificate]]:
    """The CA certificates of EST /crts (the root and the operational CA)."""
    reply = yield from ask(CRTS)
    try:
        certs = pkcs7.load_der_pkcs7_certificates(reply.payload)
    except ValueError:
        raise EnrollFailed("crts", "the answer is not a PKCS#7 certificate bag") from None
    yield Done("crts", certs)
    return certs


def _issue(endpoint: Endpoint, serial: str, verify: Verify, new_key) -> Generator[Request, Reply, Issued]:
    key = new_key()
    reply = yield from ask(endpoint, device_csr(key, serial))
    return Issued(key, check_issued(read_certificates(reply), key, serial, verify))


# -- driving a flow ------------------------------------------------------------------------------------

async def drive(flow: Flow[T], exchange: Callable[[Request], Awaitable[Reply]],
                on_step: Callable[[Done], None] | None = None, *, clock: Callable[[], float] = time.perf_counter,
                started: float | None = None) -> tuple[T, dict[str, float]]:
    """Run `flow`, each request through `exchange`; its result and the seconds of each step. The
    time from the end of the previous step (or `started`) to a request's answer counts to the
    request's step (its endpoint's), the time to a `Done` after it to the Done's step (`on_step`
    is not timed). In the classic flow each request's step is its Done's; in the one-request
    flow the round trip of POST /sen counts to `enroll`, and `evidence` and `config` are the
    reading of their parts of the same answer."""
    steps: dict[str, float] = {}
    t = clock() if started is None else started
    send: Any = None
    try:
        while True:
            item = flow.send(send)
            if type(item) is Done:
                steps[item.step] = steps.get(item.step, 0.0) + clock() - t
                if on_step is not None:
                    on_step(item)
                send = None
            else:
                send = await exchange(item)
                steps[item.step] = steps.get(item.step, 0.0) + clock() - t
            t = clock()
    except StopIteration as stop:
        return stop.value, steps
