"""The gateway's CoAP resources: EST-coaps (RFC 9148), attestation, configuration, whoami.

    /whoami                   GET         JSON: the session's device identity (any identity) and nonce
    /.well-known/est/crts     GET         CA certificates: 281 (PKCS#7 certs-only, default) or 287
    /.well-known/est/sen      POST 286    first operational certificate (factory identity, attested: evidence
                                          in the CSR, or an earlier verdict): 281 (default, RFC 9148 4.3),
                                          287, or 62: multipart-core [287, cert, 60, config(, 60, verdict)]
    /.well-known/est/sren     POST 286    renewal (operational identity, same device): 281, 287 or 62
    /attest/nonce             GET         CBOR {"nonce": bstr, "expires": uint}, Max-Age 0 (factory identity)
    /attest/evidence          POST 60     an EAT (docs/evidence.md) -> CBOR verdict   (factory identity); its
                                          nonce: a server nonce, or the session's (the DTLS exporter value)
    /config                   GET         CBOR operational configuration   (operational identity, or the
                                          factory identity of an enrolled device), with an ETag: a GET
                                          naming the current one gets 2.03 Valid

Each resource's `ct` (in /.well-known/core) lists what it returns, the default first (RFC 7252
7.2.1): an Accept naming anything else gets 4.06 (RFC 7252 5.10.4). Every request body is capped
by `max_body` (Block1 included, enforced by `coap.py`: 4.13 with Size1 beyond the cap); errors
become RFC 9290 problem details (`problems.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import timedelta

import aiocoap
import aiocoap.resource as resource
import cbor2
from aiocoap.numbers import codes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.attestation.evidence import MAX_EVIDENCE_SIZE
from devid.attestation.nonces import SessionNonce

from devid.gateway.service.enrollment import EnrollmentService
from devid.gateway.service.identity import PSK_KINDS, PeerIdentity
from devid.gateway.service.problems import Problem, to_response

CT_CBOR = 60
CT_JSON = 50
CT_MULTIPART = 62           # application/multipart-core (RFC 8710)
CT_PKCS7_CERTS = 281
CT_PKCS10 = 286
CT_PKIX_CERT = 287
MAX_CSR = 4096


def identity_of(request) -> PeerIdentity | None:
    for claim in request.remote.authenticated_claims:
        if isinstance(claim, PeerIdentity):
            return claim
    return None


def session_nonce_of(request) -> SessionNonce | None:
    """The session nonce of the DTLS session the request came in (its exporter value, its age, and
    whether it was used; docs/evidence.md), or None (no extended master secret, or not a DTLS
    session)."""
    remote = request.remote
    value = getattr(remote, "exporter", None)
    if value is None:
        return None
    age = timedelta(seconds=max(0.0, asyncio.get_running_loop().time() - remote.exporter_at))
    return SessionNonce(value, age, remote.exporter_used)


def require_format(request, *formats: int) -> None:
    if request.opt.content_format not in formats:
        raise Problem(codes.UNSUPPORTED_CONTENT_FORMAT, "unsupported content format",
                      f"expected content format {' or '.join(str(f) for f in formats)}")


def accepted(request, *formats: int) -> int:
    """The response format: the request's Accept if we offer it, else 4.06; default the first."""
    accept = request.opt.accept
    if accept is None:
        return formats[0]
    if int(accept) not in formats:
        raise Problem(codes.NOT_ACCEPTABLE, "not acceptable",
                      f"this resource offers content format {' or '.join(str(f) for f in formats)}")
    return int(accept)


class WhoAmI(resource.Resource):
    """GET: the identity the gateway authenticated for this DTLS session (JSON, the only format),
    and the session's nonce (hex), for a device whose DTLS stack cannot export it itself."""

    rt = "devid.whoami"
    ct = str(CT_JSON)

    async def render_get(self, request):
        who = identity_of(request)
        if who is None:
            raise Problem(codes.UNAUTHORIZED, "device certificate required")
        accepted(request, CT_JSON)
        body = who.as_dict()
        session_nonce = getattr(request.remote, "exporter", None)      # the value alone (docs/evidence.md)
        if session_nonce is not None:
            body["session_nonce"] = session_nonce.hex()
        return aiocoap.Message(code=codes.CONTENT, content_format=CT_JSON, payload=json.dumps(body).encode())


class _Resource(resource.Resource):
    max_body = MAX_CSR          # request body cap (Block1 included), enforced by gateway/coap/server.py
    require_format = staticmethod(require_format)
    accepted = staticmethod(accepted)

    def __init__(self, service: EnrollmentService) -> None:
        super().__init__()
        self.service = service

    async def render(self, request):
        try:
            return await super().render(request)
        except Problem:
            raise
        except Exception as exc:
            response = to_response(exc)
            if response is None:
                raise
            return response


def config_etag(payload: bytes) -> bytes:
    """The ETag of a configuration representation: the first 8 bytes of its SHA-256 (a device
    that keeps config.cbor computes it itself; docs/enrollment.md)."""
    return hashlib.sha256(payload).digest()[:8]


def verdict_body(evaluation) -> dict:
    verdict = evaluation.appraisal.verdict
    return {"verdict": verdict.tier.value, "acceptable": verdict.acceptable,
            "reasons": [r.as_json() for r in verdict.reasons], "log_seq": evaluation.log_seq}


def _certificate_response(issued, fmt: int, chain) -> aiocoap.Message:
    if fmt == CT_PKIX_CERT:
        payload = issued.cert.public_bytes(serialization.Encoding.DER)
    else:
        payload = pkcs7.serialize_certificates([issued.cert, *chain], serialization.Encoding.DER)
    return aiocoap.Message(code=codes.CHANGED, payload=payload, content_format=fmt)


def _multipart_response(issuance) -> aiocoap.Message:
    """RFC 8710 multipart-core: the certificate (287), the configuration (60, as GET /config
    serves it) and, when the CSR carried evidence, the verdict (60): one answer for enrollment."""
    parts = [CT_PKIX_CERT, issuance.issued.cert.public_bytes(serialization.Encoding.DER), CT_CBOR,
             cbor2.dumps(issuance.config)]
    if issuance.evaluation is not None:
        parts += [CT_CBOR, cbor2.dumps(verdict_body(issuance.evaluation))]
    return aiocoap.Message(code=codes.CHANGED, payload=cbor2.dumps(parts), content_format=CT_MULTIPART)


class Crts(_Resource):
    rt = "ace.est.crts"
    ct = f"{CT_PKCS7_CERTS} {CT_PKIX_CERT}"

    def __init__(self, service, certs) -> None:
        super().__init__(service)
        self.certs = certs     # [root, operational CA]

    async def render_get(self, request):
        if identity_of(request) is None:
            raise Problem(codes.UNAUTHORIZED, "device certificate required")
        fmt = self.accepted(request, CT_PKCS7_CERTS, CT_PKIX_CERT)
        if fmt == CT_PKIX_CERT:     # one certificate only: the trust anchor
            payload = self.certs[0].public_bytes(serialization.Encoding.DER)
        else:
            payload = pkcs7.serialize_certificates(list(self.certs), serialization.Encoding.DER)
        return aiocoap.Message(code=codes.CONTENT, payload=payload, content_format=fmt)


class SimpleEnroll(_Resource):
    """RFC 9148 4.3: with no Accept, the answer is 281 (the certificate and the operational CA);
    Accept 287 gives the certificate alone. The request is 286 (not listed in `ct`, which names
    what the resource returns)."""

    rt = "ace.est.sen"
    ct = f"{CT_PKCS7_CERTS} {CT_PKIX_CERT} {CT_MULTIPART}"

    def __init__(self, service, chain) -> None:
        super().__init__(service)
        self.chain = chain        # certificates after the leaf in a 281 answer: the operational CA

    async def render_post(self, request):
        self.require_format(request, CT_PKCS10)
        fmt = self.accepted(request, CT_PKCS7_CERTS, CT_PKIX_CERT, CT_MULTIPART)
        who = identity_of(request)
        issuance = self._issue(who, request, with_config=fmt == CT_MULTIPART)
        if who.kind in PSK_KINDS:
            # the PSK session that was issued the certificate, and it alone, may fetch the
            # operational PSK that goes with it (service/psk.py)
            request.remote.psk_issued = issuance.issued.cert.serial_number
        if fmt == CT_MULTIPART:
            return _multipart_response(issuance)
        return _certificate_response(issuance.issued, fmt, self.chain)

    def _issue(self, who, request, with_config: bool):
        session = session_nonce_of(request)
        try:
            return self.service.enroll(who, request.payload, session, with_config=with_config)
        finally:
            if session is not None and session.used:
                # the verifier claimed the session's one use, and the enrollment kept it: only a
                # rollback that recorded nothing releases it (EnrollmentService.enroll)
                request.remote.exporter_used = True


class SimpleReenroll(SimpleEnroll):
    rt = "ace.est.sren"

    def _issue(self, who, request, with_config: bool):
        return self.service.renew(who, request.payload, with_config=with_config)


class Nonce(_Resource):
    rt = "devid.attest.nonce"
    ct = str(CT_CBOR)

    async def render_get(self, request):
        self.accepted(request, CT_CBOR)
        record = self.service.nonce(identity_of(request))
        body = {"nonce": record.value, "expires": int(record.expires_at.timestamp())}
        # Max-Age 0: a single-use nonce must not be served from a cache (the default is 60 s)
        return aiocoap.Message(code=codes.CONTENT, payload=cbor2.dumps(body), content_format=CT_CBOR, max_age=0)


class Evidence(_Resource):
    rt = "devid.attest.evidence"
    ct = str(CT_CBOR)
    max_body = MAX_EVIDENCE_SIZE

    async def render_post(self, request):
        if request.opt.content_format is not None:
            self.require_format(request, CT_CBOR)
        self.accepted(request, CT_CBOR)
        session = session_nonce_of(request)
        try:
            outcome = self.service.evidence(identity_of(request), request.payload, session)
        finally:
            if session is not None and session.used:
                # the verifier claimed the session's one use: kept even if a later step failed
                request.remote.exporter_used = True
        body = dict(verdict_body(outcome.evaluation), revoked=outcome.revoked)
        return aiocoap.Message(code=codes.CHANGED, payload=cbor2.dumps(body), content_format=CT_CBOR)


class Config(_Resource):
    """GET: the configuration, with an ETag (`config_etag` of the payload); a request naming
    that ETag gets 2.03 Valid and no payload (RFC 7252 5.10.6.2)."""

    rt = "devid.config"
    ct = f"{CT_CBOR} {CT_JSON}"

    async def render_get(self, request):
        fmt = self.accepted(request, CT_CBOR, CT_JSON)
        config = self.service.configuration(identity_of(request))
        if fmt == CT_JSON:
            view = dict(config, trust_anchors=[
                serialization_pem(der) for der in config["trust_anchors"]])
            payload = json.dumps(view).encode()
        else:
            payload = cbor2.dumps(config)
        etag = config_etag(payload)
        if etag in request.opt.etags:
            return aiocoap.Message(code=codes.VALID, etag=etag)
        return aiocoap.Message(code=codes.CONTENT, payload=payload, content_format=fmt, etag=etag)


def serialization_pem(der: bytes) -> str:
    from cryptography import x509
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode()


def add_enrollment_resources(site: resource.Site, service: EnrollmentService, root, operational_ca) -> None:
    site.add_resource([".well-known", "est", "crts"], Crts(service, [root, operational_ca]))
    site.add_resource([".well-known", "est", "sen"], SimpleEnroll(service, [operational_ca]))
    site.add_resource([".well-known", "est", "sren"], SimpleReenroll(service, [operational_ca]))
    site.add_resource(["attest", "nonce"], Nonce(service))
    site.add_resource(["attest", "evidence"], Evidence(service))
    site.add_resource(["config"], Config(service))
