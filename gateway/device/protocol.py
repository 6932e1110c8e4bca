"""The device side of the enrollment protocol on the wire, with no I/O: what a request is, what
makes an answer acceptable, and how a refusal reads.

A `Request` names its step and its `Endpoint` (method, path, Content-Format, Accept, the success
code and content format of the answer) and carries a body. A transport turns it into a CoAP
message its own way (`client.py` through aiocoap; the load generator through its own codec, from
`Endpoint.options`) and hands back any object with `code`, `content_format` and `payload` (a
`Reply`). `check` accepts the answer or raises `EnrollFailed(step, reason)`; a refusal's reason
is its RFC 9290 problem details (`4.03 Forbidden title: detail`).

No aiocoap and no sockets here: the flows in `flow.py` are written against these values only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

import cbor2

# Content-Formats (IANA CoAP registry)
CT_JSON = 50
CT_MULTIPART = 62           # application/multipart-core (RFC 8710): the one-request enrollment's answer
CT_CBOR = 60
CT_PROBLEM = 257            # application/concise-problem-details+cbor (RFC 9290)
CT_PKCS7_CERTS = 281        # application/pkcs7-mime; smime-type=certs-only
CT_PKCS10 = 286
CT_PKIX_CERT = 287

# methods and the response codes we expect (class << 5 | detail)
GET, POST = 1, 2
VALID, CHANGED, CONTENT = 0x43, 0x44, 0x45

# option numbers of the options a request carries (RFC 7252 5.10)
OPT_URI_PATH, OPT_CONTENT_FORMAT, OPT_ACCEPT = 11, 12, 17

DEFAULT_PORT = 5684

# the enrollment flows (docs/enrollment.md): evidence in the CSR and one POST /sen whose answer
# carries certificate, configuration and verdict (flow_one.py); or nonce, evidence, /sen and
# /config, one request each (flow.py; libcoap-based devices use it)
ONE_REQUEST, CLASSIC = "one-request", "classic"
FLOWS = (ONE_REQUEST, CLASSIC)
DEFAULT_FLOW = ONE_REQUEST
# a renewal asks for the certificate alone unless told otherwise: one message, where the answer
# with the configuration takes two Block2 exchanges, and a configuration rarely changes (a
# conditional GET /config with its ETag checks it); `one-request` asks for it in the same answer
DEFAULT_RENEW_FLOW = CLASSIC

_CODE_NAMES = {
    0x41: "Created", 0x42: "Deleted", 0x43: "Valid", 0x44: "Changed", 0x45: "Content", 0x5F: "Continue",
    0x80: "Bad Request", 0x81: "Unauthorized", 0x82: "Bad Option", 0x83: "Forbidden", 0x84: "Not Found",
    0x85: "Method Not Allowed", 0x86: "Not Acceptable", 0x88: "Request Entity Incomplete", 0x89: "Conflict",
    0x8C: "Precondition Failed", 0x8D: "Request Entity Too Large", 0x8F: "Unsupported Content Format",
    0x96: "Unprocessable Entity", 0x9D: "Too Many Requests",
    0xA0: "Internal Server Error", 0xA1: "Not Implemented", 0xA2: "Bad Gateway", 0xA3: "Service Unavailable",
    0xA4: "Gateway Timeout", 0xA5: "Proxying Not Supported", 0xA8: "Hop Limit Reached",
    0xE1: "Csm", 0xE2: "Ping", 0xE3: "Pong", 0xE4: "Release", 0xE5: "Abort",
}


def code_text(code: int) -> str:
    """A response code as people read it: `4.03 Forbidden` (as aiocoap prints it)."""
    return f"{code >> 5}.{code & 31:02d} {_CODE_NAMES.get(code, '(Unknown)')}"


class EnrollFailed(Exception):
    """One device's failure: the step it failed at (`nonce`, `enroll`, `connect`, ...) and why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason

    @classmethod
    def no_answer(cls, step: str, timeout: float) -> "EnrollFailed":
        return cls(step, f"no answer from the gateway within {timeout:g} s")

    @classmethod
    def handshake(cls, reason: str) -> "EnrollFailed":
        """The DTLS handshake failed; `reason` as the DTLS engine gives it."""
        if reason.startswith("server certificate refused"):
            return cls("connect", f"the gateway's certificate is not acceptable: {reason}")
        said = reason.lower()
        hint = next((h for alert, h in _ALERT_HINTS if alert in said), "")
        if not hint and "alert" in said:
            hint = "; the gateway refused this device's certificate"
        return cls("connect", f"the DTLS handshake failed ({reason}){hint}")


# what the gateway's alert says (docs/gateway.md#device-certificates), as OpenSSL names it
_ALERT_HINTS = (
    ("certificate revoked", "; the gateway refused this device's certificate: it is revoked"),
    ("certificate expired", "; the gateway refused this device's certificate: it has expired"),
    ("bad certificate", "; the gateway refused this device's certificate: not one it issued and recorded, "
                        "superseded by a newer one, or not yet valid (check the device's clock)"),
    ("unsupported certificate", "; the gateway refused this certificate: not a device certificate "
                                "(no clientAuth purpose)"),
    ("unknown ca", "; the gateway refused this device's certificate: not issued by a CA it trusts"),
    ("internal error", "; the gateway could not check this device's certificate: try again later"),
)


# -- requests --------------------------------------------------------------------------------------

def encode_uint(value: int) -> bytes:
    """A CoAP uint option value: big-endian, no leading zero bytes (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


@dataclass(frozen=True)
class Endpoint:
    """One resource as a step of the flow uses it."""

    step: str
    method: int
    path: str                            # without the leading slash: "attest/nonce"
    content_format: int | None = None    # of the request body
    accept: int | None = None
    success: int = CONTENT               # the one response code that means it worked
    returns: int | None = None           # the content format the answer must have (None: any)
    options: tuple[tuple[int, bytes], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        opts = [(OPT_URI_PATH, seg.encode()) for seg in self.path.split("/")]
        if self.content_format is not None:
            opts.append((OPT_CONTENT_FORMAT, encode_uint(self.content_format)))
        if self.accept is not None:
            opts.append((OPT_ACCEPT, encode_uint(self.accept)))
        object.__setattr__(self, "options", tuple(opts))     # ascending option numbers


NONCE = Endpoint("nonce", GET, "attest/nonce", returns=CT_CBOR)
EVIDENCE = Endpoint("evidence", POST, "attest/evidence", CT_CBOR, success=CHANGED, returns=CT_CBOR)
CONFIG = Endpoint("config", GET, "config", accept=CT_CBOR, returns=CT_CBOR)
CRTS = Endpoint("crts", GET, ".well-known/est/crts", accept=CT_PKCS7_CERTS, returns=CT_PKCS7_CERTS)
# EST /sen and /sren by the format asked for: 281 (the certificate and the operational CA: what the
# classic flow of the field engineer's script stores), 287 (the certificate alone: the load
# generator's classic flow) or 62 (multipart-core: the certificate, the configuration and, for
# evidence in the CSR, the verdict; the one-request flow, flow_one.py)
SEN = {fmt: Endpoint("enroll", POST, ".well-known/est/sen", CT_PKCS10, fmt, CHANGED, fmt)
       for fmt in (CT_PKCS7_CERTS, CT_PKIX_CERT, CT_MULTIPART)}
SREN = {fmt: Endpoint("renew", POST, ".well-known/est/sren", CT_PKCS10, fmt, CHANGED, fmt)
        for fmt in (CT_PKCS7_CERTS, CT_PKIX_CERT, CT_MULTIPART)}


@dataclass(frozen=True)
class Request:
    """What a flow asks a transport to send (and answer with a Reply)."""

    endpoint: Endpoint
    payload: bytes = b""
    # a conditional GET (RFC 7252 5.10.6.2): the ETag of the representation the device holds;
    # 2.03 Valid then answers that it is current
    etag: bytes | None = None

    @property
    def step(self) -> str:
        return self.endpoint.step


def config_etag(config_cbor: bytes) -> bytes:
    """The ETag the gateway gives a configuration (docs/enrollment.md#get-config): the first 8
    bytes of the SHA-256 of its CBOR, so a device computes it from the config.cbor it keeps."""
    return hashlib.sha256(config_cbor).digest()[:8]


class Reply(Protocol):
    """An answer as the flows read it (aiocoap's messages are adapted; the load generator's
    decoded responses have these attributes already)."""

    code: int
    content_format: int | None
    payload: bytes


@dataclass(frozen=True)
class Answer:
    """A plain Reply."""

    code: int
    content_format: int | None
    payload: bytes


# -- answers -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProblemDetails:
    """RFC 9290 concise problem details: the standard keys by name, the others in `extra`."""

    title: str | None = None             # -1
    detail: str | None = None            # -2
    instance: str | None = None          # -3
    response_code: int | None = None     # -4
    extra: dict = field(default_factory=dict)


_STANDARD = {-1: "title", -2: "detail", -3: "instance", -4: "response_code"}


def problem_details(reply: Reply) -> ProblemDetails | None:
    """The problem details of an answer with Content-Format 257, or None (another format, or a
    body that is not a CBOR map with text title and detail)."""
    if reply.content_format != CT_PROBLEM:
        return None
    try:
        body = cbor2.loads(reply.payload)
    except Exception:
        return None
    if not isinstance(body, dict):
        return None
    known = {_STANDARD[k]: v for k, v in body.items() if k in _STANDARD}
    if any(not isinstance(known.get(k), str) for k in ("title", "detail", "instance") if k in known) \
            or not isinstance(known.get("response_code", 0), int):
        return None
    return ProblemDetails(**known, extra={k: v for k, v in body.items() if k not in _STANDARD})


def problem_text(reply: Reply) -> str:
    """`4.03 Forbidden title: detail` for a refusal with problem details, else the code and the
    start of the body as text."""
    problem = problem_details(reply)
    if problem is not None:
        text = f"{code_text(reply.code)} {problem.title or ''}"
        return text + (f": {problem.detail}" if problem.detail else "")
    text = reply.payload[:200].decode("utf-8", "replace")
    return code_text(reply.code) + (f" {text}" if text else "")


def check(request: Request, reply: Reply) -> Reply:
    """The answer if it is the success the endpoint promises, in the content format it promises;
    else EnrollFailed naming the request's step."""
    ep = request.endpoint
    if request.etag is not None and reply.code == VALID:
        return reply                # what the device holds is current: no body
    if reply.code != ep.success:
        if reply.code >> 5 == 2:
            raise EnrollFailed(ep.step, f"unexpected answer {code_text(reply.code)}, expected "
                                        f"{code_text(ep.success)}")
        raise EnrollFailed(ep.step, problem_text(reply))
    if ep.returns is not None and reply.content_format != ep.returns:
        raise EnrollFailed(ep.step, f"content format {reply.content_format}, expected {ep.returns}")
    return reply


def cbor_map(step: str, reply: Reply) -> dict:
    try:
        body = cbor2.loads(reply.payload)
    except Exception:
        raise EnrollFailed(step, "the answer is not CBOR") from None
    if not isinstance(body, dict):
        raise EnrollFailed(step, "the answer is not a CBOR map")
    return body


# -- the gateway ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GatewayURI:
    host: str                 # a name, or an address without brackets
    port: int
    base: str                 # coaps://HOST[:PORT], as given: request URIs are base + "/" + path


def parse_gateway(uri: str) -> GatewayURI:
    """coaps://HOST[:PORT]; EnrollFailed at step `gateway` for anything else."""
    try:
        parts = urlsplit(uri)
        port = parts.port                   # a port that is not a number in 0-65535 raises here
    except ValueError as exc:
        raise EnrollFailed("gateway", f"expected coaps://HOST[:PORT], got {uri!r} ({exc})") from None
    if parts.scheme != "coaps" or not parts.hostname:
        raise EnrollFailed("gateway", f"expected coaps://HOST[:PORT], got {uri!r}")
    return GatewayURI(parts.hostname, port or DEFAULT_PORT, f"coaps://{parts.netloc}")
