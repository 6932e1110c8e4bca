"""The session nonce (issue 13 item 1): the DTLS session's exporter value (RFC 5705) as the
attestation nonce. Both ends compute it, each session has its own, a session without the
extended master secret has none; the verifier takes it as a value; evidence carrying it enrolls
over real loopback DTLS, and neither a replay in another session nor a relay into another
device's session is accepted. The openssl s_client interop check is in test_interop.py."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import timedelta
from pathlib import Path

import cbor2
import pytest
from aiocoap.numbers import codes
from cryptography.hazmat.primitives.asymmetric import ec

from devid.attestation.evidence import Evidence, sign_evidence
from devid.attestation.log import GENESIS, LogEntry, MemoryLogStore, entry_from_appraisal, verify_chain
from devid.attestation.nonces import SERVER, SESSION, MemoryNonceStore, NonceService, SessionNonce
from devid.attestation.policy import Tier, parse_policy
from devid.attestation.verifier import AttestingDevice, Verifier
from devid.gateway.device.client import coap_exchange, device_context
from devid.gateway.device.flow import drive, enroll_flow
from devid.gateway.device.identity import DeviceIdentity, load_bundle, root_verifier
from devid.gateway.device.protocol import EnrollFailed
from devid.gateway.dtls import engine as E, exporter
from devid.gateway.store.attestation_store import AttestationStore

from .conftest import NOW, make_csr, register_device, sql
from .dtls_helpers import client_context_for, client_for, connect, server_engine
from .gateway_helpers import FW, POLICY, request, run_with_gateway, token_for

pytestmark = pytest.mark.engines

DOCS = Path(__file__).parent.parent / "docs" / "evidence.md"
SSL_OP_NO_EXTENDED_MASTER_SECRET = 0x1      # OpenSSL's SSL_OP_BIT(0); pyOpenSSL names no constant


def prf_sha256(secret: bytes, label: bytes, seed: bytes, length: int) -> bytes:
    """TLS 1.2 P_SHA256 (RFC 5246 section 5), written here apart from devid's record layer."""
    out, a = b"", label + seed
    while len(out) < length:
        a = hmac.new(secret, a, hashlib.sha256).digest()
        out += hmac.new(secret, a + label + seed, hashlib.sha256).digest()
    return out[:length]


def rfc5705(master_secret: bytes, client_random: bytes, server_random: bytes) -> bytes:
    """RFC 5705 section 4 without a context: PRF(master_secret, label, client_random + server_random)."""
    return prf_sha256(master_secret, b"EXPERIMENTAL-devid-attestation-nonce", client_random + server_random, 32)


@pytest.fixture
def device(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def server_exporter(net) -> bytes | None:
    (done,) = [e for e in net.server_events if isinstance(e, E.HandshakeComplete)]
    return done.exporter


# -- the engine: both ends, one value per session --------------------------------------------------

def test_both_ends_compute_the_same_value_the_rfc_defines(data, registry, device):
    assert (exporter.LABEL, exporter.LENGTH) == (b"EXPERIMENTAL-devid-attestation-nonce", 32)
    assert exporter.LABEL.startswith(b"EXPERIMENTAL")        # RFC 5705 4: unregistered labels
    srv = server_engine(data, registry)
    client = client_for(data, device)          # the client keeps its OpenSSL object (no record layer)
    net = connect(srv, client)
    value = server_exporter(net)
    assert value is not None and len(value) == 32 and client.exporter == value
    # the server freed its OpenSSL object after computing it: the session is on the record layer
    assert srv.sessions[net.peer].conn is None and srv.sessions[net.peer].rl is not None
    # the definition, from the client's master secret and randoms, computed by this test's own PRF
    conn = client._s.conn
    assert exporter.extended_master_secret(conn)
    assert rfc5705(conn.master_key(), conn.client_random(), conn.server_random()) == value
    # the gateway's record layer still carries the session after the exporter was taken
    assert E.ApplicationData(net.peer, b"ping") in srv.receive(net.peer, client.send(b"ping", 0.0).datagrams[0][1],
                                                              0.0).events


def test_every_session_has_its_own_value_resumed_ones_too(data, registry, device):
    srv = server_engine(data, registry)
    values = []
    first = client_for(data, device)
    values.append(server_exporter(connect(srv, first, peer=("10.0.0.1", 40000))))
    second = E.ClientEngine(first.context, ("gw", 5684))
    values.append(server_exporter(connect(srv, second, peer=("10.0.0.1", 40001))))
    resumed = E.ClientEngine(first.context, ("gw", 5684), session=first.session)
    net = connect(srv, resumed, peer=("10.0.0.1", 40002))
    (done,) = [e for e in net.server_events if isinstance(e, E.HandshakeComplete)]
    assert done.resumed and done.exporter == resumed.exporter
    values.append(done.exporter)
    assert [first.exporter, second.exporter] == values[:2]
    assert len(set(values)) == 3 and None not in values


def test_a_session_without_the_extended_master_secret_has_none(data, registry, device):
    key, cert = device
    ctx = client_context_for(cert, [data.cert("manufacturing")], key, data.cert("root"))
    ctx.set_options(SSL_OP_NO_EXTENDED_MASTER_SECRET)
    client = E.ClientEngine(ctx, ("gw", 5684))
    net = connect(server_engine(data, registry), client)
    assert not exporter.extended_master_secret(client._s.conn)
    assert server_exporter(net) is None and client.exporter is None


def test_the_documented_vector(data, registry, device):
    """docs/evidence.md's vector was taken from a real handshake: its exporter value is the
    RFC 5705 value of its master secret and randoms; and a handshake now agrees with the formula
    on both ends."""
    text = DOCS.read_text()
    block = text[text.index("<!-- exporter-vector-begin -->"):text.index("<!-- exporter-vector-end -->")]
    fields = dict(re.findall(r"^(\w+) = ([0-9a-f]+)$", block, re.M))
    assert bytes.fromhex(fields["label"]) == exporter.LABEL
    got = rfc5705(bytes.fromhex(fields["master_secret"]), bytes.fromhex(fields["client_random"]),
                  bytes.fromhex(fields["server_random"]))
    assert got.hex() == fields["exporter"]
    srv = server_engine(data, registry)
    client = client_for(data, device)
    net = connect(srv, client)
    conn = client._s.conn
    assert rfc5705(conn.master_key(), conn.client_random(), conn.server_random()) == server_exporter(net)


# -- the verifier takes the session nonce as a value -----------------------------------------------

@pytest.fixture
def verifier():
    policy = parse_policy(POLICY)
    store = MemoryNonceStore()
    return Verifier(policy, NonceService(store, clock=lambda: NOW), clock=lambda: NOW), store


def evidence_for(key, nonce: bytes) -> bytes:
    return sign_evidence(Evidence(nonce=nonce, ueid=b"\x01" + bytes(16), oemid=1, hwmodel=b"temperature-sensor",
                                  swname=FW.name, swversion=FW.version, fw_alg=FW.alg, fw_digest=FW.digest,
                                  secure_boot=True, dbgstat=2, bootcount=1, iat=int(NOW.timestamp())), key)


def attesting(key, **kw) -> AttestingDevice:
    return AttestingDevice("SN1", "temperature-sensor", "f" * 64, key.public_key(), **kw)


def fresh_session(value: bytes, seconds: float = 1.0) -> SessionNonce:
    return SessionNonce(value, timedelta(seconds=seconds))


def test_a_session_nonce_expires_with_the_nonce_lifetime(verifier):
    """Evidence signed right after the handshake may not be kept and sent hours later on a
    session kept alive: the session's nonce lives as long as a server nonce does."""
    v, _ = verifier
    key = ec.generate_private_key(ec.SECP256R1())
    session = bytes(range(32))
    lifetime = v.policy.nonce_lifetime.total_seconds()
    late = fresh_session(session, seconds=lifetime + 1)
    a = v.appraise(evidence_for(key, session), attesting(key, session_nonce=late))
    assert a.verdict.codes == ("nonce-expired",) and not a.verdict.fresh and not a.verdict.acceptable
    assert not late.used and "open a new session" in a.verdict.reasons[0].message
    assert v.appraise(evidence_for(key, session),
                      attesting(key, session_nonce=fresh_session(session, lifetime - 1))).verdict.fresh


def test_the_verifier_takes_the_sessions_nonce_once_and_no_row(verifier):
    v, store = verifier
    key = ec.generate_private_key(ec.SECP256R1())
    session = bytes(range(32))
    token = evidence_for(key, session)
    held = fresh_session(session)                   # what the gateway keeps for the session
    a = v.appraise(token, attesting(key, session_nonce=held))
    assert (a.verdict.tier, a.verdict.fresh, a.verdict.nonce, a.verdict.codes) == (Tier.AFFIRMING, True, SESSION, ())
    assert held.used                                # claimed by the verifier itself, at the decision
    assert store.outstanding("SN1") == 0 and store._nonces == {}          # nothing stored, nothing consulted
    # the session used it: the same evidence again in that session is a replay, and never fresh
    again = v.appraise(token, attesting(key, session_nonce=held))
    assert again.verdict.codes == ("nonce-replayed",) and not again.verdict.fresh
    assert again.verdict.nonce == SESSION and not again.verdict.acceptable
    # in another session (another exporter value) it is neither that session's nor issued: refused
    other = v.appraise(token, attesting(key, session_nonce=fresh_session(bytes(32))))
    assert other.verdict.codes == ("nonce-unknown",) and other.verdict.nonce == SERVER
    assert "neither this session's" in other.verdict.reasons[0].message
    # without a session value (a session without the extended master secret): a server nonce only
    assert v.appraise(token, attesting(key)).verdict.codes == ("nonce-unknown",)


def test_a_server_nonce_still_works_beside_a_session_value(verifier):
    v, store = verifier
    key = ec.generate_private_key(ec.SECP256R1())
    record = v.nonces.issue("SN1", "f" * 64)
    a = v.appraise(evidence_for(key, record.value), attesting(key, session_nonce=fresh_session(bytes(range(32)))))
    assert (a.verdict.tier, a.verdict.fresh, a.verdict.nonce) == (Tier.AFFIRMING, True, SERVER)
    assert store.outstanding("SN1") == 0                  # consumed in the store


def test_forged_evidence_does_not_use_up_the_session_nonce(verifier):
    v, _ = verifier
    key = ec.generate_private_key(ec.SECP256R1())
    session = bytes(range(32))
    held = fresh_session(session)
    forged = v.appraise(evidence_for(ec.generate_private_key(ec.SECP256R1()), session),
                        attesting(key, session_nonce=held))
    assert not forged.verdict.fresh and forged.verdict.nonce is None and not held.used
    assert forged.verdict.codes[0] == "signature-invalid"


def test_the_log_entry_records_the_kind_in_its_hash(verifier):
    v, _ = verifier
    key = ec.generate_private_key(ec.SECP256R1())
    session = bytes(range(32))
    entry = entry_from_appraisal(v.appraise(evidence_for(key, session), attesting(key, session_nonce=fresh_session(session))),
                                 1, GENESIS)
    assert entry.nonce == SESSION and entry.body()["nonce"] == "session" and entry.as_json()["nonce"] == "session"
    assert LogEntry.from_json(entry.as_json()) == entry
    assert verify_chain([entry]).ok
    from dataclasses import replace
    assert not verify_chain([replace(entry, nonce=SERVER)]).ok        # the kind cannot be edited unseen
    # an entry without a kind (written before kinds were recorded) hashes as before: no key
    old = replace(entry, nonce=None)
    assert "nonce" not in old.body() and verify_chain([replace(old, hash=old.compute_hash())]).ok


# -- over loopback DTLS, the real gateway ----------------------------------------------------------

async def _verdict(ctx, uri, token):
    r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token, content_format=60)
    assert r.code == codes.CHANGED, r
    body = cbor2.loads(r.payload)
    return body["verdict"], [x["code"] for x in body["reasons"]], body["acceptable"]


async def _session(ctx, uri):
    """(the session's exporter value as the device computed it, as the gateway says it in /whoami)."""
    r = await request(ctx, f"{uri}/whoami")
    return r.remote.exporter, bytes.fromhex(json.loads(r.payload)["session_nonce"])


def test_evidence_with_the_session_nonce_enrolls_and_cannot_be_used_again(world):
    data, out = world
    dev = out / "TS00000001"

    async def body(uri, gw):
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            mine, theirs = await _session(ctx, uri)
            assert mine is not None and len(mine) == 32 and mine == theirs
            token = token_for(dev, mine)
            assert await _verdict(ctx, uri, token) == ("affirming", [], True)
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.CHANGED
            # the same evidence again in the same session (a new request, not a CoAP duplicate)
            tier, reasons, acceptable = await _verdict(ctx, uri, token)
            assert (tier, reasons, acceptable) == ("contraindicated", ["nonce-replayed"], False)
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.FORBIDDEN
        finally:
            await ctx.shutdown()
        # no nonce row was ever written; the log says which kind each appraisal took
        store = AttestationStore(gw.registry)
        assert sql(gw.registry, "SELECT COUNT(*) FROM attestation_nonces")[0][0] == 0
        assert [(e.tier.value, e.nonce) for e in store.log_entries(device_serial="TS00000001")] == \
            [("affirming", "session"), ("contraindicated", "session")]
        assert verify_chain(store.iter_log()).ok
        return token

    token = run_with_gateway(data, body)

    async def replay(uri, gw):
        """The same evidence in a second session of the same device: that session's exporter differs."""
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            mine, _ = await _session(ctx, uri)
            assert token_for(dev, mine) != token
            tier, reasons, acceptable = await _verdict(ctx, uri, token)
            assert (tier, reasons, acceptable) == ("contraindicated", ["nonce-unknown"], False)
            entry = AttestationStore(gw.registry).log_entries(device_serial="TS00000001")[-1]
            assert entry.nonce == "server" and "neither this session's" in entry.reasons[0]["message"]
        finally:
            await ctx.shutdown()
    run_with_gateway(data, replay)


def test_evidence_relayed_into_another_devices_session_is_refused(world):
    data, out = world
    a, b = out / "TS00000001", out / "TS00000002"

    async def body(uri, gw):
        ca_, _ = await device_context(a, "127.0.0.1")
        cb, _ = await device_context(b, "127.0.0.1")
        try:
            nonce_a, _ = await _session(ca_, uri)
            nonce_b, _ = await _session(cb, uri)
            assert nonce_a != nonce_b
            # A's evidence for A's session, relayed into B's session: neither B's key nor B's session
            tier, reasons, acceptable = await _verdict(cb, uri, token_for(a, nonce_a))
            assert tier == "contraindicated" and not acceptable and reasons[0] == "signature-invalid"
            # B signing the nonce of A's session (a machine in the middle passed it on): not B's session's
            tier, reasons, acceptable = await _verdict(cb, uri, token_for(b, nonce_a))
            assert (tier, reasons, acceptable) == ("contraindicated", ["nonce-unknown"], False)
            r = await request(cb, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.FORBIDDEN
            # nor did either use up A's session nonce: A's own evidence still enrolls A
            assert await _verdict(ca_, uri, token_for(a, nonce_a)) == ("affirming", [], True)
        finally:
            await ca_.shutdown()
            await cb.shutdown()
    run_with_gateway(data, body)


def test_the_device_flow_signs_with_the_session_nonce_when_given_it(world):
    """device/flow.py's enroll_flow with `session_nonce`: no GET /attest/nonce, the rest as before."""
    data, out = world
    dev = out / "TS00000003"
    leaf, _, key, root = load_bundle(dev)
    identity = DeviceIdentity.of(leaf, key)

    async def body(uri, gw):
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            session_nonce, _ = await _session(ctx, uri)         # the session is up: its exporter value
            assert identity.session_evidence(session_nonce, FW)
            steps = []
            enrolled, _ = await drive(enroll_flow(identity, FW, root_verifier(root), session_nonce=session_nonce),
                                      coap_exchange(ctx, uri, 15), lambda d: steps.append(d.step))
            assert steps == ["evidence", "enroll", "config"] and enrolled.verdict.acceptable
        finally:
            await ctx.shutdown()
        entry = AttestationStore(gw.registry).log_entries(device_serial="TS00000003")[-1]
        assert (entry.tier.value, entry.nonce) == ("affirming", "session")
    run_with_gateway(data, body)
    with pytest.raises(EnrollFailed, match="no exporter value"):
        identity.session_evidence(None, FW)


def test_a_server_nonce_is_logged_as_such(world):
    data, out = world
    dev = out / "TS00000004"

    async def body(uri, gw):
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            nonce = cbor2.loads((await request(ctx, f"{uri}/attest/nonce")).payload)["nonce"]
            assert len(nonce) == 16
            assert await _verdict(ctx, uri, token_for(dev, nonce)) == ("affirming", [], True)
        finally:
            await ctx.shutdown()
        entry = AttestationStore(gw.registry).log_entries(device_serial="TS00000004")[-1]
        assert entry.nonce == "server"
    run_with_gateway(data, body)
