"""ca/sealed.py: the operational PSK sealed to a device's key (COSE_Encrypt, ECDH-ES + HKDF-256,
AES-CCM-16-64-128), cross-checked with `cwt`, an independent COSE implementation, both ways, and
against the bytes docs/enrollment.md tells a device to expect."""

from __future__ import annotations

import re
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cwt import COSE, COSEKey, Recipient

from devid.ca import sealed

DOCS = Path(__file__).resolve().parent.parent / "docs" / "enrollment.md"
SECRET = b"Qm9k3f-EXAMPLE_k"
CONTEXT = {"alg": "AES-CCM-16-64-128"}


def _cwt_private(key: ec.EllipticCurvePrivateKey):
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return COSEKey.from_pem(pem, alg="ECDH-ES+HKDF-256")


def test_what_seal_makes_opens_with_cwt_and_with_unseal():
    key = ec.generate_private_key(ec.SECP256R1())
    blob = sealed.seal(key.public_key(), SECRET)
    assert SECRET not in blob
    assert COSE.new().decode(blob, _cwt_private(key), context=CONTEXT) == SECRET
    assert sealed.unseal(key, blob) == SECRET
    # the ECDH step alone (a key in a secure element does it): the same plaintext
    assert sealed.unseal(lambda peer: key.exchange(ec.ECDH(), peer), blob) == SECRET


def test_what_cwt_seals_opens_with_unseal():
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    recipient = Recipient.new(protected={"alg": "ECDH-ES+HKDF-256"},
                              recipient_key=COSEKey.from_pem(pem, alg="ECDH-ES+HKDF-256"), context=CONTEXT)
    blob = COSE.new(alg_auto_inclusion=True).encode(SECRET, protected={"alg": "AES-CCM-16-64-128"},
                                                    recipients=[recipient])
    assert sealed.unseal(key, blob) == SECRET


def test_the_structure_is_the_one_the_docs_give():
    blob = sealed.seal(ec.generate_private_key(ec.SECP256R1()).public_key(), SECRET)
    item = cbor2.loads(blob)
    assert item.tag == 96
    protected, unprotected, ciphertext, [[r_protected, r_unprotected, r_ciphertext]] = item.value
    assert len(unprotected[5]) == 13 and len(ciphertext) == len(SECRET) + 8 and r_ciphertext == b""
    assert set(r_unprotected) == {-1} and r_unprotected[-1][1] == 2 and r_unprotected[-1][-1] == 1
    docs = DOCS.read_text()
    section = docs[docs.index("### The answer of `GET /psk`"):]
    # the two protected headers, and the KDF context, as the docs spell them
    assert f"h'{protected.hex().upper()}'" in section and f"h'{r_protected.hex().upper()}'" in section
    flat = re.sub(r"\s", "", section)
    context = cbor2.dumps([10, [None, None, None], [None, None, None], [128, r_protected]])
    assert context.hex() in flat
    assert cbor2.dumps(["Encrypt", protected, b""]).hex() in flat         # the Enc_structure's bytes
    # the signed answer: its protected header, and the Sig_structure's head as the docs spell it
    assert f"h'{sealed.SIGN_PROTECTED.hex().upper()}'" in section
    head = cbor2.dumps(["Signature1", sealed.SIGN_PROTECTED, b"", b""])[:-1]   # all but the payload
    assert head[:2].hex().upper() == "846A" and "`846A`\"Signature1\"`43A10126" + "40`" in flat


def test_each_seal_is_fresh_and_opens_only_with_its_key():
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    first, second = sealed.seal(key.public_key(), SECRET), sealed.seal(key.public_key(), SECRET)
    assert first != second          # a fresh ephemeral key and IV each time
    with pytest.raises(sealed.SealError, match="not sealed to this key"):
        sealed.unseal(other, first)
    item = cbor2.loads(first)
    tampered = bytearray(item.value[2])
    tampered[0] ^= 1
    item.value[2] = bytes(tampered)
    with pytest.raises(sealed.SealError, match="not sealed to this key"):
        sealed.unseal(key, cbor2.dumps(item))


@pytest.mark.parametrize("blob", [b"", b"\xa0", cbor2.dumps(cbor2.CBORTag(16, [])), cbor2.dumps([1, 2, 3, 4]),
                                  cbor2.dumps(cbor2.CBORTag(96, [b"\xa1\x01\x01", {5: b"x" * 13}, b"", []]))])
def test_malformed_input_is_a_seal_error(blob):
    with pytest.raises(sealed.SealError):
        sealed.unseal(ec.generate_private_key(ec.SECP256R1()), blob)


def test_only_p256_keys():
    with pytest.raises(sealed.SealError, match="P-256"):
        sealed.seal(ec.generate_private_key(ec.SECP384R1()).public_key(), SECRET)
