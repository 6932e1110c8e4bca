"""The device client (gateway/device/): one protocol, two transports. The flows of flow.py driven
over aiocoap (what `devid enroll`, `renew` and `simulate` use) and over the load generator's lean
DTLS sessions (benchmarks/loadgen_dtls.py) against the real gateway on loopback, with the same
steps, results and refusals; and the protocol's pure parts (codes, requests on the wire, problem
details, certificate checks) without a network."""

from __future__ import annotations

import hashlib
import sys
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from cryptography.hazmat.primitives.serialization import Encoding

from devid.ca.revocation import revoke_device
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.device.client import coap_exchange, device_context
from devid.gateway.device.flow import (Done, Issued, check_issued, config_flow, crts_flow, drive, enroll_flow,
                                       read_certificates, renew_flow)
from devid.gateway.device.identity import (DeviceIdentity, Firmware, device_csr, load_bundle, new_p256_key,
                                           operational_files, root_verifier)
from devid.gateway.device.protocol import (CONFIG, CRTS, CT_PKCS7_CERTS, CT_PKIX_CERT, CT_PROBLEM, EVIDENCE, GET,
                                           NONCE, SEN, SREN, Answer, EnrollFailed, Endpoint, Request, check,
                                           code_text, parse_gateway, problem_details, problem_text)
from devid.gateway.device.stats import latency_ms, percentile, step_latency_ms

from .gateway_helpers import FW, run_with_gateway
from .transport_helpers import TIMEOUT, over_lean

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import loadgen_coap  # noqa: E402


# -- the two transports ----------------------------------------------------------------------------------

@asynccontextmanager
async def over_aiocoap(bundle: Path, uri: str, operational: bool = False):
    names = ("op-chain.pem", "op-key.pem") if operational else ("chain.pem", "key.pem")
    gateway = parse_gateway(uri)
    ctx, _ = await device_context(bundle, gateway.host, *names, handshake_timeout=TIMEOUT)
    try:
        yield coap_exchange(ctx, gateway.base, TIMEOUT), None      # (the exporter: not read here)
    finally:
        await ctx.shutdown()


TRANSPORTS = {"aiocoap": over_aiocoap, "lean": over_lean}


def _identity(bundle: Path):
    factory, _, key, root = load_bundle(bundle)
    return DeviceIdentity.of(factory, key), root


def _save(bundle: Path, issued) -> None:
    for name, content, mode in operational_files(issued.key, issued.chain):
        (bundle / name).write_bytes(content)
        (bundle / name).chmod(mode)


# -- the flows over both transports, against the real gateway --------------------------------------------

@pytest.mark.parametrize("cert_format", [CT_PKCS7_CERTS, CT_PKIX_CERT])
@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_enroll_renew_and_config_flows(world, transport, cert_format):
    data, out = world
    bundle = out / "TS00000001"
    identity, root = _identity(bundle)
    over = TRANSPORTS[transport]

    async def body(uri, gw):
        async with over(bundle, uri) as (exchange, _):
            cas, _ = await drive(crts_flow(), exchange)
            assert [c.subject for c in cas] == [data.cert("root").subject, data.cert("operational").subject]
            check_root = root_verifier(root)
            verify = lambda leaf, chain: check_root(leaf, chain or cas[1:])  # noqa: E731 (a 287 answer: the leaf alone)
            seen: list[Done] = []
            enrolled, steps = await drive(enroll_flow(identity, FW, verify, cert_format=cert_format), exchange,
                                          seen.append)
        assert [d.step for d in seen] == list(steps) == ["nonce", "evidence", "enroll", "config"]
        assert all(s >= 0 for s in steps.values())
        issued = enrolled.issued
        assert enrolled.serial == "TS00000001" and enrolled.verdict.tier == "affirming" and enrolled.verdict.acceptable
        assert len(issued.chain) == (2 if cert_format == CT_PKCS7_CERTS else 1)
        assert issued.certificate.public_key() == issued.key.public_key()
        assert issued.certificate.issuer == data.cert("operational").subject
        assert enrolled.config.data["device"] == "TS00000001" and cbor2.loads(enrolled.config.raw) == enrolled.config.data
        assert gw.registry.get_device("TS00000001").state is DeviceState.ENROLLED
        _save(bundle, Issued(issued.key, [issued.certificate, data.cert("operational")]))

        async with over(bundle, uri, operational=True) as (exchange, _):
            renewed, steps = await drive(renew_flow(identity.serial, verify, cert_format=cert_format), exchange)
        assert list(steps) == ["renew"]
        statuses = {c.serial: c.status for c in gw.registry.certificates_for_device("TS00000001")}
        assert statuses[issued.certificate.serial_number] is CertStatus.SUPERSEDED
        assert statuses[renewed.certificate.serial_number] is CertStatus.CURRENT
        _save(bundle, Issued(renewed.key, [renewed.certificate, data.cert("operational")]))

        async with over(bundle, uri, operational=True) as (exchange, _):
            config, _ = await drive(config_flow(identity.serial, identity.device_type), exchange)
        assert config.data["device_type"] == "temperature-sensor" and config.data["trust_anchors"]
    run_with_gateway(data, body)


def test_a_waived_device_enrolls_without_evidence_over_both_transports(world):
    data, out = world
    identity, root = _identity(out / "LG00000001")

    async def body(uri, gw):
        runs = {}
        for name, over in TRANSPORTS.items():         # the same device twice: re-enrollment is allowed
            async with over(out / "LG00000001", uri) as (exchange, _):
                runs[name] = await drive(enroll_flow(identity, None, root_verifier(root)), exchange)
        return runs

    runs = run_with_gateway(data, body)
    for enrolled, steps in runs.values():
        assert list(steps) == ["enroll", "config"] and enrolled.verdict is None
        assert enrolled.config.data["device_type"] == "legacy-sensor"


def test_real_refusals_read_the_same_over_both_transports(world):
    """The gateway's refusals, as each transport brings them back: the same problem details, the
    same EnrollFailed (step and reason) from the same check."""
    data, out = world
    identity, root = _identity(out / "TS00000002")
    bad_fw = Firmware("sha-256", hashlib.sha256(b"tampered").digest(), FW.name, FW.version)
    not_offered = Endpoint("config", GET, "config", accept=CT_PKIX_CERT)

    async def body(uri, gw):
        got = {}
        for name, over in TRANSPORTS.items():
            async with over(out / "TS00000002", uri) as (exchange, _):
                sen = Request(SEN[CT_PKCS7_CERTS], device_csr(new_p256_key(), identity.serial))   # no evidence
                replies = [await exchange(sen), await exchange(Request(not_offered))]
                seen: list[Done] = []
                with pytest.raises(EnrollFailed) as refused:
                    await drive(enroll_flow(identity, bad_fw, root_verifier(root)), exchange, seen.append)
                # the verdict is handed over before the flow stops (devid enroll prints it)
                assert [d.step for d in seen] == ["nonce", "evidence"] and not seen[-1].value.acceptable
            got[name] = replies, refused.value
        return got

    got = run_with_gateway(data, body)
    (a_replies, a_verdict), (l_replies, l_verdict) = got["aiocoap"], got["lean"]
    for a, lean in zip(a_replies, l_replies):
        assert (a.code, a.content_format, a.payload) == (lean.code, lean.content_format, lean.payload)
        assert a.content_format == CT_PROBLEM and problem_details(a) == problem_details(lean)
    sen, offered = a_replies
    assert sen.code == codes.FORBIDDEN and problem_details(sen).title == "attestation required"
    assert offered.code == codes.NOT_ACCEPTABLE and "offers content format 60 or 50" in problem_details(offered).detail
    with pytest.raises(EnrollFailed) as refused:
        check(Request(SEN[CT_PKCS7_CERTS]), l_replies[0])
    assert refused.value.step == "enroll"
    assert refused.value.reason == f"4.03 Forbidden attestation required: {problem_details(sen).detail}"
    assert str(a_verdict) == str(l_verdict) and a_verdict.step == "evidence"
    assert a_verdict.reason.startswith("verdict contraindicated: ") and "firmware" in a_verdict.reason


def test_a_gateway_that_refuses_the_device_fails_at_connect_on_both_transports(world):
    data, out = world
    reg = data.open_registry()
    revoke_device(reg, "TS00000003", "keyCompromise", datetime.now(timezone.utc))
    reg.close()
    identity, root = _identity(out / "TS00000003")

    async def body(uri, gw):
        failures = {}
        for name, over in TRANSPORTS.items():
            with pytest.raises(EnrollFailed) as failed:
                async with over(out / "TS00000003", uri) as (exchange, _):      # aiocoap: the handshake is lazy
                    await drive(enroll_flow(identity, FW, root_verifier(root)), exchange)
            failures[name] = failed.value
        return failures

    failures = run_with_gateway(data, body)
    for exc in failures.values():
        assert exc.step == "connect" and exc.reason.startswith("the DTLS handshake failed (")
        assert "refused this device's certificate: it is revoked" in exc.reason    # the alert says why


# -- the protocol without a network -----------------------------------------------------------------------

def test_code_text_reads_as_aiocoap_prints_codes():
    for code in [*range(0x40, 0xC0), *range(0xE0, 0x100)]:      # classes 2 to 5 and 7 (6 is reserved)
        assert code_text(code) == str(codes.Code(code)), hex(code)


@pytest.mark.parametrize("endpoint", [NONCE, EVIDENCE, CONFIG, CRTS, *SEN.values(), *SREN.values()],
                         ids=lambda e: f"{e.path}-{e.accept}")
def test_a_request_is_the_same_message_on_both_transports(endpoint):
    """The lean codec's bytes for an Endpoint are aiocoap's for the same request."""
    payload = b"body" if endpoint.method != GET else b""
    lean = loadgen_coap.encode_message(loadgen_coap.CON, endpoint.method, 0x1234, b"\x00\x07",
                                       loadgen_coap.encode_options(endpoint.options), payload)
    kw = {k: v for k, v in (("content_format", endpoint.content_format), ("accept", endpoint.accept)) if v is not None}
    message = aiocoap.Message(code=endpoint.method, uri_path=endpoint.path.split("/"), payload=payload, **kw)
    message.mtype, message.mid, message.token = aiocoap.CON, 0x1234, b"\x00\x07"
    assert lean == message.encode()


def test_problem_details_and_their_text():
    body = cbor2.dumps({-1: "too many requests", -2: "slow down", -4: 0x9D, 7: "extra"})
    reply = Answer(0x9D, CT_PROBLEM, body)
    assert problem_details(reply).title == "too many requests" and problem_details(reply).extra == {7: "extra"}
    assert problem_text(reply) == "4.29 Too Many Requests too many requests: slow down"
    # not problem details: the code and the start of the body
    assert problem_details(Answer(0x80, 0, b"bad")) is None
    assert problem_text(Answer(0x80, 0, b"bad")) == "4.00 Bad Request bad"
    for payload in (b"\xff\xff", cbor2.dumps([1, 2]), cbor2.dumps({-1: 5})):
        assert problem_details(Answer(0xA0, CT_PROBLEM, payload)) is None
    assert problem_text(Answer(0xA3, CT_PROBLEM, b"")) == "5.03 Service Unavailable"


def test_check_wants_the_promised_code_and_format():
    request = Request(SEN[CT_PKIX_CERT], b"csr")
    assert check(request, Answer(0x44, CT_PKIX_CERT, b"x")).payload == b"x"
    with pytest.raises(EnrollFailed, match=r"^enroll: unexpected answer 2.05 Content, expected 2.04 Changed$"):
        check(request, Answer(0x45, CT_PKIX_CERT, b"x"))
    with pytest.raises(EnrollFailed, match=r"^enroll: content format 281, expected 287$"):
        check(request, Answer(0x44, CT_PKCS7_CERTS, b"x"))
    with pytest.raises(EnrollFailed, match=r"^gateway: expected coaps://"):
        parse_gateway("coap://127.0.0.1")
    assert parse_gateway("coaps://[::1]").port == 5684 and parse_gateway("coaps://gw:7000").base == "coaps://gw:7000"


def test_check_issued_names_what_is_wrong(bundles):
    """With real certificates from provisioning: the certificate must be for the new key, for this
    device, and accepted by the verifier."""
    one, two = sorted(bundles.iterdir())[:2]
    cert1, _, key1, root = load_bundle(one)
    cert2, _, key2, _ = load_bundle(two)
    serial1 = DeviceIdentity.of(cert1, key1).serial
    answer = Answer(0x44, CT_PKIX_CERT, cert1.public_bytes(Encoding.DER))
    certs = read_certificates(answer)
    assert check_issued(certs, key1, serial1, lambda leaf, chain: None) == [cert1]
    with pytest.raises(EnrollFailed, match="^certificate: no certificate for the new key"):
        check_issued(certs, key2, serial1, lambda leaf, chain: None)
    with pytest.raises(EnrollFailed, match=f"^certificate: issued for '{serial1}', not this device"):
        check_issued(certs, key1, "SOMEONE-ELSE", lambda leaf, chain: None)
    with pytest.raises(EnrollFailed, match="^certificate: the new certificate does not validate"):
        check_issued(certs, key1, serial1, root_verifier(root))        # without its manufacturing CA
    with pytest.raises(EnrollFailed, match="^certificate: the gateway's answer is not a certificate"):
        read_certificates(Answer(0x44, CT_PKCS7_CERTS, b"\x30\x03\x02\x01\x00"))


def test_percentiles_by_nearest_rank():
    values = [i / 1000 for i in range(1, 101)]          # 1 ms .. 100 ms
    assert percentile(values, 50) == 0.051 and percentile([], 50) is None
    assert latency_ms(values) == {"p50": 51.0, "p95": 95.0, "p99": 99.0}
    assert latency_ms([], missing="-") == {"p50": "-", "p95": "-", "p99": "-"}
    steps = [{"connect": 0.002, "renew": 0.010}, {"connect": 0.004}]
    assert step_latency_ms(steps, ["connect", "renew"]) == {"connect": {"p50": 2.0, "p95": 4.0, "p99": 4.0},
                                                            "renew": {"p50": 10.0, "p95": 10.0, "p99": 10.0}}
