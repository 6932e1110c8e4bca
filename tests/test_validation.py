"""Path validation (cryptography.x509.verification) followed by the registry's revocation check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from devid.ca.errors import DeviceRevoked, ValidationFailed
from devid.ca.revocation import revoke_device
from devid.ca.validation import DeviceVerifier
from devid.gateway.app.datadir import DataDir

from .conftest import NOW, make_csr, register_device


@pytest.fixture
def factory(data, ca, registry):
    return DeviceVerifier(data.cert("manufacturing"), "factory", ca.settings, registry)


@pytest.fixture
def operational(data, ca, registry):
    return DeviceVerifier(data.cert("operational"), "operational", ca.settings, registry)


def test_valid_factory_and_operational_identities(ca, factory, operational):
    _, idevid = register_device(ca, "SN1", "door-lock")
    ident = factory.verify(idevid.cert, now=NOW)
    assert (ident.serial, ident.device_type) == ("SN1", "door-lock")
    ldevid = ca.issue_operational(make_csr()[0], "SN1", NOW)
    assert operational.verify(ldevid.cert, now=NOW).certificate_serial == ldevid.cert.serial_number
    # each verifier accepts only its own kind of identity
    with pytest.raises(ValidationFailed):
        factory.verify(ldevid.cert, now=NOW)
    with pytest.raises(ValidationFailed):
        operational.verify(idevid.cert, now=NOW)


def test_certificate_from_another_ca(tmp_path, factory):
    other = DataDir(tmp_path / "other")
    other.init(NOW)
    reg = other.open_registry()
    _, foreign = register_device(other.authority(reg), "SN1")
    with pytest.raises(ValidationFailed, match="does not validate"):
        factory.verify(foreign.cert, now=NOW)


def test_expired_and_not_yet_valid(ca, factory, operational):
    _, idevid = register_device(ca, "SN1")
    ldevid = ca.issue_operational(make_csr()[0], "SN1", NOW)
    with pytest.raises(ValidationFailed):
        operational.verify(ldevid.cert, now=NOW + timedelta(days=91))
    with pytest.raises(ValidationFailed):
        factory.verify(idevid.cert, now=NOW - timedelta(days=1))


def test_revoked_device_is_refused(ca, registry, factory):
    _, idevid = register_device(ca, "SN1")
    factory.verify(idevid.cert, now=NOW)
    revoke_device(registry, "SN1", "keyCompromise", NOW)
    with pytest.raises(DeviceRevoked):
        factory.verify(idevid.cert, now=NOW)


def test_certificate_unknown_to_the_registry_is_refused(ca, factory):
    """Signed by our CA but never recorded (e.g. a stolen CA key): refused."""
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1())
    ghost = ca.sign_device_certificate(key.public_key(), ca.profiles["factory"], "GHOST", "t", NOW)
    with pytest.raises(ValidationFailed, match="unknown to the registry"):
        factory.verify(ghost.cert, now=NOW)


def test_gateway_server_certificate_is_not_a_client(data, operational):
    with pytest.raises(ValidationFailed):
        operational.verify(data.cert("gateway"), now=NOW)


def test_ca_certificate_is_not_a_device(data, factory):
    with pytest.raises(ValidationFailed):
        factory.verify(data.cert("manufacturing"), now=NOW)


def test_chain_too_long_is_refused(data, ca, registry):
    """Anchored at the root with the intermediate supplied: depth 1 allowed, then refused at 0."""
    _, idevid = register_device(ca, "SN1")
    at_root = DeviceVerifier(data.cert("root"), "factory", ca.settings, registry, max_chain_depth=1)
    assert at_root.verify(idevid.cert, [data.cert("manufacturing")], now=NOW).serial == "SN1"
    too_short = DeviceVerifier(data.cert("root"), "factory", ca.settings, registry, max_chain_depth=0)
    with pytest.raises(ValidationFailed):
        too_short.verify(idevid.cert, [data.cert("manufacturing")], now=NOW)


def test_read_identity_refuses_inconsistent_serials(ca):
    """A certificate whose subject serial disagrees with its hardwareModuleName is not an identity."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from devid.ca.identity import read_device_identity
    from devid.ca.errors import InvalidSerial
    key = ec.generate_private_key(ec.SECP256R1())
    good = ca.sign_device_certificate(key.public_key(), ca.profiles["factory"], "SN1", "t", NOW).cert
    builder = (x509.CertificateBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, "SN2")]))
        .issuer_name(good.issuer).public_key(key.public_key()).serial_number(5)
        .not_valid_before(good.not_valid_before_utc).not_valid_after(good.not_valid_after_utc))
    for e in good.extensions:
        builder = builder.add_extension(e.value, e.critical)
    forged = builder.sign(key, hashes.SHA256())
    with pytest.raises(InvalidSerial, match="hardwareModuleName"):
        read_device_identity(forged, ca.settings)
