"""Evidence: round trip, interoperability with cwt both ways, named malformed vectors, the
documented test vector, and properties of the decoder over mutated tokens."""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cwt import COSE, COSEKey
from hypothesis import given, settings
from hypothesis import strategies as st

from devid.attestation import evidence as ev_mod
from devid.attestation.errors import (DuplicateMapKey, EvidenceError, EvidenceTooLarge, IndefiniteLength, InvalidClaim,
                                InvalidSignature, InvalidStructure, MalformedCBOR, MissingClaim, NestingTooDeep,
                                TrailingBytes, UnsupportedAlgorithm, UnsupportedCBOR, UnsupportedKey)
from devid.attestation.evidence import (Evidence, decode_claims, decode_evidence, encode_claims, parse_sign1,
                                  sign_evidence)
from devid.attestation.log import MemoryLogStore
from devid.attestation.nonces import MemoryNonceStore, NonceRecord
from devid.attestation.policy import Tier, load_policy
from devid.attestation.service import AttestationService
from devid.attestation.verifier import AttestingDevice

from .attest_util import SimDevice
from .attest_util import NOW

DOCS = Path(__file__).resolve().parent.parent / "docs"
NONCE = bytes(range(16))


@pytest.fixture(scope="module")
def dev():
    return SimDevice()


def _pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _cose_sign(key, payload: bytes, protected: dict | None = None, unprotected: dict | None = None) -> bytes:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return COSE.new().encode(payload, COSEKey.from_pem(pem, alg=-7), protected=protected or {1: -7},
                             unprotected=unprotected or {})


def _resign(key, protected: bytes, payload: bytes, unprotected: dict | None = None, tag: int = 18) -> bytes:
    """A COSE_Sign1 with exactly these protected and payload bytes, validly signed (ES256)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
    to_sign = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = decode_dss_signature(key.sign(to_sign, ec.ECDSA(hashes.SHA256())))
    sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(tag, [protected, unprotected or {}, payload, sig]))


# -- round trip and interoperability ----------------------------------------------------------------

def test_round_trip(dev):
    evidence = dev.evidence(NONCE)
    assert decode_evidence(sign_evidence(evidence, dev.key), dev.key.public_key()) == evidence
    without_scheme = replace(evidence, swversion_scheme=None)
    assert decode_evidence(sign_evidence(without_scheme, dev.key), dev.key.public_key()) == without_scheme


def test_our_tokens_verify_with_cwt(dev):
    token = dev.token(NONCE)
    payload = COSE.new().decode(token, COSEKey.from_pem(_pem_public(dev.key), alg=-7))
    assert cbor2.loads(payload)[10] == NONCE


def test_tokens_signed_by_cwt_verify_with_us(dev):
    from cryptography.hazmat.primitives import serialization
    pem = dev.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    token = COSE.new().encode(encode_claims(dev.evidence(NONCE)), COSEKey.from_pem(pem, alg=-7),
                              protected={1: -7})
    assert decode_evidence(token, dev.key.public_key()).nonce == NONCE
    ours = dev.token(NONCE)       # same layout as cwt's, byte for byte up to the signature
    assert ours[:-64] == token[:-64]


def test_cwt_tokens_verify_with_us(dev):
    token = _cose_sign(dev.key, encode_claims(dev.evidence(NONCE)), unprotected={4: b"kid-1"})
    assert decode_evidence(token, dev.key.public_key()).nonce == NONCE


def test_sign1_structure_and_to_be_signed_match_rfc9052(dev):
    token = dev.token(NONCE)
    s = parse_sign1(token)
    assert s.protected == bytes.fromhex("a10126")
    assert s.to_be_signed() == cbor2.dumps(["Signature1", s.protected, b"", s.payload])
    big = replace(s, payload=b"x" * 70000)       # long heads of the Sig_structure
    assert big.to_be_signed() == cbor2.dumps(["Signature1", s.protected, b"", big.payload])


# -- named malformed vectors ------------------------------------------------------------------------

def _claims_with(dev, **over) -> dict:
    c = dev.evidence(NONCE).claims()
    for k, v in over.items():
        key = getattr(ev_mod, k.upper())
        if v is ...:
            del c[key]
        else:
            c[key] = v
    return c


def vector(name: str, dev) -> tuple[bytes, type]:
    good = dev.token(NONCE)
    s = parse_sign1(good)
    other = ec.generate_private_key(ec.SECP256R1())
    payload = encode_claims(dev.evidence(NONCE))
    if name == "truncated":
        return good[:-10], MalformedCBOR
    if name == "truncated-in-header":
        return good[:3], MalformedCBOR
    if name == "trailing-bytes":
        return good + b"\x00", TrailingBytes
    if name == "trailing-bytes-in-payload":
        return _resign(dev.key, s.protected, payload + b"\x00"), TrailingBytes
    if name == "trailing-bytes-in-protected":
        return _resign(dev.key, s.protected + b"\xa0", payload), TrailingBytes
    if name == "duplicate-claim":
        # eat_nonce twice: cbor2 would keep the second one silently
        dup = payload[:1] + payload[1:] + cbor2.dumps(10) + cbor2.dumps(b"\x01" * 16)
        dup = bytes([payload[0] + 1]) + dup[1:]
        return _resign(dev.key, s.protected, dup), DuplicateMapKey
    if name == "duplicate-header":
        return _resign(dev.key, bytes.fromhex("a201260126"), payload), DuplicateMapKey
    if name == "wrong-algorithm-es384":
        return _resign(dev.key, cbor2.dumps({1: -35}), payload), UnsupportedAlgorithm
    if name == "wrong-algorithm-eddsa":
        return _resign(dev.key, cbor2.dumps({1: -8}), payload), UnsupportedAlgorithm
    if name == "no-algorithm":
        return _resign(dev.key, b"", payload), UnsupportedAlgorithm
    if name == "algorithm-unprotected":
        return _resign(dev.key, cbor2.dumps({1: -7}), payload, unprotected={1: -7}), UnsupportedAlgorithm
    if name == "crit-header":
        return _resign(dev.key, cbor2.dumps({1: -7, 2: [99]}), payload), InvalidStructure
    if name == "wrong-key":
        return dev.token(NONCE, key=other), InvalidSignature
    if name == "flipped-payload-bit":
        t = bytearray(good)
        t[good.index(NONCE) + 3] ^= 1
        return bytes(t), InvalidSignature
    if name == "short-signature":
        return cbor2.dumps(cbor2.CBORTag(18, [s.protected, {}, s.payload, s.signature[:63]])), InvalidSignature
    if name == "oversized":
        padded = cbor2.dumps({**cbor2.loads(payload), -80000: b"\x00" * 2100})
        return _resign(dev.key, s.protected, padded), EvidenceTooLarge
    if name == "too-deep":
        deep = cbor2.dumps({**cbor2.loads(payload), -80000: [[[[[[[[[1]]]]]]]]]})
        return _resign(dev.key, s.protected, deep), NestingTooDeep
    if name == "indefinite-payload-map":
        indef = b"\xbf" + payload[1:] + b"\xff"
        return _resign(dev.key, s.protected, indef), IndefiniteLength
    if name == "untagged":
        return good[1:], InvalidStructure
    if name == "cwt-tag-61":
        return b"\xd8\x3d" + good, UnsupportedCBOR
    if name == "wrong-tag":
        return _resign(dev.key, s.protected, payload, tag=17), UnsupportedCBOR
    if name == "three-elements":
        return cbor2.dumps(cbor2.CBORTag(18, [s.protected, {}, s.payload])), InvalidStructure
    if name == "detached-payload":
        return cbor2.dumps(cbor2.CBORTag(18, [s.protected, {}, None, s.signature])), InvalidStructure
    if name == "payload-not-a-map":
        return _resign(dev.key, s.protected, cbor2.dumps([1, 2])), InvalidStructure
    if name == "not-cbor":
        return b"hello, gateway", MalformedCBOR
    if name == "empty":
        return b"", MalformedCBOR
    if name.startswith("missing-"):
        claim = name[len("missing-"):]
        return _resign(dev.key, s.protected, cbor2.dumps(_claims_with(dev, **{claim: ...}))), MissingClaim
    raise AssertionError(name)


VECTOR_NAMES = ["truncated", "truncated-in-header", "trailing-bytes", "trailing-bytes-in-payload",
                "trailing-bytes-in-protected", "duplicate-claim", "duplicate-header", "wrong-algorithm-es384",
                "wrong-algorithm-eddsa", "no-algorithm", "algorithm-unprotected", "crit-header", "wrong-key",
                "flipped-payload-bit", "short-signature", "oversized", "too-deep", "indefinite-payload-map",
                "untagged", "cwt-tag-61", "wrong-tag", "three-elements", "detached-payload", "payload-not-a-map",
                "not-cbor", "empty"] + [f"missing-{c}" for c in ("eat_nonce", "ueid", "oemid", "hwmodel", "swname",
                                                                 "swversion", "fwdigest", "oemboot", "dbgstat",
                                                                 "bootcount", "iat")]


@pytest.mark.parametrize("name", VECTOR_NAMES)
def test_malformed_evidence_vectors(name, dev):
    token, error = vector(name, dev)
    with pytest.raises(error):
        decode_evidence(token, dev.key.public_key())


def test_cbor2_would_have_accepted_the_duplicate_and_trailing_vectors(dev):
    token, _ = vector("trailing-bytes", dev)
    assert cbor2.loads(token).tag == 18
    dup, _ = vector("duplicate-claim", dev)
    assert cbor2.loads(cbor2.loads(dup).value[2])[10] == b"\x01" * 16    # the attacker's value wins


BAD_CLAIMS = {
    "eat_nonce": [b"short", b"x" * 65, "text-nonce", [b"x" * 16]],
    "ueid": [b"", b"\x01" + b"x" * 15, b"\x04" + b"x" * 16, b"\x02" + b"x" * 7, "01abc", 5],
    "oemid": [-1, b"\x00\x01", "acme", True],
    "hwmodel": [b"", b"x" * 33, "temperature-sensor"],
    "swname": ["", "x" * 65, b"ts-firmware"],
    "swversion": ["2.3.1", [], ["2.3.1", 1, 2], [2], ["2.3.1", "semver"], [""]],
    "fwdigest": [b"\x00" * 32, [1], [1, b"\x00" * 31], [99, b"\x00" * 32], [7, b"\x00" * 32], ["sha-256", b"\x00" * 32],
                 [1, "00" * 32]],
    "oemboot": [1, 0, None, "true"],
    "dbgstat": [5, -1, True, "disabled"],
    "bootcount": [-1, 1.0, "12"],
    "iat": [1795867200.5, -5, "2026-11-28", True],
}


@pytest.mark.parametrize("claim,value", [(c, v) for c, vs in BAD_CLAIMS.items() for v in vs],
                         ids=lambda x: str(x)[:20])
def test_wrongly_typed_claims_are_refused(claim, value, dev):
    payload = cbor2.dumps(_claims_with(dev, **{claim: value}))
    with pytest.raises(InvalidClaim, match=claim):
        decode_claims(payload)


def test_unknown_claims_are_ignored(dev):
    c = _claims_with(dev)
    c[265] = "tag:example.com,2026:profile"
    c["vendor"] = {"x": [1, 2]}
    assert decode_claims(cbor2.dumps(c)) == dev.evidence(NONCE)


def test_other_hash_algorithms_and_ueid_types(dev):
    for alg, n in (("sha-384", 48), ("sha-512", 64)):
        e = dev.evidence(NONCE, fw_alg=alg, fw_digest=b"\x07" * n)
        assert decode_evidence(sign_evidence(e, dev.key), dev.key.public_key()).firmware == f"{alg}:{'07' * n}"
    for ueid in (b"\x02" + b"\x00" * 6, b"\x02" + b"\x00" * 8, b"\x03" + b"3" * 14, b"\x01" + b"r" * 32):
        assert decode_claims(cbor2.dumps(_claims_with(dev, ueid=ueid))).ueid == ueid
    e = decode_claims(cbor2.dumps(_claims_with(dev, oemid=b"\x00\x1b\x63")))
    assert e.oemid == b"\x00\x1b\x63" and e.as_json()["oemid"] == "001b63"


def test_keys_other_than_p256_are_refused(dev):
    token = dev.token(NONCE)
    with pytest.raises(UnsupportedKey):
        decode_evidence(token, ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(UnsupportedKey):
        sign_evidence(dev.evidence(NONCE), ec.generate_private_key(ec.SECP384R1()))


# -- the documented test vector ---------------------------------------------------------------------

def documented_vector() -> tuple[bytes, ec.EllipticCurvePublicKey, int]:
    text = (DOCS / "evidence.md").read_text()
    block = re.search(r"<!-- test-vector-begin -->\s*```\s*(.*?)```\s*<!-- test-vector-end -->", text, re.S)
    assert block, "docs/evidence.md has no marked test vector"
    token = bytes.fromhex("".join(block.group(1).split()))
    pem = re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", text, re.S).group(0)
    d = int(re.search(r"^d = ([0-9a-f]{64})$", text, re.M).group(1), 16)
    return token, serialization.load_pem_public_key(pem.encode()), d


def test_documented_vector_verifies_and_matches_the_documented_claims():
    token, public_key, d = documented_vector()
    assert ec.derive_private_key(d, ec.SECP256R1()).public_key() == public_key
    assert d == int.from_bytes(hashlib.sha256(b"devid evidence test vector 1").digest(), "big")
    assert len(token) == 228
    e = decode_evidence(token, public_key)
    assert e == Evidence(nonce=bytes.fromhex("7b1f3c5a9e2d4f6081a3c5e7092b4d6f"),
                         ueid=bytes.fromhex("011965958fb311abd6934b9919ad234924"), oemid=32473,
                         hwmodel=b"temperature-sensor", swname="ts-firmware", swversion="2.3.1", fw_alg="sha-256",
                         fw_digest=hashlib.sha256(b"ts-firmware 2.3.1 image").digest(), secure_boot=True,
                         dbgstat=3, bootcount=12, iat=int(NOW.timestamp()), swversion_scheme=1)
    assert e.ueid[1:] == hashlib.sha256(b"TS00000001").digest()[:16]
    # and cwt agrees
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert COSE.new().decode(token, COSEKey.from_pem(pem, alg=-7)) == parse_sign1(token).payload


def test_documented_vector_is_affirming_under_the_example_policy():
    token, public_key, _ = documented_vector()
    policy = load_policy(DOCS / "attestation-policy.example.toml")
    nonces = MemoryNonceStore()
    nonce = bytes.fromhex("7b1f3c5a9e2d4f6081a3c5e7092b4d6f")
    fingerprint = "ab" * 32
    nonces.put_nonce(NonceRecord(nonce, "TS00000001", fingerprint, NOW, NOW + policy.nonce_lifetime),
                     purge_before=NOW)
    svc = AttestationService(policy, nonces, MemoryLogStore(), clock=lambda: NOW)
    result = svc.evaluate(token, AttestingDevice("TS00000001", "temperature-sensor", fingerprint, public_key))
    assert result.appraisal.verdict.tier is Tier.AFFIRMING, result.appraisal.verdict.reasons
    assert result.entry.acceptable


# -- properties --------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_tokens_are_refused_with_a_named_error_or_verify_unchanged(dev, data):
    token = bytearray(dev.token(NONCE))
    kind = data.draw(st.sampled_from(["flip", "cut", "insert", "replace"]))
    i = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    if kind == "flip":
        token[i] ^= 1 << data.draw(st.integers(min_value=0, max_value=7))
    elif kind == "cut":
        del token[i:i + data.draw(st.integers(min_value=1, max_value=8))]
    elif kind == "insert":
        token[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    else:
        token[i] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        got = decode_evidence(bytes(token), dev.key.public_key())
    except EvidenceError:
        return
    # only a change the signature does not cover can survive: the unprotected header, nothing else
    assert got == dev.evidence(NONCE)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_evidence_errors(dev, data):
    with pytest.raises(EvidenceError):
        decode_evidence(data, dev.key.public_key())
