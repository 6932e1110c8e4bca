"""The device side of the one-request enrollment (issue 13; gateway/device/flow_one.py), driven
over both device transports (aiocoap, what `devid enroll` uses; the load generator's lean DTLS
sessions) against the real gateway on loopback: one request, the evidence in the CSR bound to the
session (the device's own exporter value) and to the new key, the answer's certificate,
configuration and verdict read and checked; the server-nonce fallback; refusals; the CA found
through EST /crts when the configuration does not list it; a renewal with the configuration.

The strict reading of the multipart-core answer against answers no real gateway sends (and the
CLI, the simulator and the load generator end to end) are in test_one_request_answers.py and
test_one_request_cli.py."""

from __future__ import annotations

import hashlib
from contextlib import asynccontextmanager
from pathlib import Path

import cbor2
import pytest
from cryptography import x509

from devid.attestation.evidence import cose_key_xy, decode_evidence
from devid.ca.csr_evidence import extract_evidence
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.device.client import coap_exchange, open_session
from devid.gateway.device.flow import Issued, config_flow, drive
from devid.gateway.device.flow_one import one_request_flow, renew_one_flow
from devid.gateway.device.identity import DeviceIdentity, Firmware, load_bundle, operational_files, root_verifier
from devid.gateway.device.protocol import CRTS, CT_MULTIPART, NONCE, SEN, SREN, EnrollFailed, Request, parse_gateway
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.configuration import DEFAULT_TEMPLATE

from .gateway_helpers import FW, run_with_gateway
from .transport_helpers import TIMEOUT, over_lean

pytestmark = pytest.mark.engines

BAD_FW = Firmware("sha-256", hashlib.sha256(b"tampered").digest(), FW.name, FW.version)


@asynccontextmanager
async def over_aiocoap(bundle: Path, uri: str, operational: bool = False):
    """(exchange, the session's exporter value as this end computed it) over aiocoap."""
    names = ("op-chain.pem", "op-key.pem") if operational else ("chain.pem", "key.pem")
    gateway = parse_gateway(uri)
    ctx, exporter = await open_session(bundle, gateway, TIMEOUT, *names)
    try:
        yield coap_exchange(ctx, gateway.base, TIMEOUT), exporter
    finally:
        await ctx.shutdown()


TRANSPORTS = {"aiocoap": over_aiocoap, "lean": over_lean}


def recording(exchange, sent: list[Request]):
    """The exchange, keeping every request the flow sends (what goes on the wire, counted)."""
    async def send(request: Request):
        sent.append(request)
        return await exchange(request)
    return send


def identity_of(bundle: Path):
    factory, _, key, root = load_bundle(bundle)
    return DeviceIdentity.of(factory, key), root


def evidence_in(request: Request, factory_key):
    """The claims of the evidence the request's CSR carries, its signature checked."""
    token = extract_evidence(x509.load_der_x509_csr(request.payload), max_size=4096)
    return decode_evidence(token, factory_key.public_key())


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_one_request_enrolls_with_the_sessions_own_nonce(world, transport):
    data, out = world
    bundle = out / "TS00000001"
    identity, root = identity_of(bundle)

    async def body(uri, gw):
        sent: list[Request] = []
        async with TRANSPORTS[transport](bundle, uri) as (exchange, exporter):
            assert exporter is not None and len(exporter) == 32       # the device's own value, no /whoami
            seen = []
            enrolled, steps = await drive(one_request_flow(identity, FW, root_verifier(root), session_nonce=exporter),
                                          recording(exchange, sent), seen.append)
            # the configuration in the answer is GET /config's, byte for byte (asked afterwards)
            again, _ = await drive(config_flow(identity.serial, identity.device_type), exchange)
        return enrolled, steps, seen, sent, exporter, again

    enrolled, steps, seen, sent, exporter, again = run_with_gateway(data, body)
    # one request: POST /sen with Accept 62; no nonce, evidence or /config request
    assert [r.endpoint for r in sent] == [SEN[CT_MULTIPART]]
    assert SEN[CT_MULTIPART].accept == CT_MULTIPART == 62
    # reported as the classic flow reports: the verdict, the certificate, the configuration
    assert [d.step for d in seen] == ["evidence", "enroll", "config"]
    assert set(steps) == {"enroll", "evidence", "config"}          # the round trip counts to `enroll`
    assert enrolled.verdict.tier == "affirming" and enrolled.verdict.acceptable and enrolled.verdict.log_seq == 1
    # the evidence: the session's nonce, bound to the new key, signed with the factory key
    claims = evidence_in(sent[0], identity.factory_key)
    issued = enrolled.issued
    assert claims.nonce == exporter and claims.cnf_key == cose_key_xy(issued.key.public_key())
    assert claims.swname == FW.name and claims.fw_digest == FW.digest
    # the certificate: for the new key, validating to the root with the CA the configuration lists
    assert issued.certificate.public_key() == issued.key.public_key()
    assert [c.subject for c in issued.chain] == [issued.certificate.subject, data.cert("operational").subject]
    assert enrolled.config.raw == again.raw and enrolled.config.data["device"] == "TS00000001"
    reg = data.open_registry(readonly=True)
    try:
        assert reg.get_device("TS00000001").state is DeviceState.ENROLLED
        entry = AttestationStore(reg).log_entries(device_serial="TS00000001")[-1]
        assert (entry.tier.value, entry.nonce, entry.seq) == ("affirming", "session", enrolled.verdict.log_seq)
    finally:
        reg.close()


def test_without_a_session_nonce_the_flow_asks_for_a_server_nonce(world):
    """A session without an exporter value (no extended master secret): GET /attest/nonce first."""
    data, out = world
    bundle = out / "TS00000002"
    identity, root = identity_of(bundle)

    async def body(uri, gw):
        sent: list[Request] = []
        async with over_aiocoap(bundle, uri) as (exchange, _):
            seen = []
            enrolled, steps = await drive(one_request_flow(identity, FW, root_verifier(root), session_nonce=None),
                                          recording(exchange, sent), seen.append)
        entry = AttestationStore(gw.registry).log_entries(device_serial="TS00000002")[-1]
        return enrolled, seen, sent, entry

    enrolled, seen, sent, entry = run_with_gateway(data, body)
    assert [r.endpoint for r in sent] == [NONCE, SEN[CT_MULTIPART]]
    assert [d.step for d in seen] == ["nonce", "evidence", "enroll", "config"]
    assert evidence_in(sent[1], identity.factory_key).nonce == seen[0].value
    assert enrolled.verdict.acceptable and (entry.tier.value, entry.nonce) == ("affirming", "server")


def test_a_waived_device_sends_a_plain_csr_and_gets_no_verdict(world):
    data, out = world
    bundle = out / "LG00000001"
    identity, root = identity_of(bundle)

    async def body(uri, gw):
        sent: list[Request] = []
        async with over_lean(bundle, uri) as (exchange, exporter):
            seen = []
            enrolled, _ = await drive(one_request_flow(identity, None, root_verifier(root), session_nonce=exporter),
                                      recording(exchange, sent), seen.append)
        return enrolled, seen, sent

    enrolled, seen, sent = run_with_gateway(data, body)
    assert [r.endpoint for r in sent] == [SEN[CT_MULTIPART]]
    assert extract_evidence(x509.load_der_x509_csr(sent[0].payload), max_size=4096) is None
    assert [d.step for d in seen] == ["enroll", "config"] and enrolled.verdict is None
    assert enrolled.config.data["device_type"] == "legacy-sensor"


def test_refusals_name_their_step_and_store_nothing(world):
    """Unacceptable evidence in the CSR fails at `evidence` with the gateway's words (as the
    classic flow's verdict does); an attested type without evidence at `enroll`, saying to put
    evidence in the CSR; the flow hands over no certificate either way."""
    data, out = world

    async def body(uri, gw):
        failures = {}
        for name, bundle, fw in (("tampered", out / "TS00000003", BAD_FW), ("none", out / "TS00000004", None)):
            identity, root = identity_of(bundle)
            seen = []
            async with over_aiocoap(bundle, uri) as (exchange, exporter):
                with pytest.raises(EnrollFailed) as failed:
                    await drive(one_request_flow(identity, fw, root_verifier(root), session_nonce=exporter),
                                exchange, seen.append)
            assert seen == []
            failures[name] = failed.value
        return failures

    failures = run_with_gateway(data, body)
    tampered, none = failures["tampered"], failures["none"]
    assert tampered.step == "evidence" and tampered.reason.startswith("verdict contraindicated: ")
    assert "firmware" in tampered.reason
    assert none.step == "enroll" and none.reason.startswith("4.03 Forbidden attestation required: ")
    assert "put evidence in the CSR" in none.reason
    reg = data.open_registry(readonly=True)
    try:
        for serial in ("TS00000003", "TS00000004"):
            assert reg.get_device(serial).state is DeviceState.MANUFACTURED
            assert [c.profile for c in reg.certificates_for_device(serial)] == ["factory"]
    finally:
        reg.close()


def test_the_flows_request_is_good_in_its_own_session_only(world):
    """The CSR the flow made, evidence and all, sent again in a second session of the same device
    or in another device's session: refused (the session nonce is not that session's)."""
    data, out = world
    a, b = out / "TS00000001", out / "TS00000002"
    identity, root = identity_of(a)

    async def body(uri, gw):
        sent: list[Request] = []
        async with over_aiocoap(a, uri) as (exchange, exporter):
            await drive(one_request_flow(identity, FW, root_verifier(root), session_nonce=exporter),
                        recording(exchange, sent))
        replies = []
        for bundle in (a, b):
            async with over_lean(bundle, uri) as (exchange, _):
                replies.append(await exchange(sent[0]))
        return replies

    for reply in run_with_gateway(data, body):
        assert reply.code == 0x83 and reply.content_format == 257
        body = cbor2.loads(reply.payload)
        assert body[-1] == "attestation refused" and body[-2].startswith("verdict contraindicated: "), body


def test_the_ca_comes_from_est_crts_when_the_configuration_does_not_list_it(world):
    """A template whose trust anchors are the root alone: the certificate's CA is looked up with
    one more request, GET /.well-known/est/crts, in the same session; op-chain.pem gets it."""
    data, out = world
    (data.path / "config").mkdir(exist_ok=True)
    template = DEFAULT_TEMPLATE.replace('anchors = ["root", "operational"]', 'anchors = ["root"]')
    assert template != DEFAULT_TEMPLATE
    (data.path / "config" / "temperature-sensor.toml").write_text(template)
    bundle = out / "TS00000001"
    identity, root = identity_of(bundle)

    async def body(uri, gw):
        sent: list[Request] = []
        async with over_aiocoap(bundle, uri) as (exchange, exporter):
            seen = []
            enrolled, _ = await drive(one_request_flow(identity, FW, root_verifier(root), session_nonce=exporter),
                                      recording(exchange, sent), seen.append)
        return enrolled, seen, sent

    enrolled, seen, sent = run_with_gateway(data, body)
    assert [r.endpoint for r in sent] == [SEN[CT_MULTIPART], CRTS]
    assert [d.step for d in seen] == ["evidence", "crts", "enroll", "config"]
    assert len(enrolled.config.data["trust_anchors"]) == 1
    assert [c.subject for c in enrolled.issued.chain[1:]] == [data.cert("operational").subject]


@pytest.mark.parametrize("transport", sorted(TRANSPORTS))
def test_a_renewal_gets_its_configuration_in_the_same_answer(world, transport):
    data, out = world
    bundle = out / "TS00000004"
    identity, root = identity_of(bundle)

    async def body(uri, gw):
        async with over_aiocoap(bundle, uri) as (exchange, exporter):
            enrolled, _ = await drive(one_request_flow(identity, FW, root_verifier(root), session_nonce=exporter),
                                      exchange)
        for name, content, mode in operational_files(enrolled.issued.key, enrolled.issued.chain):
            (bundle / name).write_bytes(content)
        sent: list[Request] = []
        async with TRANSPORTS[transport](bundle, uri, operational=True) as (exchange, _):
            seen = []
            (issued, config), steps = await drive(renew_one_flow(identity.serial, identity.device_type,
                                                                 root_verifier(root)), recording(exchange, sent),
                                                  seen.append)
        statuses = {c.serial: c.status for c in gw.registry.certificates_for_device(identity.serial)}
        return enrolled, issued, config, seen, sent, statuses

    enrolled, issued, config, seen, sent, statuses = run_with_gateway(data, body)
    assert [r.endpoint for r in sent] == [SREN[CT_MULTIPART]] and [d.step for d in seen] == ["renew", "config"]
    assert isinstance(issued, Issued) and issued.certificate.public_key() == issued.key.public_key()
    assert statuses[enrolled.issued.certificate.serial_number] is CertStatus.SUPERSEDED
    assert statuses[issued.certificate.serial_number] is CertStatus.CURRENT
    assert config.raw == enrolled.config.raw          # the configuration, as the enrollment's answer had it
