"""Profiles and issuance: what a device certificate contains, and what a CSR cannot change."""

from __future__ import annotations

import hashlib
import ipaddress
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pyasn1.codec.der.decoder import decode as der_decode
from pyasn1_alt_modules import rfc4108

from devid.ca import der
from devid.ca.errors import DeviceRevoked, InvalidCSR, KeyPolicyViolation, UnknownDevice, UnknownProfile
from devid.ca.identity import OID_HARDWARE_MODULE_NAME, read_device_identity
from devid.ca.revocation import revoke_device
from devid.ca.store import CertStatus, DeviceState

from .conftest import NOW, make_csr, register_device


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


def test_factory_certificate_content(ca, data):
    _, issued = register_device(ca, "ABC123DEF456", "temperature-sensor")
    cert = issued.cert
    s = ca.settings
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-ABC123DEF456"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "ABC123DEF456"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == s.organization
    assert cert.issuer == data.cert("manufacturing").subject
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_agreement
    assert not ku.value.key_cert_sign and not ku.value.crl_sign and not ku.value.key_encipherment
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    mfg_ski = ext(data.cert("manufacturing"), x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == mfg_ski
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dev:os:12345-ABC123DEF456"]
    (other,) = san.get_values_for_type(x509.OtherName)
    assert other.type_id == OID_HARDWARE_MODULE_NAME
    # decode hardwareModuleName with an independent ASN.1 implementation (pyasn1, RFC 4108 module)
    hmn, rest = der_decode(other.value, asn1Spec=rfc4108.HardwareModuleName())
    assert rest == b""
    assert str(hmn["hwType"]) == s.hardware_type_oid
    assert bytes(hmn["hwSerialNum"]) == b"ABC123DEF456"
    type_ext = cert.extensions.get_extension_for_oid(s.device_type_oid_obj)
    assert not type_ext.critical
    assert type_ext.value.value == b"\x0c\x12temperature-sensor"   # DER UTF8String
    assert cert.not_valid_after_utc - NOW == timedelta(days=7300)
    assert read_device_identity(cert, s).serial == "ABC123DEF456"


def test_serial_numbers_are_random_positive_and_large(ca):
    serials = set()
    for i in range(40):
        _, issued = register_device(ca, f"SN{i}")
        serials.add(issued.cert.serial_number)
        assert issued.cert.serial_number > 0
        assert issued.cert.serial_number.bit_length() >= 64
        assert issued.cert.serial_number.bit_length() <= 127
    assert len(serials) == 40
    # at least 64 bits differ in practice: the top 64 bits alone are distinct
    assert len({s >> 63 for s in serials}) == 40


def test_operational_profile_ignores_everything_in_the_csr(ca, data):
    register_device(ca, "SN7")
    evil = [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                                      x509.UniformResourceIdentifier("urn:dev:os:12345-OTHER")]), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.KeyUsage(True, True, True, True, True, True, True, False, False), True),
    ]
    csr, key = make_csr(subject="device-OTHER", extensions=evil)
    issued = ca.issue_operational(csr, "SN7", NOW)
    cert = issued.cert
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "device-SN7"
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not ext(cert, x509.KeyUsage).value.key_cert_sign
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == []
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dev:os:12345-SN7"]
    assert cert.issuer == data.cert("operational").subject
    assert cert.not_valid_after_utc - NOW == timedelta(days=90)
    assert len(cert.extensions) == 7


def test_operational_issuance_enrolls_and_supersedes(ca, registry):
    register_device(ca, "SN8")
    first = ca.issue_operational(make_csr()[0], "SN8", NOW)
    assert registry.get_device("SN8").state is DeviceState.ENROLLED
    second = ca.issue_operational(make_csr()[0], "SN8", NOW + timedelta(days=60))
    statuses = {c.serial: (c.profile, c.status) for c in registry.certificates_for_device("SN8")}
    assert statuses[first.cert.serial_number] == ("operational", CertStatus.SUPERSEDED)
    assert statuses[second.cert.serial_number] == ("operational", CertStatus.CURRENT)
    current = [s for s, (p, st) in statuses.items() if st is CertStatus.CURRENT]
    assert len(current) == 2     # the factory identity and the newest operational one


def test_operational_validity_is_configurable(tmp_path):
    from devid.gateway.app.datadir import DataDir
    d = DataDir(tmp_path / "d")
    d.path.mkdir()
    d.config_path.write_text("[profiles]\noperational_validity_days = 30\nfactory_validity_days = 365\n")
    d.init(NOW)
    reg = d.open_registry()
    ca = d.authority(reg)
    _, factory = register_device(ca, "SN1")
    op = ca.issue_operational(make_csr()[0], "SN1", NOW)
    assert factory.cert.not_valid_after_utc - NOW == timedelta(days=365)
    assert op.cert.not_valid_after_utc - NOW == timedelta(days=30)


def test_validity_never_exceeds_the_issuer(tmp_path):
    from devid.gateway.app.datadir import DataDir
    d = DataDir(tmp_path / "d")
    d.path.mkdir()
    d.config_path.write_text("[profiles]\nfactory_validity_days = 36500\n")
    d.init(NOW)
    reg = d.open_registry()
    _, issued = register_device(d.authority(reg), "SN1")
    assert issued.cert.not_valid_after_utc == d.cert("manufacturing").not_valid_after_utc


@pytest.mark.parametrize("case", ["bad-signature", "garbage", "truncated", "empty", "pem-garbage"])
def test_malformed_or_forged_csr_is_refused(ca, case):
    register_device(ca, "SN9")
    good, _ = make_csr()
    data = {
        "bad-signature": good[:-4] + bytes(b ^ 0x5A for b in good[-4:]),
        "garbage": b"\x30\x03\x02\x01\x00",
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "pem-garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    }[case]
    with pytest.raises(InvalidCSR):
        ca.issue_operational(data, "SN9", NOW)
    assert [c.profile for c in ca.store.certificates_for_device("SN9")] == ["factory"]


def test_csr_with_tampered_body_is_refused(ca):
    """Still well-formed DER, but the signed body changed after signing: the signature check catches it."""
    register_device(ca, "SN10")
    csr, _ = make_csr(subject="original-subject")
    forged = csr.replace(b"original-subject", b"origami1-subject")
    assert x509.load_der_x509_csr(forged).subject != x509.load_der_x509_csr(csr).subject
    with pytest.raises(InvalidCSR, match="signature"):
        ca.issue_operational(forged, "SN10", NOW)


@pytest.mark.parametrize("keytype", ["p384", "rsa", "ed25519"])
def test_key_not_allowed_by_profile(ca, keytype):
    register_device(ca, "SN11")
    key = {"p384": lambda: ec.generate_private_key(ec.SECP384R1()),
           "rsa": lambda: rsa.generate_private_key(65537, 2048),
           "ed25519": ed25519.Ed25519PrivateKey.generate}[keytype]()
    csr, _ = make_csr(key, algorithm=None if keytype == "ed25519" else hashes.SHA256())
    with pytest.raises(KeyPolicyViolation):
        ca.issue_operational(csr, "SN11", NOW)


def test_unknown_and_revoked_devices(ca, registry):
    with pytest.raises(UnknownDevice):
        ca.issue_operational(make_csr()[0], "NOPE", NOW)
    register_device(ca, "SN12")
    revoke_device(registry, "SN12", "keyCompromise", NOW)
    with pytest.raises(DeviceRevoked):
        ca.issue_operational(make_csr()[0], "SN12", NOW)


def test_unknown_profile(ca):
    register_device(ca, "SN13")
    with pytest.raises(UnknownProfile):
        ca.issue_operational(make_csr()[0], "SN13", NOW, profile_name="root")


def test_der_helpers_strict():
    oid = x509.ObjectIdentifier("1.3.6.1.4.1.12345.1.2")
    enc = der.encode_hardware_module_name(oid, b"X" * 200)   # long form length
    assert der.decode_hardware_module_name(enc) == (oid, b"X" * 200)
    with pytest.raises(der.DERError):
        der.decode_hardware_module_name(enc + b"\x00")
    with pytest.raises(der.DERError):
        der.decode_utf8_string(der.encode_utf8_string("a") + b"\x00")
    with pytest.raises(der.DERError):
        der.decode_utf8_string(b"\x04\x01a")
    assert der.decode_utf8_string(der.encode_utf8_string("température")) == "température"


def test_tbs_bytes_equal_a_plain_cryptography_build(data, registry):
    """Every byte the CA signs (cached OIDs, RDNs and key usages included) is what a plain
    `cryptography` builder makes from the same inputs: the certificate format did not change."""
    from cryptography.x509 import UnrecognizedExtension
    from devid.ca.authority import random_serial
    fixed = bytes(range(16))
    ca = data.authority(registry, rand_bytes=lambda n: fixed[:n])
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    for profile_name in ("factory", "operational"):
        profile = ca.profiles[profile_name]
        issued = ca.sign_device_certificate(key, profile, "SN-7.x", "valve", NOW)
        issuer = data.issuer(profile.issuer)
        s = ca.settings
        hw_oid = b"\x06" + bytes([len(der.oid_body(s.hardware_type_oid_obj))]) + der.oid_body(s.hardware_type_oid_obj)
        hw_body = hw_oid + b"\x04" + bytes([len(b"SN-7.x")]) + b"SN-7.x"
        hw = b"\x30" + bytes([len(hw_body)]) + hw_body
        plain = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, s.organization),
                                          x509.NameAttribute(NameOID.COMMON_NAME, "device-SN-7.x"),
                                          x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-7.x")]))
                 .issuer_name(issuer.cert.subject)
                 .public_key(key)
                 .serial_number(random_serial(lambda n: fixed[:n]))
                 .not_valid_before(NOW - profile.backdate)
                 .not_valid_after(min(NOW + profile.validity, issuer.cert.not_valid_after_utc))
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
                 .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False, False), True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), False)
                 .add_extension(issuer.aki, False)
                 .add_extension(x509.SubjectAlternativeName([
                     x509.OtherName(OID_HARDWARE_MODULE_NAME, hw),
                     x509.UniformResourceIdentifier(f"urn:dev:os:{s.pen}-SN-7.x")]), False)
                 .add_extension(UnrecognizedExtension(s.device_type_oid_obj, b"\x0c\x05valve"), False)
                 .sign(issuer.key, hashes.SHA256()))
        assert issued.cert.tbs_certificate_bytes == plain.tbs_certificate_bytes
        assert issued.record.der == issued.cert.public_bytes(serialization.Encoding.DER)
        assert issued.record.fingerprint == hashlib.sha256(issued.record.der).hexdigest()
