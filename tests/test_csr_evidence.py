"""ca/csr_evidence: the attestation attribute of draft-ietf-lamps-csr-attestation in a PKCS#10
CSR. The device side embeds, the gateway side extracts strictly; openssl reads and verifies the
result; the documented vector in docs/evidence.md matches the code."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from devid.attestation.evidence import MAX_EVIDENCE_SIZE
from devid.ca import der
from devid.ca.authority import load_csr
from devid.ca.csr_evidence import (OID_ATTESTATION, OID_CMW, cmw_record, embed_evidence, encode_attribute,
                                   encode_bundle, extract_evidence)
from devid.ca.errors import InvalidCSR

from .conftest import tool

DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_vector() -> tuple[bytes, None, int]:
    """The evidence test vector of docs/evidence.md: the token and the test key's scalar."""
    text = (DOCS / "evidence.md").read_text()
    block = re.search(r"<!-- test-vector-begin -->\s*```\s*(.*?)```\s*<!-- test-vector-end -->", text, re.S)
    assert block, "docs/evidence.md has no marked test vector"
    d = int(re.search(r"^d = ([0-9a-f]{64})$", text, re.M).group(1), 16)
    return bytes.fromhex("".join(block.group(1).split())), None, d


def documented_csr_vector() -> bytes:
    text = (DOCS / "evidence.md").read_text()
    block = re.search(r"<!-- csr-vector-begin -->\s*```\s*(.*?)```\s*<!-- csr-vector-end -->", text, re.S)
    assert block, "docs/evidence.md has no marked CSR vector"
    return bytes.fromhex("".join(block.group(1).split()))


def device_key():
    _, _, d = documented_vector()
    return ec.derive_private_key(d, ec.SECP256R1())


def plain_csr(key, *, extension: bool = True) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "TS-0001")]))
    if extension:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("ts-0001.example")]),
                                        critical=False)
    return builder.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())


def csr_with_attribute(attribute: bytes, key=None) -> x509.CertificateSigningRequest:
    """A signed CSR whose attributes are exactly the given DER Attribute(s), built by hand so
    that malformed attributes can be tested: the signature is valid, the content is not."""
    key = key or device_key()
    base = plain_csr(key, extension=False)
    info = der.elements(der.read_tlv(base.tbs_certrequest_bytes)[1])
    tbs = der.sequence(*(der.tlv(t, v) for t, v in info[:3]), der.tlv(der.TAG_CONTEXT_0, attribute))
    top = der.elements(der.read_tlv(base.public_bytes(_der()))[1])
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return load_csr(der.sequence(tbs, der.tlv(*top[1]), der.tlv(der.TAG_BIT_STRING, b"\x00" + sig)))


def _der():
    return Encoding.DER


def attribute(values: bytes, oid: x509.ObjectIdentifier = OID_ATTESTATION) -> bytes:
    return der.sequence(der.encode_oid(oid), der.tlv(der.TAG_SET, values))


def statement(evidence: bytes, type_oid=OID_CMW, *, raw: bool = False) -> bytes:
    """An AttestationStatement; its stmt the CMW record of `evidence` (`raw`: `evidence` as is)."""
    stmt = evidence if raw else cmw_record(evidence)
    return der.sequence(der.encode_oid(type_oid), der.tlv(der.TAG_OCTET_STRING, stmt))


# -- the documented vector ------------------------------------------------------------------------

def test_documented_csr_vector_is_the_attribute_of_the_documented_token():
    token, _, _ = documented_vector()
    vector = documented_csr_vector()
    assert encode_attribute(token) == vector
    assert len(vector) == 297 and vector.endswith(token)
    assert vector[:17].hex() == "30820125060b2a864886f70d010910023b"
    # the stmt holds the CMW record ["application/eat+cwt", token], as cbor2 reads it
    assert cbor2.loads(vector[-len(token) - 23:]) == ["application/eat+cwt", token]


def test_a_csr_from_the_test_key_carries_the_vector_and_gives_the_token_back():
    token, _, _ = documented_vector()
    key = device_key()
    csr = load_csr(embed_evidence(plain_csr(key), key, token))
    assert documented_csr_vector() in csr.tbs_certrequest_bytes
    assert extract_evidence(csr, max_size=MAX_EVIDENCE_SIZE) == token
    # the other attribute (extensionRequest) survives the splice
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["ts-0001.example"]


# -- device side ----------------------------------------------------------------------------------

def test_embed_keeps_the_csr_verifiable_with_ed25519_too():
    key = ed25519.Ed25519PrivateKey.generate()
    csr = load_csr(embed_evidence(plain_csr(key), key, b"\xd2token"))
    assert extract_evidence(csr, max_size=64) == b"\xd2token"


def test_embed_refuses_a_second_attestation_attribute_and_empty_evidence():
    key = device_key()
    csr = load_csr(embed_evidence(plain_csr(key), key, b"one"))
    with pytest.raises(ValueError, match="already carries"):
        embed_evidence(csr, key, b"two")
    with pytest.raises(ValueError, match="empty"):
        embed_evidence(plain_csr(key), key, b"")


def test_embedding_with_another_key_breaks_the_csr_signature():
    key = device_key()
    out = embed_evidence(plain_csr(key), ec.generate_private_key(ec.SECP256R1()), b"token")
    with pytest.raises(InvalidCSR, match="does not verify"):
        load_csr(out)


# -- gateway side ---------------------------------------------------------------------------------

def test_a_csr_without_the_attribute_has_no_evidence():
    assert extract_evidence(load_csr(plain_csr(device_key()).public_bytes(_der())), max_size=100) is None


def test_the_size_cap_is_the_callers():
    key = device_key()
    csr = load_csr(embed_evidence(plain_csr(key), key, b"x" * 101))
    assert extract_evidence(csr, max_size=101) == b"x" * 101
    with pytest.raises(InvalidCSR, match="101 bytes exceeds the cap of 100"):
        extract_evidence(csr, max_size=100)


def test_another_statement_type_is_refused_and_accepted_when_asked_for():
    other = x509.ObjectIdentifier("1.3.6.1.4.1.99999.7")
    key = device_key()
    csr = load_csr(embed_evidence(plain_csr(key), key, b"tok", type_oid=other))
    with pytest.raises(InvalidCSR, match="statement type 1.3.6.1.4.1.99999.7 is not 1.3.6.1.5.5.7.1.35"):
        extract_evidence(csr, max_size=100)
    assert extract_evidence(csr, max_size=100, type_oid=other) == b"tok"


BUNDLE = encode_bundle(b"tok")


@pytest.mark.parametrize("attributes,reason", [
    (attribute(BUNDLE) * 2, "more than one"),
    (attribute(BUNDLE + BUNDLE), "2 values"),
    (attribute(b""), "0 values"),
    (attribute(der.tlv(der.TAG_OCTET_STRING, b"tok")), "not an AttestationBundle SEQUENCE"),
    (attribute(der.sequence()), "no attestations SEQUENCE"),
    (attribute(der.sequence(der.sequence(statement(b"tok")), der.sequence(b""))), "certs"),
    (attribute(der.sequence(der.sequence())), "0 statements"),
    (attribute(der.sequence(der.sequence(statement(b"a"), statement(b"b")))), "2 statements"),
    (attribute(der.sequence(der.sequence(der.sequence(der.encode_oid(OID_CMW))))),
     "not SEQUENCE { type OID, stmt }"),
    (attribute(der.sequence(der.sequence(der.sequence(der.encode_oid(OID_CMW),
                                                      der.encode_utf8_string("tok"))))), "not an OCTET STRING"),
    (attribute(der.sequence(der.sequence(statement(b"")))), "empty evidence"),
    # the CMW record: exactly ["application/eat+cwt", bstr] with the shortest length head
    (attribute(der.sequence(der.sequence(statement(b"tok", raw=True)))), "not the CMW record"),
    (attribute(der.sequence(der.sequence(statement(cbor2.dumps(["application/cwt", b"tok"]), raw=True)))),
     "not the CMW record"),
    (attribute(der.sequence(der.sequence(statement(cmw_record(b"tok")[:-1], raw=True)))), "length does not match"),
    (attribute(der.sequence(der.sequence(statement(cmw_record(b"tok") + b"\x00", raw=True)))),
     "length does not match"),
    (attribute(der.sequence(der.sequence(statement(cmw_record(b"")[:-1] + b"\x58\x03tok", raw=True)))),
     "shortest length head"),
    (attribute(der.sequence(der.sequence(statement(cmw_record(b"")[:-1] + b"\x63tok", raw=True)))),
     "not a byte string"),
    (attribute(BUNDLE[:-1]), "malformed"),        # a length running past its end: cryptography refuses the CSR
    (attribute(BUNDLE + b"\x00"), "malformed"),            # a trailing byte
    (attribute(b"\x30\x80" + BUNDLE[2:] + b"\x00\x00"), "malformed"),   # indefinite length (BER)
    (attribute(b"\x30\x81\x05" + BUNDLE[2:7]), "malformed"),            # non-minimal length
    (der.tlv(der.TAG_SEQUENCE, der.encode_oid(OID_ATTESTATION)), "malformed"),       # no SET of values
    # inside the bundle, where cryptography reads no further than the outer TLV: our strict reader
    (attribute(der.sequence(der.sequence(statement(b"tok")) + b"\x00")), "malformed DER"),
    (attribute(der.sequence(der.sequence(b"\x30\x81" + statement(b"tok")[1:]))), "malformed DER"),
    (attribute(der.sequence(der.sequence(b"\x30\x80" + statement(b"tok")[2:] + b"\x00\x00"))), "malformed DER"),
])
def test_malformed_attributes_are_refused_with_a_reason(attributes, reason):
    with pytest.raises(InvalidCSR, match=re.escape(reason)):
        csr = csr_with_attribute(attributes)     # signed correctly: only the attribute is wrong
        extract_evidence(csr, max_size=MAX_EVIDENCE_SIZE)


def test_an_unrelated_attribute_is_left_alone():
    challenge = attribute(der.encode_utf8_string("secret"), x509.ObjectIdentifier("1.2.840.113549.1.9.7"))
    assert extract_evidence(csr_with_attribute(challenge), max_size=100) is None
    both = sorted([challenge, encode_attribute(b"tok")])
    assert extract_evidence(csr_with_attribute(b"".join(both)), max_size=100) == b"tok"


# -- interop: openssl reads the attribute and verifies the signature ------------------------------

def test_openssl_shows_the_attribute_and_verifies_the_signature(tmp_path):
    token, _, _ = documented_vector()
    key = device_key()
    path = tmp_path / "csr.der"
    path.write_bytes(embed_evidence(plain_csr(key), key, token))
    req = subprocess.run([tool("openssl"), "req", "-in", str(path), "-inform", "DER", "-verify", "-noout", "-text"],
                         capture_output=True, text=True, timeout=30)
    assert req.returncode == 0, req.stderr
    assert "verify OK" in req.stdout + req.stderr
    assert "1.2.840.113549.1.9.16.2.59" in req.stdout
    parsed = subprocess.run([tool("openssl"), "asn1parse", "-in", str(path), "-inform", "DER"],
                            capture_output=True, text=True, timeout=30)
    assert parsed.returncode == 0, parsed.stderr
    lines = parsed.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if ":1.2.840.113549.1.9.16.2.59" in line)
    assert "SET" in lines[at + 1]
    assert ":1.3.6.1.5.5.7.1.35" in lines[at + 5] and "OCTET STRING" in lines[at + 6]
    assert f"l= {len(token) + 23}" in lines[at + 6] and token.hex().upper() in lines[at + 6]   # the CMW record
