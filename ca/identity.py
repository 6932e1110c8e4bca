"""What a device certificate says about its device, and the naming rules behind it.

A device certificate (factory IDevID or operational LDevID) carries the device serial in three
places: subject serialNumber (and CN `device-<serial>`), the RFC 4108 hardwareModuleName in
SubjectAltName, and an RFC 9039 `urn:dev:os:<PEN>-<serial>` URI. The device type travels in a
private, non-critical extension whose value is a DER UTF8String.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from . import der
from .errors import InvalidSerial

OID_HARDWARE_MODULE_NAME = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")  # RFC 4108 id-on-hardwareModuleName

# serials go into the subject serialNumber, a PrintableString: no "_" there
SERIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,63}")
DEVICE_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,31}|")


def check_serial(serial: str) -> str:
    if not isinstance(serial, str) or not SERIAL_RE.fullmatch(serial):
        raise InvalidSerial(
            f"invalid device serial {serial!r}: use 1-64 characters A-Z a-z 0-9 . -, starting with a letter or digit")
    return serial


def check_device_type(device_type: str) -> str:
    if not isinstance(device_type, str) or not DEVICE_TYPE_RE.fullmatch(device_type):
        raise InvalidSerial(
            f"invalid device type {device_type!r}: use 1-64 characters a-z 0-9 . _ -, starting with a letter or digit")
    return device_type


@dataclass(frozen=True)
class IdentitySettings:
    """Organisation-wide naming: the subject O, the PEN used in URNs, and the private OIDs."""

    organization: str = "devid Example Org"
    pen: int = 12345
    device_type_oid: str = "1.3.6.1.4.1.12345.1.1"
    hardware_type_oid: str = "1.3.6.1.4.1.12345.1.2"

    # Built once per settings object, not per certificate (cached_property writes the instance
    # __dict__ directly, which a frozen dataclass allows; the fields themselves stay immutable).
    @functools.cached_property
    def device_type_oid_obj(self) -> x509.ObjectIdentifier:
        return x509.ObjectIdentifier(self.device_type_oid)

    @functools.cached_property
    def hardware_type_oid_obj(self) -> x509.ObjectIdentifier:
        return x509.ObjectIdentifier(self.hardware_type_oid)

    @functools.cached_property
    def organization_rdn(self) -> x509.RelativeDistinguishedName:
        return x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization)])

    def device_urn(self, serial: str) -> str:
        return f"urn:dev:os:{self.pen}-{serial}"


def format_serial(serial: int) -> str:
    """A certificate serial as `openssl x509 -serial` prints it: upper-case hex, an even number
    of digits (a leading 0 where needed), no colons."""
    text = format(serial, "X")
    return text if len(text) % 2 == 0 else "0" + text


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, lower-case hex."""
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def fingerprint_der(der_bytes: bytes) -> str:
    """`fingerprint` of a certificate already serialised to DER."""
    return hashlib.sha256(der_bytes).hexdigest()


@dataclass(frozen=True)
class DeviceIdentity:
    """The identity a device certificate asserts, after our own consistency checks."""

    serial: str
    device_type: str
    certificate_serial: int
    fingerprint: str

    def as_dict(self) -> dict:
        return {
            "serial": self.serial,
            "device_type": self.device_type,
            "certificate_serial": format(self.certificate_serial, "x"),
            "fingerprint": self.fingerprint,
        }


def read_device_identity(cert: x509.Certificate, settings: IdentitySettings) -> DeviceIdentity:
    """Read serial and device type from a device certificate; every copy of the serial must agree.

    Raises InvalidSerial when the certificate is not a well-formed device certificate.
    """
    serials = {a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)}
    if len(serials) != 1:
        raise InvalidSerial("certificate subject has no single serialNumber")
    (serial,) = serials
    check_serial(serial)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        type_ext = cert.extensions.get_extension_for_oid(settings.device_type_oid_obj).value
    except x509.ExtensionNotFound as exc:
        raise InvalidSerial(f"not a device certificate: {exc}") from None
    hw_serials = set()
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == OID_HARDWARE_MODULE_NAME:
            try:
                hw_type, hw_serial = der.decode_hardware_module_name(other.value)
            except der.DERError as exc:
                raise InvalidSerial(f"malformed hardwareModuleName: {exc}") from None
            if hw_type == settings.hardware_type_oid_obj:
                hw_serials.add(hw_serial)
    if hw_serials != {serial.encode()}:
        raise InvalidSerial("hardwareModuleName does not match the subject serialNumber")
    if settings.device_urn(serial) not in san.get_values_for_type(x509.UniformResourceIdentifier):
        raise InvalidSerial("device URN missing or does not match the subject serialNumber")
    try:
        device_type = der.decode_utf8_string(type_ext.value)
    except (der.DERError, AttributeError) as exc:
        raise InvalidSerial(f"malformed device-type extension: {exc}") from None
    check_device_type(device_type)
    return DeviceIdentity(serial, device_type, cert.serial_number, fingerprint(cert))
