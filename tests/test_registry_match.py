"""The registry match instead of a second path validation (issue 13 item 5), on the real engine
(real OpenSSL handshakes in memory) and the real registry: what OpenSSL verified, the registry
then matches byte for byte, in one indexed query; `cryptography.x509.verification` runs only for
a certificate no registry row holds. Accepted: factory and operational identities, a superseded
one within its grace. Refused with the same alerts as before: revoked, superseded, unknown (also:
the serial of a recorded certificate with other bytes), expired, another manufacturer's."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.revocation import revoke_device
from devid.gateway.app.datadir import DataDir
from devid.gateway.dtls import contexts, engine as E
from devid.gateway.service.identity import DeviceAuthenticator

from .conftest import NOW, make_csr, register_device
from .dtls_helpers import client_context_for, connect, shuttle, start_pending

pytestmark = pytest.mark.engines


def engine(data, registry, clock=lambda: NOW, grace=timedelta(0)):
    gw = data.issuer("gateway")
    mfg, op = data.cert("manufacturing"), data.cert("operational")
    ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op])
    auth = DeviceAuthenticator(mfg, op, data.config.identity, registry, clock, superseded_grace=grace)
    return E.ServerEngine(ctx, auth)


def client(data, key, cert, anchor="manufacturing"):
    return E.ClientEngine(client_context_for(cert, [data.cert(anchor)], key, data.cert("root")), ("gw", 5684))


def accepted(srv, c):
    connect(srv, c)
    (done,) = [s for s in srv.sessions.values()]
    return done.identity


def refused(srv, c):
    """(the server's reason, the alert the client read)."""
    events = shuttle(srv, c, start_pending(srv, c))
    (failed,) = [e for e in events if isinstance(e, E.HandshakeFailed)]
    assert not c.established
    return failed.reason, (c.closed_reason or "").lower()


def path_validation_ran(srv) -> bool:
    """Whether either DeviceVerifier built its cryptography verifier (it does so on first use)."""
    return any(v._verifier_at is not None for _, v in srv.authenticator._verifiers.values())


@pytest.fixture
def factory(ca):
    key, issued = register_device(ca, "SN1", "temperature-sensor")
    return key, issued.cert


def test_recorded_identities_are_accepted_without_a_second_path_validation(data, registry, ca, factory):
    srv = engine(data, registry)
    ident = accepted(srv, client(data, *factory))
    assert (ident.serial, ident.kind, ident.device_type) == ("SN1", "factory", "temperature-sensor")
    op_key = ec.generate_private_key(ec.SECP256R1())
    op = ca.issue_operational(make_csr(op_key)[0], "SN1", NOW)
    srv2 = engine(data, registry)
    ident = accepted(srv2, client(data, op_key, op.cert, "operational"))
    assert (ident.kind, ident.certificate_serial) == ("operational", op.cert.serial_number)
    assert not path_validation_ran(srv) and not path_validation_ran(srv2)


@pytest.mark.sqlite_only       # SQLite's trace callback and query plan
def test_the_handshake_asks_the_registry_one_indexed_query(data, registry, factory):
    srv = engine(data, registry)
    seen: list[str] = []
    registry._db.set_trace_callback(seen.append)
    try:
        accepted(srv, client(data, *factory))
    finally:
        registry._db.set_trace_callback(None)
    assert len(seen) == 1 and seen[0].startswith("SELECT c.der"), seen
    plan = " ".join(str(row[-1]) for row in registry._db.execute("EXPLAIN QUERY PLAN " + seen[0]).fetchall())
    # the certificate by its primary key (the serial), its device by its primary key: no scan
    assert "SCAN" not in plan.replace("SCAN CONSTANT ROW", ""), plan
    assert "certificates" in plan and "devices" in plan and plan.count("USING INDEX") >= 2, plan


def test_revoked_device_and_revoked_certificate(data, registry, ca, factory):
    registry.revoke_certificate(factory[1].serial_number, "keyCompromise", NOW)
    reason, alert = refused(engine(data, registry), client(data, *factory))
    assert "revoked" in reason and "certificate revoked" in alert
    key, issued = register_device(ca, "SN2")
    revoke_device(registry, "SN2", "keyCompromise", NOW)
    reason, alert = refused(engine(data, registry), client(data, key, issued.cert))
    assert "revoked" in reason and "certificate revoked" in alert


def test_superseded_refused_unless_within_its_grace(data, registry, ca, factory):
    old_key = ec.generate_private_key(ec.SECP256R1())
    old = ca.issue_operational(make_csr(old_key)[0], "SN1", NOW - timedelta(minutes=10))
    ca.issue_operational(make_csr()[0], "SN1", NOW - timedelta(minutes=5))
    reason, alert = refused(engine(data, registry), client(data, old_key, old.cert, "operational"))
    assert "superseded" in reason and "bad certificate" in alert
    ident = accepted(engine(data, registry, grace=timedelta(hours=1)), client(data, old_key, old.cert, "operational"))
    assert ident.certificate_serial == old.cert.serial_number


def _signed_by_our_ca(data, ca, like: x509.Certificate, serial: int | None = None):
    """A certificate our manufacturing CA signed that the registry never recorded: `like`'s subject
    and extensions with another key (and serial, unless given)."""
    mfg = data.issuer("manufacturing")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(like.subject).issuer_name(like.issuer)
               .public_key(key.public_key()).serial_number(serial or x509.random_serial_number())
               .not_valid_before(like.not_valid_before_utc).not_valid_after(like.not_valid_after_utc))
    for ext in like.extensions:
        value = (x509.SubjectKeyIdentifier.from_public_key(key.public_key())
                 if isinstance(ext.value, x509.SubjectKeyIdentifier) else ext.value)
        builder = builder.add_extension(value, ext.critical)
    return key, builder.sign(mfg.key, hashes.SHA256())


def test_unknown_and_same_serial_other_bytes_fall_back_to_path_validation_then_refuse(data, registry, ca, factory):
    srv = engine(data, registry)
    reason, alert = refused(srv, client(data, *_signed_by_our_ca(data, ca, factory[1])))
    assert "unknown to the registry" in reason and "bad certificate" in alert
    assert path_validation_ran(srv)           # no row: the path was validated (it passed), then refused
    # a recorded certificate's serial on other bytes: not the registry's certificate
    twin = _signed_by_our_ca(data, ca, factory[1], serial=factory[1].serial_number)
    reason, alert = refused(engine(data, registry), client(data, *twin))
    assert "unknown to the registry" in reason and "bad certificate" in alert


def test_expired_by_the_gateways_clock_and_by_openssls(data, registry, ca, factory):
    later = factory[1].not_valid_after_utc + timedelta(days=1)
    reason, alert = refused(engine(data, registry, clock=lambda: later), client(data, *factory))
    assert "expired" in reason and "certificate expired" in alert
    # expired on OpenSSL's own clock too: OpenSSL refuses it first, with the same alert
    key = ec.generate_private_key(ec.SECP256R1())
    old = ca.issue_operational(make_csr(key)[0], "SN1", NOW - timedelta(days=120))
    reason, alert = refused(engine(data, registry), client(data, key, old.cert, "operational"))
    assert "expired" in reason and "certificate expired" in alert


def test_another_manufacturers_device_is_refused_by_openssl(data, registry, tmp_path, monkeypatch):
    monkeypatch.delenv("DEVID_REGISTRY", raising=False)     # the other manufacturer's own registry
    other = DataDir(tmp_path / "other")
    other.init(NOW)
    oreg = other.open_registry()
    try:
        key, issued = register_device(other.authority(oreg), "SN1")
    finally:
        oreg.close()
    c = E.ClientEngine(client_context_for(issued.cert, [other.cert("manufacturing")], key, data.cert("root")),
                       ("gw", 5684))
    srv = engine(data, registry)
    reason, alert = refused(srv, c)
    assert "unknown ca" in alert and not path_validation_ran(srv)


def test_openssl_checks_the_purpose_and_the_depth(data, registry):
    """What the second validation checked and OpenSSL now must: EKU clientAuth (the gateway's own
    serverAuth certificate is refused by OpenSSL), and at most two CAs below an anchor."""
    gw = data.issuer("gateway")
    srv = engine(data, registry)
    reason, alert = refused(srv, client(data, gw.key, gw.cert, "operational"))
    assert "unsupported certificate" in alert and not path_validation_ran(srv)
    assert srv.ctx.get_verify_depth() == 2
