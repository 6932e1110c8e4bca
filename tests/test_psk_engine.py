"""PSK in the sans-I/O engine and the keys behind it (issue 18): a PSK handshake on the same
engine as certificate handshakes, the record layer taking over PSK-AES128-CCM8, the alerts a
refused identity or a wrong key earns, and ca/psk.py's identities, keys and sealed secret."""

from __future__ import annotations

import stat

import pytest

from devid.ca import psk as ca_psk
from devid.ca.errors import KeyFileError, WrongPassphrase
from devid.ca.revocation import revoke_device
from devid.gateway.dtls import contexts, engine as E
from devid.gateway.dtls.recordlayer import RecordLayer
from devid.gateway.factory.provisioning import provision
from devid.gateway.service.identity import DeviceAuthenticator, PskDeviceAuthenticator

from .conftest import NOW
from .dtls_helpers import FakeNetwork, client_context_from_bundle, works

PEER_PSK, PEER_X509 = ("10.0.0.1", 40000), ("10.0.0.2", 40000)


@pytest.fixture
def psk_gateway(data, ca, tmp_path):
    secret = data.psk_secret(create=True)
    out = tmp_path / "factory"
    provision(ca, count=2, device_type="temperature-sensor", out=out, manufacturing_pem=data.cert_pem("manufacturing"),
              root_pem=data.cert_pem("root"), now=lambda: NOW, workers=1, psk_secret=secret)
    gw = data.issuer("gateway")
    mfg, op = data.cert("manufacturing"), data.cert("operational")
    ctx = contexts.server_context(gw.cert, [op], gw.key, [mfg, op], [mfg, op], psk=True)
    auth = DeviceAuthenticator(mfg, op, data.config.identity, ca.store, lambda: NOW)
    psk = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW)
    psk.load_now()
    engine = E.ServerEngine(ctx, auth, psk=psk)
    return engine, out, secret


def psk_client(identity: bytes, key: bytes) -> E.ClientEngine:
    return E.ClientEngine(contexts.psk_client_context(), ("gw", 5684), psk=(identity, key), takeover=True)


def bundle_psk(out, serial: str) -> tuple[bytes, bytes]:
    return (out / serial / "psk-identity.txt").read_bytes(), (out / serial / "psk-key.txt").read_bytes()


def test_psk_and_x509_handshakes_on_one_engine(psk_gateway):
    engine, out, _ = psk_gateway
    client = psk_client(*bundle_psk(out, "SN00000001"))
    net = FakeNetwork(engine, peer=PEER_PSK)
    assert net.run(client, lambda: client.established, real_timeout=5), client.closed_reason
    (done,) = [e for e in net.server_events if isinstance(e, E.HandshakeComplete)]
    assert done.cipher == "PSK-AES128-CCM8" and not done.resumed
    assert (done.identity.serial, done.identity.kind, done.identity.device_type) == (
        "SN00000001", "factory-psk", "temperature-sensor")
    # the identity carries the device's factory certificate (its key is the attestation key)
    factory = (out / "SN00000001" / "cert.pem").read_bytes()
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(factory)
    assert done.identity.certificate_serial == cert.serial_number and done.identity.public_key == cert.public_key()
    session = engine.sessions[PEER_PSK]
    assert isinstance(session.rl, RecordLayer) and session.conn is None      # the record layer took over
    assert works(engine, net, client)

    x509_client = E.ClientEngine(client_context_from_bundle(out / "SN00000002"), ("gw", 5684))
    net2 = FakeNetwork(engine, peer=PEER_X509)
    assert net2.run(x509_client, lambda: x509_client.established, real_timeout=5), x509_client.closed_reason
    (done2,) = [e for e in net2.server_events if isinstance(e, E.HandshakeComplete)]
    assert done2.identity.kind == "factory" and done2.cipher.startswith("ECDHE-ECDSA")
    assert works(engine, net, client) and works(engine, net2, x509_client)


@pytest.mark.parametrize("case", ["unknown identity", "wrong key", "not a devid identity"])
def test_refused_psk_handshakes_earn_their_alert(psk_gateway, case):
    engine, out, _ = psk_gateway
    identity, key = bundle_psk(out, "SN00000001")
    identity, key, said, why = {
        # RFC 4279 section 2: every refusal looks like a wrong key to the peer (a dummy key for a
        # refused identity, so nobody learns which devices exist); the log has the real reason
        "unknown identity": (b"SN00000099", key, "decrypt error", "device SN00000099 unknown"),
        "wrong key": (identity, b"x" * 16, "decrypt error", "wrong key for PSK identity 'SN00000001'"),
        "not a devid identity": (b"bad identity!", key, "decrypt error", "not a devid PSK identity"),
    }[case]
    client = psk_client(identity, key)
    net = FakeNetwork(engine, peer=PEER_PSK)
    assert net.run(client, lambda: client.state is E.State.CLOSED, real_timeout=5)
    assert said in client.closed_reason
    (failed,) = [e for e in net.server_events if isinstance(e, E.HandshakeFailed)]
    assert why in failed.reason
    assert key.decode() not in failed.reason
    assert not engine.sessions and engine.half_open == 0 and engine.stats.failed == 1


def test_revoked_device_has_no_psk(psk_gateway, ca):
    engine, out, _ = psk_gateway
    revoke_device(ca.store, "SN00000001", "keyCompromise", NOW)
    client = psk_client(*bundle_psk(out, "SN00000001"))
    net = FakeNetwork(engine, peer=PEER_PSK)
    assert net.run(client, lambda: client.state is E.State.CLOSED, real_timeout=5)
    assert "decrypt error" in client.closed_reason
    (failed,) = [e for e in net.server_events if isinstance(e, E.HandshakeFailed)]
    assert "revoked" in failed.reason


def test_psk_identities_and_keys():
    secret = bytes(range(32))
    key = ca_psk.derive_key(secret, "SN00000001")
    assert len(key) == ca_psk.KEY_CHARS == 16 and ca_psk.KEY_BITS == 96
    assert key == ca_psk.derive_key(secret, "SN00000001")
    assert key != ca_psk.derive_key(secret, "SN00000002") != ca_psk.derive_key(bytes(32), "SN00000002")
    op = ca_psk.operational_identity("SN00000001")
    assert op == "op:SN00000001"
    # an operational key rotates with its certificate
    assert ca_psk.derive_key(secret, op, 1) != ca_psk.derive_key(secret, op, 2)
    assert ca_psk.parse_identity(b"SN00000001") == ("factory-psk", "SN00000001")
    assert ca_psk.parse_identity(b"op:SN00000001") == ("operational-psk", "SN00000001")
    for bad in (b"", b"op:", b"SN 1", b"op:op:SN1", b"\xff", b"SN/1", b"x" * 65, b"x" * 33, b"op:" + b"x" * 30):
        assert ca_psk.parse_identity(bad) is None, bad
    # the longest identities devid issues: tinydtls's 32 bytes
    assert ca_psk.parse_identity(b"x" * 32) == ("factory-psk", "x" * 32)
    assert ca_psk.parse_identity(b"op:" + b"x" * 29) == ("operational-psk", "x" * 29)


def test_the_secret_is_sealed_made_once_and_needs_the_passphrase(tmp_path):
    path = tmp_path / "psk.secret"
    assert ca_psk.load_secret(path, b"pass") is None
    made = ca_psk.ensure_secret(path, b"pass")
    assert len(made) == 32 and made not in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ca_psk.ensure_secret(path, b"pass") == made == ca_psk.load_secret(path, b"pass")
    with pytest.raises(WrongPassphrase):
        ca_psk.load_secret(path, b"other")
    path.chmod(0o644)
    with pytest.raises(KeyFileError):
        ca_psk.load_secret(path, b"pass")
    path.chmod(0o600)
    path.write_bytes(path.read_bytes()[:-10] + b"\n")
    with pytest.raises(KeyFileError):
        ca_psk.load_secret(path, b"pass")


def test_a_psk_stands_only_for_a_certificate_within_its_validity(psk_gateway, ca):
    """Review finding 2: the factory certificate a PSK stands for is checked against the clock,
    as a certificate in a handshake is (DeviceAuthenticator): expired or not yet valid, refused."""
    from datetime import timedelta

    from cryptography import x509

    from devid.gateway.dtls.psk import PskRefused

    _, out, secret = psk_gateway
    cert = x509.load_pem_x509_certificate((out / "SN00000001" / "cert.pem").read_bytes())
    identity, key = bundle_psk(out, "SN00000001")
    for when, said in ((cert.not_valid_after_utc + timedelta(seconds=1), "expired"),
                       (cert.not_valid_before_utc - timedelta(seconds=1), "not valid before")):
        auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda when=when: when)
        auth.load_now()
        with pytest.raises(PskRefused, match=said):
            auth.psk_for(identity)
    auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW)
    auth.load_now()
    got, who = auth.psk_for(identity)
    assert got == key and who.certificate_serial == cert.serial_number


def test_a_secret_that_appears_later_is_read_off_the_handshake(psk_gateway, ca):
    """Review finding 5: a PSK secret made while the gateway runs is read in a thread of its
    own, never inside the handshake callback: a lookup meanwhile is refused at once."""
    import threading
    import time

    from devid.gateway.dtls.psk import PskRefused

    _, out, secret = psk_gateway
    identity, key = bundle_psk(out, "SN00000001")
    release, asked = threading.Event(), []

    def slow_load():                   # as scrypt is, and slower: until the test releases it
        asked.append(threading.current_thread().name)
        release.wait(30)
        return secret

    auth = PskDeviceAuthenticator(ca.store, slow_load)
    with pytest.raises(PskRefused, match="no PSK secret"):
        auth.psk_for(identity)         # returns at once, though the load has not finished
    release.set()
    deadline = time.monotonic() + 10
    while auth.secret() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert auth.psk_for(identity)[0] == key
    assert asked == ["devid-psk-secret"]          # once, and not on this thread


def test_a_psk_stands_only_for_a_certificate_of_the_gateways_ca_within_its_validity(psk_gateway, ca, data):
    """Review 18b L3: as a handshake's chain must, the CA certificate that issued the certificate a
    PSK stands for must be this gateway's and within its validity."""
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from devid.gateway.dtls.psk import PskRefused
    from devid.gateway.service.identity import FACTORY

    _, out, secret = psk_gateway
    identity, key = bundle_psk(out, "SN00000001")
    mfg = data.cert("manufacturing")

    def ca_cert(subject: x509.Name, before, after) -> x509.Certificate:
        k = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(k.public_key())
                .serial_number(1).not_valid_before(before).not_valid_after(after).sign(k, hashes.SHA256()))

    other = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Another Manufacturing CA")])
    cases = [(ca_cert(mfg.subject, NOW - timedelta(days=30), NOW - timedelta(days=1)), "outside its validity"),
             (ca_cert(mfg.subject, NOW + timedelta(days=1), NOW + timedelta(days=30)), "outside its validity"),
             (ca_cert(other, NOW - timedelta(days=1), NOW + timedelta(days=30)), "not of this gateway's CA")]
    for issuer, said in cases:
        auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW,
                                      issuers={FACTORY: [issuer, data.cert("root")]})
        auth.load_now()
        with pytest.raises(PskRefused, match=said):
            auth.psk_for(identity)
    # the root above it, outside its validity, refuses too
    expired_root = ca_cert(data.cert("root").subject, NOW - timedelta(days=30), NOW - timedelta(days=1))
    auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW, issuers={FACTORY: [mfg, expired_root]})
    auth.load_now()
    with pytest.raises(PskRefused, match="outside its validity"):
        auth.psk_for(identity)
    auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW, issuers={FACTORY: [mfg, data.cert("root")]})
    auth.load_now()
    assert auth.psk_for(identity)[0] == key


def test_a_device_provisioned_without_a_psk_has_none(psk_gateway, ca, data, tmp_path):
    """Review 18b L4: the gateway derives PSKs, so it could derive one for any device; it accepts
    them only for devices provisioned with --psk (the registry's devices.psk), not for a device
    whose only identity is its certificate (a key in its secure element)."""
    from devid.ca import psk as ca_psk
    from devid.gateway.dtls.psk import PskRefused

    _, out, secret = psk_gateway
    provision(ca, count=1, device_type="temperature-sensor", out=tmp_path / "x509", serial_prefix="XS",
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"), now=lambda: NOW,
              workers=1)
    assert ca.store.get_device("XS00000001").psk is False and ca.store.get_device("SN00000001").psk is True
    auth = PskDeviceAuthenticator(ca.store, lambda: secret, clock=lambda: NOW)
    auth.load_now()
    with pytest.raises(PskRefused, match="not provisioned with a PSK"):
        auth.psk_for(ca_psk.factory_identity("XS00000001").encode())
    identity, key = bundle_psk(out, "SN00000001")
    assert auth.psk_for(identity)[0] == key


def test_a_secret_that_cannot_be_used_is_looked_at_less_and_less_often(ca):
    """Review 18c L3: each look at a secret that is there but fails costs an scrypt (~0.5 s of
    CPU) and an ERROR line: the looks back off, twice as long each time, up to 5 minutes."""
    import threading
    import time

    from devid.ca.errors import CAError
    from devid.gateway.service.identity import SECRET_BACKOFF_MAX

    now, looks = [0.0], []

    def failing():
        looks.append(now[0])
        raise CAError("DATA/ca/psk.secret is not the PSK secret of this registry's devices")

    auth = PskDeviceAuthenticator(ca.store, failing, monotonic=lambda: now[0])
    assert auth.load_now() is None                  # at start: not fatal (X.509 devices are served)
    for t in range(0, 700):
        now[0] = float(t)
        assert auth.secret() is None
        deadline = time.monotonic() + 10
        while any(th.name == "devid-psk-secret" for th in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.001)
    assert looks == [0, 5, 15, 35, 75, 155, 315, 615]
    assert SECRET_BACKOFF_MAX == 300 and looks[-1] - looks[-2] == 300
