"""Issue 13, the gateway side of the one-request enrollment: evidence inside the CSR of /sen
(bound to the DTLS session by its nonce and to the CSR's key by its cnf claim), the answer in
one multipart-core message (certificate, configuration, verdict), the verdict, its use and the
certificate in one write transaction, and /config's ETag. Over real loopback DTLS against the
real gateway; the device side is raw CoAP here (the device client's flow has its own tests)."""

from __future__ import annotations

import pytest

import hashlib
from pathlib import Path

import cbor2
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devid.attestation.evidence import cose_key_xy
from devid.ca.csr_evidence import embed_evidence
from devid.gateway.store.attestation_store import AttestationStore

from .conftest import make_csr, sql
from .gateway_helpers import device_session, problem, request, run_with_gateway, token_for

pytestmark = pytest.mark.engines

SEN, SREN = "/.well-known/est/sen", "/.well-known/est/sren"


def attested_csr(bundle: Path, nonce: bytes, *, bind=True, key=None, **claims) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A CSR for a new key carrying evidence for `nonce`, bound to that key (`bind`: its cnf claim;
    a key pair to bind instead when `bind` is a private key)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    if bind is True:
        claims["cnf_key"] = cose_key_xy(key.public_key())
    elif bind:
        claims["cnf_key"] = cose_key_xy(bind.public_key())
    csr = x509.load_der_x509_csr(make_csr(key)[0])
    return embed_evidence(csr, key, token_for(bundle, nonce, **claims)), key


async def exporter_of(ctx, uri) -> bytes:
    """The session's exporter value, as the device's own DTLS stack computed it."""
    r = await request(ctx, f"{uri}/whoami")
    assert r.code == codes.CONTENT and r.remote.exporter is not None
    return r.remote.exporter


def commits(gw) -> int:
    """Write transactions the gateway's registry has committed so far (either engine)."""
    return gw.registry.commits


def test_one_request_enrolls_and_answers_with_certificate_configuration_and_verdict(world):
    data, out = world
    dev = out / "TS00000001"

    async def body(uri, gw):
        async with device_session(dev) as ctx:
            csr, key = attested_csr(dev, await exporter_of(ctx, uri))
            before = commits(gw)
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            during = commits(gw) - before
            assert r.code == codes.CHANGED and r.opt.content_format == 62, r
            parts = cbor2.loads(r.payload)
            assert [parts[0], parts[2], parts[4]] == [287, 60, 60] and len(parts) == 6
            cert = x509.load_der_x509_certificate(parts[1])
            assert cert.public_key() == key.public_key()
            config = cbor2.loads(parts[3])
            assert (config["device"], config["device_type"]) == ("TS00000001", "temperature-sensor")
            verdict = cbor2.loads(parts[5])
            assert (verdict["verdict"], verdict["acceptable"], verdict["reasons"]) == ("affirming", True, [])
            # the configuration in the answer is what GET /config serves, with the ETag a device computes
            r2 = await request(ctx, f"{uri}/config", accept=60)
            assert r2.payload == parts[3] and r2.opt.etag == hashlib.sha256(parts[3]).digest()[:8]
        # one write transaction: the log entry, its use and the certificate
        assert during == 1
        seq = verdict["log_seq"]
        assert [tuple(r) for r in sql(gw.registry, "SELECT purpose FROM attestation_verdict_uses WHERE seq = ?",
                                      (seq,))] == [("enrollment",)]
        assert [tuple(r) for r in sql(gw.registry, "SELECT nonce_kind FROM attestation_log WHERE seq = ?",
                                      (seq,))] == [("session",)]
        assert sql(gw.registry, "SELECT COUNT(*) FROM attestation_nonces")[0][0] == 0
    run_with_gateway(data, body)


def test_without_accept_62_the_answer_is_rfc_9148s(world):
    data, out = world
    dev = out / "TS00000002"

    async def body(uri, gw):
        async with device_session(dev) as ctx:
            csr, key = attested_csr(dev, await exporter_of(ctx, uri))
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=287)
            assert r.code == codes.CHANGED and r.opt.content_format == 287
            assert x509.load_der_x509_certificate(r.payload).public_key() == key.public_key()
    run_with_gateway(data, body)


def test_the_csr_replayed_in_another_session_or_relayed_to_another_device_is_refused(world):
    data, out = world
    a, b = out / "TS00000001", out / "TS00000002"

    async def body(uri, gw):
        async with device_session(a) as ca_, device_session(b) as cb:
            csr, _ = attested_csr(a, await exporter_of(ca_, uri))
            # relayed into B's session: not B's key
            r = await request(cb, uri + SEN, codes.POST, payload=csr, content_format=286)
            assert r.code == codes.FORBIDDEN and problem(r)[-1] == "attestation refused"
            assert "signature-invalid" in problem(r)[-2]
            ok = await request(ca_, uri + SEN, codes.POST, payload=csr, content_format=286)
            assert ok.code == codes.CHANGED           # the relay used up nothing of A's
        # A's request again, in a new session of A: that session's nonce differs
        async with device_session(a) as ca2:
            await exporter_of(ca2, uri)
            r = await request(ca2, uri + SEN, codes.POST, payload=csr, content_format=286)
            assert r.code == codes.FORBIDDEN and "nonce-unknown" in problem(r)[-2]
    run_with_gateway(data, body)


def test_evidence_not_bound_to_the_csrs_key_is_refused(world):
    data, out = world
    dev = out / "TS00000003"

    async def body(uri, gw):
        for bind in (False, ec.generate_private_key(ec.SECP256R1())):
            async with device_session(dev) as ctx:
                csr, _ = attested_csr(dev, await exporter_of(ctx, uri), bind=bind)
                r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
                assert r.code == codes.FORBIDDEN, r
                assert problem(r)[-1] == "attestation refused" and "key-not-bound" in problem(r)[-2]
        assert gw.registry.get_device("TS00000003").state.value == "manufactured"
    run_with_gateway(data, body)


def test_a_plain_csr_for_an_attested_type_is_refused_with_what_to_do(world):
    data, out = world
    dev = out / "TS00000004"

    async def body(uri, gw):
        async with device_session(dev) as ctx:
            r = await request(ctx, uri + SEN, codes.POST, payload=make_csr()[0], content_format=286, accept=62)
            assert r.code == codes.FORBIDDEN
            p = problem(r)
            assert p[-1] == "attestation required" and "evidence in the CSR" in p[-2]
    run_with_gateway(data, body)


def test_contraindicated_evidence_in_the_csr_revokes_when_the_policy_says_so(world):
    data, out = world
    dev = out / "MT00000001"

    async def body(uri, gw):
        async with device_session(dev) as ctx:
            csr, _ = attested_csr(dev, await exporter_of(ctx, uri), fw_digest=bytes(32))
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286)
            assert r.code == codes.FORBIDDEN and "firmware-unknown" in problem(r)[-2]
            assert "revoked" in problem(r)[-2]
        assert gw.registry.get_device("MT00000001").state.value == "revoked"
    run_with_gateway(data, body)


def test_renewal_refuses_evidence_and_answers_multipart_and_config_etag_validates(world):
    data, out = world
    dev = out / "TS00000001"

    async def body(uri, gw):
        async with device_session(dev) as ctx:
            csr, key = attested_csr(dev, await exporter_of(ctx, uri))
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=287)
            assert r.code == codes.CHANGED
            leaf = r.payload
            full = await request(ctx, f"{uri}/config", accept=60)
            etag = hashlib.sha256(full.payload).digest()[:8]
            assert full.code == codes.CONTENT and full.opt.etag == etag
            valid = await request(ctx, f"{uri}/config", accept=60, etags=[etag])
            assert valid.code == codes.VALID and valid.opt.etag == etag and valid.payload == b""
            stale = await request(ctx, f"{uri}/config", accept=60, etags=[b"\x00" * 8])
            assert stale.code == codes.CONTENT and stale.payload == full.payload
        (dev / "op-cert.pem").write_bytes(x509.load_der_x509_certificate(leaf).public_bytes(serialization.Encoding.PEM)
                                          + (dev / "ca.pem").read_bytes())
        (dev / "op-key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        async with device_session(dev, cert_name="op-cert.pem", key_name="op-key.pem") as op:
            nonce = await exporter_of(op, uri)
            bad, _ = attested_csr(dev, nonce)
            r = await request(op, uri + SREN, codes.POST, payload=bad, content_format=286)
            assert r.code == codes.BAD_REQUEST and "taken at enrollment (/sen) only" in problem(r)[-2]
            newkey = ec.generate_private_key(ec.SECP256R1())
            r = await request(op, uri + SREN, codes.POST, payload=make_csr(newkey)[0], content_format=286, accept=62)
            assert r.code == codes.CHANGED and r.opt.content_format == 62
            parts = cbor2.loads(r.payload)
            assert [parts[0], parts[2]] == [287, 60] and len(parts) == 4
            assert x509.load_der_x509_certificate(parts[1]).public_key() == newkey.public_key()
            assert hashlib.sha256(parts[3]).digest()[:8] == etag        # the same configuration
    run_with_gateway(data, body)


def test_a_configuration_that_cannot_be_served_refuses_before_anything_is_issued(world):
    """Accept 62 asks for the configuration with the certificate: a broken template refuses the
    request (5.03) and no certificate is issued that the device would never receive."""
    data, out = world
    dev = out / "TS00000002"

    async def body(uri, gw):
        (data.path / "config" / "default.toml").write_text("[endpoints\n")     # the gateway wrote a good one
        async with device_session(dev) as ctx:
            csr, _ = attested_csr(dev, await exporter_of(ctx, uri))
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            assert r.code == codes.SERVICE_UNAVAILABLE and problem(r)[-1] == "configuration unavailable"
        assert gw.registry.get_device("TS00000002").state.value == "manufactured"
        assert sql(gw.registry, "SELECT COUNT(*) FROM certificates WHERE device_serial = ? AND "
                                "profile = 'operational'", ("TS00000002",))[0][0] == 0
    run_with_gateway(data, body)


def test_after_an_error_answer_the_device_retries_in_the_same_session(world):
    """Nothing issued, nothing used up: a broken template (5.03, found before the evidence is
    appraised) and the certificate quota (4.29, inside the transaction that rolls back whole)
    leave the session's nonce unused, so the same request succeeds once the cause is gone."""
    from datetime import datetime, timedelta, timezone

    from devid.gateway.service.budgets import Budgets
    data, out = world
    dev = out / "TS00000004"
    now = [datetime.now(timezone.utc)]

    async def body(uri, gw):
        async with device_session(dev) as first:
            csr, _ = attested_csr(dev, await exporter_of(first, uri))
            r = await request(first, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            assert r.code == codes.CHANGED                          # the one certificate of the window
        async with device_session(dev) as ctx:
            csr, _ = attested_csr(dev, await exporter_of(ctx, uri))
            template = data.path / "config" / "default.toml"
            good = template.read_text()
            template.write_text("[endpoints\n")
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            assert r.code == codes.SERVICE_UNAVAILABLE and problem(r)[-1] == "configuration unavailable"
            template.write_text(good)
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            assert r.code == codes.TOO_MANY_REQUESTS and problem(r)[-1] == "too many certificates"
            now[0] += timedelta(hours=25)                           # the window has passed
            # the session's nonce again (new evidence only for its iat, 25 h on: the gateway's clock)
            csr, _ = attested_csr(dev, await exporter_of(ctx, uri), iat=int(now[0].timestamp()))
            r = await request(ctx, uri + SEN, codes.POST, payload=csr, content_format=286, accept=62)
            assert r.code == codes.CHANGED, problem(r)
            assert cbor2.loads(cbor2.loads(r.payload)[5])["acceptable"] is True
        entries = [(e.acceptable, e.nonce)
                   for e in AttestationStore(gw.registry).log_entries(device_serial="TS00000004")]
        assert entries == [(True, "session"), (True, "session")]     # no replay was logged
    run_with_gateway(data, body, clock=lambda: now[0], budgets=Budgets(certificates_per_window=1))


def test_the_documented_cnf_encoding_is_the_claims():
    """docs/evidence.md's byte layout of the cnf claim is what `Evidence` encodes and decodes."""
    from devid.attestation.evidence import Evidence, decode_claims, encode_claims
    text = (Path(__file__).parent.parent / "docs" / "evidence.md").read_text()
    for group in ("08 ", "a1 01 ", "a4 01 02 20 01", "21 58 20 <x>", "22 58 20 <y>"):
        assert group in text
    x, y = cose_key_xy(ec.generate_private_key(ec.SECP256R1()).public_key())
    ev = Evidence(nonce=bytes(32), ueid=b"\x01" + bytes(16), oemid=12345, hwmodel=b"t", swname="f", swversion="1",
                  fw_alg="sha-256", fw_digest=bytes(32), secure_boot=True, dbgstat=2, bootcount=1, iat=1, cnf_key=(x, y))
    encoded = encode_claims(ev)
    assert encoded[0] == 0xac                                       # twelve pairs
    assert bytes.fromhex("08a101a401022001215820") + x + bytes.fromhex("225820") + y in encoded
    assert decode_claims(encoded).cnf_key == (x, y)
