"""Certificate profiles: everything in an issued certificate comes from here, never from a CSR.

A profile names its issuing CA, its validity and its extensions. `extensions_for_device` builds
the full extension list of a device certificate from the profile, the registry's device record
and the organisation's identity settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import der
from .errors import UnknownProfile
from .identity import OID_HARDWARE_MODULE_NAME, IdentitySettings


@dataclass(frozen=True)
class Profile:
    name: str
    issuer: str                       # name of the issuing CA
    validity: timedelta
    key_agreement: bool = True        # KeyUsage keyAgreement next to digitalSignature
    allowed_curves: tuple[str, ...] = ("secp256r1",)
    backdate: timedelta = timedelta(seconds=60)  # tolerate small clock skew on the verifier


def default_profiles(factory_days: int = 7300, operational_days: int = 90) -> dict[str, Profile]:
    return {
        "factory": Profile("factory", "manufacturing", timedelta(days=factory_days)),
        "operational": Profile("operational", "operational", timedelta(days=operational_days)),
    }


def get_profile(profiles: dict[str, Profile], name: str) -> Profile:
    try:
        return profiles[name]
    except KeyError:
        raise UnknownProfile(f"unknown profile {name!r} (known: {', '.join(sorted(profiles))})") from None


def device_subject(serial: str, settings: IdentitySettings) -> x509.Name:
    """O=<organization>, CN=device-<serial>, serialNumber=<serial>: one attribute per RDN."""
    return x509.Name([
        settings.organization_rdn,
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}")]),
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]),
    ])


_CLIENT_AUTH = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
_NOT_CA = x509.BasicConstraints(ca=False, path_length=None)


def _key_usage(key_agreement: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=key_agreement, key_cert_sign=False,
                         crl_sign=False, encipher_only=False, decipher_only=False)


_KEY_USAGE = {True: _key_usage(True), False: _key_usage(False)}   # immutable values, built once


def extensions_for_device(profile: Profile, serial: str, device_type: str, settings: IdentitySettings,
                          ski: x509.SubjectKeyIdentifier, aki: x509.AuthorityKeyIdentifier
                          ) -> list[tuple[x509.ExtensionType, bool]]:
    """(extension, critical) pairs, in the order they appear in the certificate."""
    hw_name = der.encode_hardware_module_name(settings.hardware_type_oid_obj, serial.encode())
    san = x509.SubjectAlternativeName([
        x509.OtherName(OID_HARDWARE_MODULE_NAME, hw_name),
        x509.UniformResourceIdentifier(settings.device_urn(serial)),
    ])
    device_type_ext = x509.UnrecognizedExtension(settings.device_type_oid_obj, der.encode_utf8_string(device_type))
    return [
        (_NOT_CA, True),
        (_KEY_USAGE[profile.key_agreement], True),
        (_CLIENT_AUTH, False),
        (ski, False),
        (aki, False),
        (san, False),
        (device_type_ext, False),
    ]
