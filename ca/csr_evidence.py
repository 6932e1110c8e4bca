"""Attestation evidence inside a PKCS#10 CSR, after draft-ietf-lamps-csr-attestation-29
(September 2026), Sections 4.1 and 4.3. Pure: no I/O, and opaque evidence bytes only (this
module knows nothing of CBOR or EAT; `devid.attestation` decodes and verifies what it returns).

The draft's structures, as encoded here (DER)::

    -- the CSR attribute (draft §4.3): an Attribute of PKCS#10 (RFC 2986)
    Attribute ::= SEQUENCE {
        type    OBJECT IDENTIFIER,          -- id-aa-attestation, 1.2.840.113549.1.9.16.2.59
        values  SET SIZE (1) OF AttestationBundle }   -- COUNTS MAX 1: exactly one bundle

    AttestationBundle ::= SEQUENCE {                            -- draft §4.1, Figure 2
        attestations SEQUENCE SIZE (1..MAX) OF AttestationStatement,
        certs SEQUENCE SIZE (1..MAX) OF LimitedCertChoices OPTIONAL }

    AttestationStatement ::= SEQUENCE {                         -- draft §4.1, Figure 1
        type  OBJECT IDENTIFIER,    -- the statement's format
        stmt  ANY DEFINED BY type } -- here an OCTET STRING holding the token (draft §4.1:
                                    -- "a CBOR-encoded format may be defined as an OCTET STRING")

id-aa-attestation is { id-aa 59 } (id-aa = 1.2.840.113549.1.9.16.2); .59 was early-allocated by
IANA as "id-aa-evidence", and draft -29 §5.2 renames it; earlier drafts (up to -2x) called the
structures EvidenceBundle / EvidenceStatement, with the same attribute OID.

The draft assigns no OID to EAT (§4.2: a format's author assigns one from an arc under their
control). devid's evidence is an EAT (RFC 9711) as a CWT in a COSE_Sign1, media type
application/eat+cwt (RFC 9782), and it travels wrapped in a RATS Conceptual Message Wrapper (CMW,
draft-ietf-rats-msg-wrap), whose X.509 OID `id-pe-cmw` (1.3.6.1.5.5.7.1.35) names the statement
type. Why CMW rather than an OID of devid's own: the CMW says what it wraps by media type, so a
verifier that is not devid reads the statement's format from the standard, not from a private
arc (devid has no registered enterprise number: its default OIDs sit in the example arc 12345).

The stmt is an OCTET STRING holding the CMW in its CBOR record form, exactly::

    [ "application/eat+cwt", h'<the COSE_Sign1 token>' ]      -- 82 73 <19 bytes of text> 59 LL LL <token>

(a CBOR array of two: the media type as a text string, then the token as a byte string with the
shortest length head; no indicator). devid writes and accepts only this form.

devid's profile of the attribute is strict (`extract_evidence`): at most one id-aa-attestation
attribute, one value in its SET, exactly one statement, of devid's type, with a non-empty
OCTET STRING no longer than the caller's cap, no `certs` (the token is verified with the
device's identity key, never with certificates the request brings), no trailing byte anywhere.
Anything else is an `InvalidCSR` naming what is wrong.

Why the attribute is not added with `CertificateSigningRequestBuilder.add_attribute`:
cryptography 50 writes an attribute value only as a string type (UTF8String by default; its
private `_tag` selects among string and time types), never a SEQUENCE. `embed_evidence` therefore
takes a CSR the builder made (with its subject, key and extensions), splices the Attribute into
the [0] attributes of its CertificationRequestInfo, and signs the new CertificationRequestInfo
again with the same key and algorithm.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from . import der
from .errors import InvalidCSR

OID_ATTESTATION = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.59")    # id-aa-attestation (id-aa-evidence)
OID_CMW = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.35")                   # id-pe-cmw: a RATS CMW
CMW_MEDIA_TYPE = "application/eat+cwt"
_CMW_PREFIX = b"\x82" + bytes([0x60 + len(CMW_MEDIA_TYPE)]) + CMW_MEDIA_TYPE.encode()   # array(2), tstr(19)

_WHAT = "attestation attribute"


def cmw_record(token: bytes) -> bytes:
    """The CBOR CMW record [ "application/eat+cwt", bstr token ] (shortest length head)."""
    n = len(token)
    if n < 24:
        head = bytes([0x40 | n])
    elif n < 0x100:
        head = bytes([0x58, n])
    elif n < 0x10000:
        head = b"\x59" + n.to_bytes(2, "big")
    else:
        raise ValueError("evidence over 65535 bytes")
    return _CMW_PREFIX + head + token


def cmw_token(record: bytes) -> bytes:
    """The token of a CMW record written as `cmw_record` writes it; InvalidCSR for anything else."""
    if not record.startswith(_CMW_PREFIX):
        raise InvalidCSR(f"{_WHAT}: stmt is not the CMW record [\"{CMW_MEDIA_TYPE}\", bstr]")
    head = record[len(_CMW_PREFIX):len(_CMW_PREFIX) + 1]
    at = len(_CMW_PREFIX) + 1
    if head and 0x40 <= head[0] < 0x58:
        n = head[0] - 0x40
    elif head == b"\x58" and len(record) > at and record[at] >= 24:
        n, at = record[at], at + 1
    elif head == b"\x59" and len(record) >= at + 2 and int.from_bytes(record[at:at + 2], "big") >= 0x100:
        n, at = int.from_bytes(record[at:at + 2], "big"), at + 2
    else:
        raise InvalidCSR(f"{_WHAT}: the CMW's token is not a byte string with the shortest length head")
    if len(record) - at != n:
        raise InvalidCSR(f"{_WHAT}: the CMW's token length does not match its content")
    return record[at:]


def _one(data: bytes, tag: int) -> bytes:
    """The content of `data`, which must be exactly one element with `tag`."""
    got, value, end = der.read_tlv(data)
    if got != tag or end != len(data):
        raise der.DERError(f"expected a single element with tag 0x{tag:02x}")
    return value


def encode_bundle(evidence: bytes, type_oid: x509.ObjectIdentifier = OID_CMW) -> bytes:
    """The DER AttestationBundle holding one statement of `type_oid` whose stmt is
    OCTET STRING `evidence` (wrapped in the CMW record when `type_oid` is id-pe-cmw), and no certs."""
    if not evidence:
        raise ValueError("empty evidence")
    if type_oid == OID_CMW:
        evidence = cmw_record(evidence)
    statement = der.sequence(der.encode_oid(type_oid), der.tlv(der.TAG_OCTET_STRING, evidence))
    return der.sequence(der.sequence(statement))


def encode_attribute(evidence: bytes, type_oid: x509.ObjectIdentifier = OID_CMW) -> bytes:
    """The DER Attribute { id-aa-attestation, SET { AttestationBundle } } of PKCS#10."""
    return der.sequence(der.encode_oid(OID_ATTESTATION), der.tlv(der.TAG_SET, encode_bundle(evidence, type_oid)))


def _resign(tbs: bytes, csr: x509.CertificateSigningRequest, key) -> bytes:
    algo = csr.signature_hash_algorithm
    if isinstance(key, ec.EllipticCurvePrivateKey) and algo is not None:
        return key.sign(tbs, ec.ECDSA(algo))
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.sign(tbs)
    if isinstance(key, rsa.RSAPrivateKey) and algo is not None and csr.signature_algorithm_parameters is not None \
            and isinstance(csr.signature_algorithm_parameters, padding.PKCS1v15):
        return key.sign(tbs, padding.PKCS1v15(), algo)
    raise TypeError("embed_evidence signs with ECDSA, EdDSA or RSA PKCS#1 v1.5 only")


def embed_evidence(csr: x509.CertificateSigningRequest, private_key, evidence: bytes,
                   type_oid: x509.ObjectIdentifier = OID_CMW) -> bytes:
    """The DER of `csr` with the attestation attribute carrying `evidence` added, signed again
    with `private_key` (the CSR's own key) and the CSR's signature algorithm. The device side.

    The CSR must not already carry an attestation attribute. Attributes are kept, and put in
    DER order (a SET OF is sorted by encoding)."""
    top = der.elements(_one(csr.public_bytes(Encoding.DER), der.TAG_SEQUENCE))
    info = der.elements(_one(csr.tbs_certrequest_bytes, der.TAG_SEQUENCE))
    if len(top) != 3 or len(info) != 4 or info[3][0] != der.TAG_CONTEXT_0:
        raise ValueError("not a PKCS#10 CertificationRequest")
    attributes = [der.tlv(tag, value) for tag, value in der.elements(info[3][1])]
    if any(_attribute_oid(a) == OID_ATTESTATION for a in attributes):
        raise ValueError("the CSR already carries an attestation attribute")
    attributes.append(encode_attribute(evidence, type_oid))
    attributes.sort()
    tbs = der.sequence(*(der.tlv(tag, value) for tag, value in info[:3]),
                       der.tlv(der.TAG_CONTEXT_0, b"".join(attributes)))
    signature = _resign(tbs, csr, private_key)
    sig_alg = der.tlv(*top[1])
    return der.sequence(tbs, sig_alg, der.tlv(der.TAG_BIT_STRING, b"\x00" + signature))


def _attribute_oid(attribute: bytes) -> x509.ObjectIdentifier:
    tag, oid, _ = der.read_tlv(_one(attribute, der.TAG_SEQUENCE))
    if tag != der.TAG_OID:
        raise der.DERError("attribute type is not an OID")
    return der.decode_oid(oid)


def _attestation_attributes(csr: x509.CertificateSigningRequest) -> list[bytes]:
    """The content of the values SET of every id-aa-attestation attribute, read from the
    CertificationRequestInfo's DER (the signed bytes) by the strict reader."""
    info = der.elements(_one(csr.tbs_certrequest_bytes, der.TAG_SEQUENCE))
    if len(info) != 4 or info[3][0] != der.TAG_CONTEXT_0:
        raise der.DERError("CertificationRequestInfo is not version, subject, key, [0] attributes")
    ours = der.oid_body(OID_ATTESTATION)
    found = []
    for tag, value in der.elements(info[3][1]):
        if tag != der.TAG_SEQUENCE:
            raise der.DERError("an attribute is not a SEQUENCE")
        fields = der.elements(value)
        if len(fields) != 2 or fields[0][0] != der.TAG_OID or fields[1][0] != der.TAG_SET:
            raise der.DERError("an attribute is not { OID, SET }")
        if fields[0][1] == ours:
            found.append(fields[1][1])
    return found


def extract_evidence(csr: x509.CertificateSigningRequest, *, max_size: int,
                     type_oid: x509.ObjectIdentifier = OID_CMW) -> bytes | None:
    """The evidence bytes in `csr`'s attestation attribute, or None when it has none. The
    gateway side: `csr` comes from `authority.load_csr`, which has checked its signature (that
    signature covers the attribute). Refuses, with `InvalidCSR`, everything devid's profile
    does not allow (see the module docstring); `max_size` caps the evidence's length."""
    try:
        found = _attestation_attributes(csr)
    except der.DERError as exc:
        raise InvalidCSR(f"malformed CSR attributes: {exc}") from None
    if not found:
        return None
    if len(found) > 1:
        raise InvalidCSR(f"{_WHAT}: more than one (the draft allows one)")
    try:
        values = der.elements(found[0])
        if len(values) != 1:
            raise InvalidCSR(f"{_WHAT}: {len(values)} values (exactly one AttestationBundle allowed)")
        tag, bundle = values[0]
        if tag != der.TAG_SEQUENCE:
            raise InvalidCSR(f"{_WHAT}: the value is not an AttestationBundle SEQUENCE")
        fields = der.elements(bundle)
        if not fields or fields[0][0] != der.TAG_SEQUENCE:
            raise InvalidCSR(f"{_WHAT}: AttestationBundle has no attestations SEQUENCE")
        if len(fields) > 1:
            raise InvalidCSR(f"{_WHAT}: AttestationBundle carries certs or more; devid accepts none")
        statements = der.elements(fields[0][1])
        if len(statements) != 1:
            raise InvalidCSR(f"{_WHAT}: {len(statements)} statements (devid accepts exactly one)")
        tag, statement = statements[0]
        parts = der.elements(statement) if tag == der.TAG_SEQUENCE else []
        if len(parts) != 2 or parts[0][0] != der.TAG_OID:
            raise InvalidCSR(f"{_WHAT}: AttestationStatement is not SEQUENCE {{ type OID, stmt }}")
        if parts[0][1] != der.oid_body(type_oid):
            raise InvalidCSR(f"{_WHAT}: statement type {der.decode_oid(parts[0][1]).dotted_string} "
                             f"is not {type_oid.dotted_string}")
        tag, evidence = parts[1]
        if tag != der.TAG_OCTET_STRING:
            raise InvalidCSR(f"{_WHAT}: stmt is not an OCTET STRING")
    except der.DERError as exc:
        raise InvalidCSR(f"{_WHAT}: malformed DER: {exc}") from None
    if len(evidence) > max_size + 64:       # the cap, plus what the CMW record adds
        raise InvalidCSR(f"{_WHAT}: evidence of {len(evidence)} bytes exceeds the cap of {max_size}")
    if type_oid == OID_CMW:
        evidence = cmw_token(evidence)
    if not evidence:
        raise InvalidCSR(f"{_WHAT}: empty evidence")
    if len(evidence) > max_size:
        raise InvalidCSR(f"{_WHAT}: evidence of {len(evidence)} bytes exceeds the cap of {max_size}")
    return evidence
