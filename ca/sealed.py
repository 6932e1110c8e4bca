"""A secret sealed to one device's P-256 key: COSE_Encrypt with ECDH-ES + HKDF-256 and
AES-CCM-16-64-128 (RFC 9052 section 5, RFC 9053 sections 4.2, 5 and 6.3), and the answer that
carries it signed by the gateway: COSE_Sign1, ES256, its certificate chain in x5chain (RFC 9052
section 4.2, RFC 9360); docs/enrollment.md#psk-devices.

The operational PSK of a PSK device travels inside a DTLS session on TLS_PSK_WITH_AES_128_CCM_8,
a suite without (EC)DHE: whoever holds the PSK the session was opened with and records the session
can read what it carries. So the gateway seals the operational PSK to the public key of the
certificate the session was just issued (its CSR key, bound to the attested evidence), and only the
holder of that private key opens it. A tinydtls device has what it takes: P-256 ECDH (its secure
element, or the ECC code tinydtls carries), HMAC-SHA256 and AES-CCM (tinydtls's own).

    COSE_Encrypt = 96([
        h'A1010A',                          protected {1 (alg): 10 (AES-CCM-16-64-128)}
        {5 (IV): 13 bytes},
        ciphertext,                         AES-CCM(CEK, IV, plaintext, Enc_structure), 8-byte tag appended
        [[h'A1013818',                      protected {1 (alg): -25 (ECDH-ES + HKDF-256)}
          {-1 (ephemeral key): {1: 2, -1: 1, -2: x, -3: y}},   EC2, P-256, 32-byte coordinates
          h'']]
    ])
    CEK = HKDF-SHA256(salt = none, IKM = x of ECDH(ephemeral, device key), L = 16,
                      info = [10, [null, null, null], [null, null, null], [128, h'A1013818']])
    Enc_structure = ["Encrypt", h'A1010A', h'']

Sealed, the key is hidden from whoever records the session; but ECDH-ES says nothing about who
sealed it (the device's public key is public), and in a PSK session the gateway has proven only
that it knows the PSK. So the answer (the identity, the certificate it goes with, the sealed key,
the digest of the configuration) is signed with the gateway's certified key, which the device
checks as an X.509 device checks the gateway in its handshake: its chain to the device's root,
valid for the host the device reached (`sign`, `verify`).

Built here rather than with `cwt` (a dependency already, for evidence): cwt takes private keys
only as PEM/JWK, and a device's operational key may sit in a secure element that does the ECDH
itself (`unseal` takes that step as a callable); the tests open what `seal` makes with cwt and
what cwt makes with `unseal`.

Each answer has a fresh ephemeral key, so the same secret sealed twice looks unrelated. The
ephemeral scalar and the IV come from `random` (passed in, as everywhere in ca/).
"""

from __future__ import annotations

import os
from typing import Callable

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESCCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import CAError

COSE_ENCRYPT_TAG = 96
ALG_AES_CCM_16_64_128 = 10
ALG_ECDH_ES_HKDF_256 = -25
IV_LEN = 13
TAG_LEN = 8
CEK_LEN = 16

PROTECTED = cbor2.dumps({1: ALG_AES_CCM_16_64_128})                 # h'A1010A'
RECIPIENT_PROTECTED = cbor2.dumps({1: ALG_ECDH_ES_HKDF_256})        # h'A1013818'
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class SealError(CAError):
    """Not a COSE_Encrypt devid makes, or not sealed to this key; or a COSE_Sign1 that is not
    devid's or whose signature or signer does not verify."""


def _cek(shared_x: bytes) -> bytes:
    context = cbor2.dumps([ALG_AES_CCM_16_64_128, [None, None, None], [None, None, None],
                           [CEK_LEN * 8, RECIPIENT_PROTECTED]])
    return HKDF(hashes.SHA256(), CEK_LEN, salt=None, info=context).derive(shared_x)


def _aad() -> bytes:
    return cbor2.dumps(["Encrypt", PROTECTED, b""])


def _coordinates(key: ec.EllipticCurvePublicKey) -> tuple[bytes, bytes]:
    numbers = key.public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def seal(recipient: ec.EllipticCurvePublicKey, plaintext: bytes,
         random: Callable[[int], bytes] = os.urandom) -> bytes:
    """`plaintext` sealed to `recipient` (a P-256 public key): the CBOR of a tagged COSE_Encrypt."""
    if not isinstance(recipient, ec.EllipticCurvePublicKey) or not isinstance(recipient.curve, ec.SECP256R1):
        raise SealError("a secret is sealed only to a P-256 key")
    scalar = int.from_bytes(random(40), "big") % (_P256_ORDER - 1) + 1     # 320 bits: no visible bias
    ephemeral = ec.derive_private_key(scalar, ec.SECP256R1())
    shared = ephemeral.exchange(ec.ECDH(), recipient)
    iv = random(IV_LEN)
    ciphertext = AESCCM(_cek(shared), tag_length=TAG_LEN).encrypt(iv, plaintext, _aad())
    x, y = _coordinates(ephemeral.public_key())
    recipient_entry = [RECIPIENT_PROTECTED, {-1: {1: 2, -1: 1, -2: x, -3: y}}, b""]
    return cbor2.dumps(cbor2.CBORTag(COSE_ENCRYPT_TAG, [PROTECTED, {5: iv}, ciphertext, [recipient_entry]]))


def unseal(private_key: ec.EllipticCurvePrivateKey | Callable[[ec.EllipticCurvePublicKey], bytes],
           sealed: bytes | cbor2.CBORTag) -> bytes:
    """The plaintext of a COSE_Encrypt `seal` made for `private_key`'s public key. `private_key`
    may also be the ECDH step alone (the ephemeral public key in, the shared x coordinate out),
    for a key that never leaves its secure element."""
    try:
        item = cbor2.loads(sealed) if isinstance(sealed, bytes) else sealed
        if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_ENCRYPT_TAG:
            raise ValueError("not a tagged COSE_Encrypt")
        protected, unprotected, ciphertext, recipients = item.value
        (r_protected, r_unprotected, r_ciphertext), = recipients
        if protected != PROTECTED or r_protected != RECIPIENT_PROTECTED or r_ciphertext != b"":
            raise ValueError("not AES-CCM-16-64-128 with ECDH-ES + HKDF-256")
        iv, epk = unprotected[5], r_unprotected[-1]
        if len(iv) != IV_LEN or epk.get(1) != 2 or epk.get(-1) != 1:
            raise ValueError("wrong IV or ephemeral key")
        ephemeral = ec.EllipticCurvePublicNumbers(int.from_bytes(epk[-2], "big"), int.from_bytes(epk[-3], "big"),
                                                  ec.SECP256R1()).public_key()
    except Exception as exc:
        raise SealError(f"not a sealed secret: {exc}") from None
    try:
        shared = (private_key.exchange(ec.ECDH(), ephemeral) if isinstance(private_key, ec.EllipticCurvePrivateKey)
                  else private_key(ephemeral))
    except Exception as exc:            # a secure element that refused the exchange
        raise SealError(f"the key exchange failed: {exc.__class__.__name__}") from None
    try:
        return AESCCM(_cek(shared), tag_length=TAG_LEN).decrypt(iv, ciphertext, _aad())
    except InvalidTag:
        raise SealError("not sealed to this key") from None


# -- the signed answer: COSE_Sign1 (tag 18), ES256, x5chain ------------------------------------------

COSE_SIGN1_TAG = 18
ALG_ES256 = -7
X5CHAIN = 33
SIGN_PROTECTED = cbor2.dumps({1: ALG_ES256})                        # h'A10126'


def _to_be_signed(payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", SIGN_PROTECTED, b"", payload])


def sign(payload: bytes, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> bytes:
    """COSE_Sign1 of `payload` with ES256 by `key`, whose certificate is chain[0] (the rest: the
    certificates up to, not including, the root), in the unprotected header's x5chain."""
    der = decode_dss_signature(key.sign(_to_be_signed(payload), ec.ECDSA(hashes.SHA256())))
    signature = der[0].to_bytes(32, "big") + der[1].to_bytes(32, "big")
    x5chain = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [SIGN_PROTECTED, {X5CHAIN: x5chain}, payload, signature]))


def verify(signed: bytes, check_chain: Callable[[x509.Certificate, list[x509.Certificate]], None]) -> bytes:
    """The payload of a COSE_Sign1 `sign` made, once `check_chain(leaf, intermediates)` accepted
    its x5chain (raising if not) and the signature verified with the leaf's key."""
    try:
        item = cbor2.loads(signed)
        if not isinstance(item, cbor2.CBORTag) or item.tag != COSE_SIGN1_TAG:
            raise ValueError("not a tagged COSE_Sign1")
        protected, unprotected, payload, signature = item.value
        if protected != SIGN_PROTECTED or not isinstance(payload, bytes) or len(signature) != 64:
            raise ValueError("not ES256")
        chain = [x509.load_der_x509_certificate(der) for der in unprotected[X5CHAIN]]
        key = chain[0].public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the signer's key is not P-256")
    except Exception as exc:
        raise SealError(f"not a signed answer: {exc}") from None
    try:
        check_chain(chain[0], chain[1:])
    except Exception as exc:
        raise SealError(f"the signer is not the gateway: {exc}") from None
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        key.verify(encode_dss_signature(r, s), _to_be_signed(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SealError("the signature does not verify") from None
    return payload
