"""The few DER encodings the device certificate needs that `cryptography` has no type for.

hardwareModuleName (RFC 4108) and the device-type extension value (a UTF8String) are built
here by hand: pyasn1 can encode them but costs tens of microseconds per certificate on the
provisioning hot path, and the structures are two fields deep. Decoding is strict: any
trailing byte or wrong tag is refused.
"""

from __future__ import annotations

import functools

from cryptography import x509

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_SEQUENCE = 0x30


class DERError(ValueError):
    pass


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


@functools.lru_cache(maxsize=64)
def oid_body(oid: x509.ObjectIdentifier) -> bytes:
    """The content octets of an OBJECT IDENTIFIER (cached: a handful of OIDs, encoded on every certificate)."""
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out.extend(reversed(chunk))
    return bytes(out)


def encode_integer(n: int) -> bytes:
    """A non-negative INTEGER (minimal two's-complement content octets)."""
    if n < 0:
        raise DERError("negative INTEGER")
    return tlv(TAG_INTEGER, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def encode_oid(oid: x509.ObjectIdentifier) -> bytes:
    return tlv(TAG_OID, oid_body(oid))


def sequence(*items: bytes) -> bytes:
    return tlv(TAG_SEQUENCE, b"".join(items))


def encode_utf8_string(text: str) -> bytes:
    return tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def encode_hardware_module_name(hw_type: x509.ObjectIdentifier, hw_serial: bytes) -> bytes:
    """HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }"""
    return tlv(TAG_SEQUENCE, tlv(TAG_OID, oid_body(hw_type)) + tlv(TAG_OCTET_STRING, hw_serial))


def _read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    if pos + 2 > len(data):
        raise DERError("truncated")
    tag = data[pos]
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise DERError("bad length")
        length = int.from_bytes(data[pos:pos + n], "big")
        if length < 0x80 or data[pos] == 0:
            raise DERError("non-minimal length")
        pos += n
    end = pos + length
    if end > len(data):
        raise DERError("truncated")
    return tag, data[pos:end], end


def _expect_one(data: bytes, tag: int) -> bytes:
    got, value, end = _read_tlv(data, 0)
    if got != tag or end != len(data):
        raise DERError(f"expected a single element with tag 0x{tag:02x}")
    return value


def decode_utf8_string(data: bytes) -> str:
    try:
        return _expect_one(data, TAG_UTF8_STRING).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DERError("invalid UTF-8") from exc


def _decode_oid(body: bytes) -> x509.ObjectIdentifier:
    if not body or body[-1] & 0x80:
        raise DERError("bad OID")
    arcs: list[int] = []
    value = 0
    for byte in body:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = arcs[0]
    head = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    return x509.ObjectIdentifier(".".join(str(a) for a in head + arcs[1:]))


def decode_hardware_module_name(data: bytes) -> tuple[x509.ObjectIdentifier, bytes]:
    seq = _expect_one(data, TAG_SEQUENCE)
    tag, oid, pos = _read_tlv(seq, 0)
    if tag != TAG_OID:
        raise DERError("hwType is not an OID")
    tag, serial, end = _read_tlv(seq, pos)
    if tag != TAG_OCTET_STRING or end != len(seq):
        raise DERError("hwSerialNum is not an OCTET STRING")
    return _decode_oid(oid), serial


# -- a strict TLV walk, for the CSR attestation attribute (ca/csr_evidence.py) -------------------

TAG_BIT_STRING = 0x03
TAG_SET = 0x31
TAG_CONTEXT_0 = 0xA0    # [0] IMPLICIT, constructed (the attributes of a CertificationRequestInfo)


def read_tlv(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """One element at `pos`: (tag, content octets, end offset). Refuses indefinite and
    non-minimal lengths and anything running past the end of `data`."""
    return _read_tlv(data, pos)


def elements(data: bytes) -> list[tuple[int, bytes]]:
    """Every element of a constructed value's content octets, in order; refuses trailing bytes."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        tag, value, pos = _read_tlv(data, pos)
        out.append((tag, value))
    return out


def decode_oid(body: bytes) -> x509.ObjectIdentifier:
    """The OBJECT IDENTIFIER of the content octets `body`."""
    return _decode_oid(body)
