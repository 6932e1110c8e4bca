"""The one-request enrollment (issue 13; docs/enrollment.md), as sans-I/O generators in the manner
of flow.py (the same `Request`, `Done`, results and `drive`):

    one_request_flow  [GET /attest/nonce,] POST /.well-known/est/sen with Accept 62
                      (one session, factory identity)
    renew_one_flow    POST /.well-known/est/sren with Accept 62 (operational identity)

The device makes a new operational key, then its evidence for the session nonce (the exporter
value of the DTLS session the request goes over, `session_nonce`; without one, a server nonce
from GET /attest/nonce) bound to that key (the `cnf` claim), and puts it in the CSR's attestation
attribute. The gateway appraises it, issues and answers in one exchange, Content-Format 62
(application/multipart-core, RFC 8710): a CBOR array of (content format, representation) pairs,

    [287, leaf certificate (DER), 60, configuration (the CBOR of GET /config), 60, verdict]

the verdict pair only when the CSR carried evidence; /sren's answer has no verdict pair.

The answer is read strictly: one CBOR item, an array of pairs, each an unsigned content format
and a byte string, exactly the pairs above in that order. Whatever else comes is EnrollFailed
naming what is wrong. Its parts are then read as the classic flow reads the answers they stand
for: the verdict (step `evidence`, Done first as in the classic flow), the certificate (`enroll`
or `renew`: for the new key, this device, validating to the root; once it is accepted the
caller stores it), the configuration (`config`: a failure there leaves the device enrolled).
A refusal is read as in the classic flow, except that 4.03 "attestation refused" (the evidence in
the CSR was appraised unacceptable) fails at step `evidence` with the problem's detail, as the
classic flow's verdict does ("verdict contraindicated: firmware-unknown").
"""

from __future__ import annotations

import time
from typing import Callable, Generator

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.attestation import cbor_strict
from devid.attestation.errors import AttestationError
from devid.gateway.device.flow import (Config, Done, Enrolled, Flow, Issued, Verdict, Verify, check_issued, crts_flow,
                                       find_leaf, read_certificates, read_config, read_verdict, take_nonce)
from devid.gateway.device.identity import DeviceIdentity, Firmware, device_csr, new_p256_key
from devid.gateway.device.protocol import (CT_CBOR, CT_MULTIPART, CT_PKIX_CERT, SEN, SREN, Answer, EnrollFailed,
                                           Reply, Request, check, problem_details, problem_text)

# the largest answer read (the gateway's is ~1.9 KB: a certificate, a configuration of one message)
MAX_ANSWER = 64 * 1024
REFUSED = "attestation refused"            # the problem title of evidence appraised unacceptable


def read_parts(step: str, reply: Reply) -> list[tuple[int, bytes]]:
    """The (content format, representation) pairs of a multipart-core answer (RFC 8710), strictly:
    one CBOR item (no trailing bytes, no indefinite lengths, no tags), an array of an even
    number of items, each pair an unsigned content format below 65536 and a byte string."""
    try:
        body = cbor_strict.loads(reply.payload, max_size=MAX_ANSWER, max_depth=2)
    except AttestationError as exc:
        raise EnrollFailed(step, f"the multipart-core answer cannot be read as CBOR ({exc})") from None
    if not isinstance(body, list):
        raise EnrollFailed(step, "the answer is not a multipart-core array (RFC 8710)")
    if len(body) % 2:
        raise EnrollFailed(step, f"the multipart-core array has {len(body)} items, not (content format, "
                                 "representation) pairs")
    parts = []
    for n in range(0, len(body), 2):
        fmt, part = body[n], body[n + 1]
        if type(fmt) is not int or not 0 <= fmt <= 0xFFFF:
            raise EnrollFailed(step, f"part {n // 2 + 1} of the answer: its content format {fmt!r} is not an "
                                     "unsigned integer below 65536")
        if not isinstance(part, bytes):
            raise EnrollFailed(step, f"part {n // 2 + 1} of the answer (content format {fmt}) is not a byte string")
        parts.append((fmt, part))
    return parts


def _shape(step: str, parts: list[tuple[int, bytes]], verdict: bool) -> None:
    """The pairs the answer must hold: certificate, configuration[, verdict]."""
    names = ["certificate (287)", "configuration (60)"] + (["verdict (60)"] if verdict else [])
    if len(parts) != len(names):
        raise EnrollFailed(step, f"the answer holds {len(parts)} parts ({', '.join(str(f) for f, _ in parts) or 'none'}), "
                                 f"expected {len(names)}: {', '.join(names)}")
    if parts[0][0] != CT_PKIX_CERT:
        raise EnrollFailed(step, f"the answer's first part has content format {parts[0][0]}, expected 287 "
                                 "(the certificate)")
    if verdict and parts[2][0] != CT_CBOR:
        raise EnrollFailed("evidence", f"the answer's verdict part has content format {parts[2][0]}, expected 60")


def _part(reply: Reply, fmt: int, payload: bytes) -> Answer:
    """One part, as an answer of its own for the classic flow's readers."""
    return Answer(reply.code, fmt, payload)


def _issuers_in(leaf: x509.Certificate, certs) -> list[x509.Certificate]:
    """The CA certificates among `certs` that name themselves as the leaf's issuer (not
    self-signed): candidates for its path, and what follows it in op-chain.pem."""
    return [c for c in certs if c.subject == leaf.issuer and c.subject != c.issuer]


def _anchors_in(config_part: bytes) -> list[x509.Certificate]:
    """The trust anchors of a configuration; none if the part cannot be read (reading it as the
    configuration comes later, and says what is wrong)."""
    try:
        anchors = cbor2.loads(config_part).get("trust_anchors")
        return [x509.load_der_x509_certificate(a) for a in anchors if isinstance(a, bytes)]
    except Exception:
        return []


def _path(leaf: x509.Certificate, cas: list[x509.Certificate], verify: Verify) -> list[x509.Certificate] | None:
    try:
        verify(leaf, cas)
    except Exception:
        return None
    return [leaf, *cas]


def _certificate(reply: Reply, parts, key, serial: str, verify: Verify) -> Generator[Request, Reply, Issued]:
    """The issued certificate, checked as the classic flow checks it (`check_issued`): for the
    new key, this device, and validating to the root. The answer holds the certificate alone
    (287); its issuing CA is looked for in `verify`'s own anchors, then among the configuration's
    trust anchors (the default template lists the operational CA), and only if neither has it
    in the CAs of EST /crts (one more request). The CA that validates it follows it in the
    chain (op-chain.pem)."""
    certs = read_certificates(_part(reply, CT_PKIX_CERT, parts[0][1]))
    leaf = find_leaf(certs, key, serial)
    chain = _path(leaf, [], verify) or _path(leaf, _issuers_in(leaf, _anchors_in(parts[1][1])), verify)
    if chain is None:
        cas = yield from crts_flow()
        chain = check_issued([leaf, *_issuers_in(leaf, cas)], key, serial, verify)
    return Issued(key, chain)


def _config(reply: Reply, parts, serial: str, device_type: str | None) -> Config:
    fmt, payload = parts[1]
    if fmt != CT_CBOR:
        raise EnrollFailed("config", f"the answer's configuration part has content format {fmt}, expected 60")
    return read_config(_part(reply, CT_CBOR, payload), serial, device_type)


def _send(request: Request) -> Generator[Request, Reply, Reply]:
    """The request; its answer once `check` accepts it. An "attestation refused" problem fails at
    step `evidence` (the verdict's step), with the gateway's words."""
    reply = yield request
    if reply.code == 0x83:
        problem = problem_details(reply)
        if problem is not None and problem.title == REFUSED:
            # its detail reads as the classic flow's refusal: "verdict contraindicated: firmware-unknown"
            raise EnrollFailed("evidence", problem.detail or problem_text(reply))
    return check(request, reply)


def one_request_flow(identity: DeviceIdentity, firmware: Firmware | None, verify: Verify, *,
                     session_nonce: bytes | None = None,
                     new_key: Callable[[], ec.EllipticCurvePrivateKey] = new_p256_key,
                     clock: Callable[[], float] = time.time, secure_boot: bool = True, dbgstat: int = 2,
                     bootcount: int = 1) -> Flow[Enrolled]:
    """The first enrollment in one request, in one session with the factory identity. Without
    firmware the CSR carries no evidence (device types whose policy waives attestation): a plain
    EST-coaps /sen asking for the multipart answer.

    `session_nonce`: the exporter value of the DTLS session the request goes over
    (docs/evidence.md#session-nonces); None (a session without the extended master secret): the
    flow first asks for a server nonce (GET /attest/nonce)."""
    key = new_key()
    token = None
    if firmware is not None:
        nonce = yield from take_nonce(session_nonce)
        token = identity.evidence(nonce, firmware, iat=int(clock()), secure_boot=secure_boot, dbgstat=dbgstat,
                                  bootcount=bootcount, bound_key=key.public_key())
    reply = yield from _send(Request(SEN[CT_MULTIPART], device_csr(key, identity.serial, token)))
    parts = read_parts("enroll", reply)
    _shape("enroll", parts, verdict=token is not None)
    verdict: Verdict | None = None
    if token is not None:
        verdict = read_verdict(_part(reply, CT_CBOR, parts[2][1]))
        yield Done("evidence", verdict)
        if not verdict.acceptable:      # the gateway issues only on an acceptable verdict: a contradiction
            raise EnrollFailed("evidence", f"verdict {verdict.tier}: {verdict.reasons_text} (with a certificate, "
                                           "which is not used)")
    issued = yield from _certificate(reply, parts, key, identity.serial, verify)
    yield Done("enroll", issued)
    config = _config(reply, parts, identity.serial, identity.device_type)
    yield Done("config", config)
    return Enrolled(identity.serial, verdict, issued, config)


def renew_one_flow(serial: str, device_type: str | None, verify: Verify, *,
                   new_key: Callable[[], ec.EllipticCurvePrivateKey] = new_p256_key) -> Flow[tuple[Issued, Config]]:
    """A new operational certificate and the configuration, in one request, in a session with
    the current operational identity."""
    key = new_key()
    reply = yield from _send(Request(SREN[CT_MULTIPART], device_csr(key, serial)))
    parts = read_parts("renew", reply)
    _shape("renew", parts, verdict=False)
    issued = yield from _certificate(reply, parts, key, serial, verify)
    yield Done("renew", issued)
    config = _config(reply, parts, serial, device_type)
    yield Done("config", config)
    return issued, config
