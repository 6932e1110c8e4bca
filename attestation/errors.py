"""Named errors of attestation. Each carries a short message fit for an operator or a device.

Two families: `EvidenceError` (the evidence itself is unacceptable: malformed CBOR, bad
structure, bad signature) and `NonceError` (freshness). `PolicyError` is the operator's
policy file. All derive from `AttestationError`, which the CLI prints as one line.
"""


class AttestationError(Exception):
    """Base of every error attestation raises on purpose."""

    code = "attestation-error"


# -- CBOR, before anything is interpreted ------------------------------------------------------

class EvidenceError(AttestationError):
    """The evidence cannot be accepted as a well-formed, signed token."""

    code = "evidence-malformed"


class MalformedCBOR(EvidenceError):
    """Not well-formed CBOR: truncated, reserved additional information, invalid UTF-8."""

    code = "cbor-malformed"


class EvidenceTooLarge(MalformedCBOR):
    """More bytes than the size cap; refused before any decoding."""

    code = "cbor-too-large"


class NestingTooDeep(MalformedCBOR):
    """Arrays, maps and tags nested deeper than the limit."""

    code = "cbor-too-deep"


class DuplicateMapKey(MalformedCBOR):
    """A map has the same key twice (cbor2 would keep the last one silently)."""

    code = "cbor-duplicate-key"


class TrailingBytes(MalformedCBOR):
    """Bytes after the end of the single top-level item (cbor2 would ignore them)."""

    code = "cbor-trailing-bytes"


class IndefiniteLength(MalformedCBOR):
    """An indefinite-length string, array or map: not allowed in evidence."""

    code = "cbor-indefinite-length"


class UnsupportedCBOR(MalformedCBOR):
    """Well-formed CBOR this profile does not allow: a map key that is not an integer or
    text string, a tag other than COSE_Sign1's, a non-preferred (overlong) integer head."""

    code = "cbor-unsupported"


class InvalidStructure(EvidenceError):
    """Well-formed CBOR, but not a COSE_Sign1 carrying an EAT claims set of the right shape."""

    code = "evidence-structure"


class MissingClaim(InvalidStructure):
    """A required claim is absent."""

    code = "claim-missing"


class InvalidClaim(InvalidStructure):
    """A claim has the wrong type, size or value."""

    code = "claim-invalid"


class UnsupportedAlgorithm(EvidenceError):
    """The COSE algorithm is not ES256 (-7), or is not in the protected header."""

    code = "algorithm-unsupported"


class InvalidSignature(EvidenceError):
    """The COSE_Sign1 signature does not verify with the device's certificate key."""

    code = "signature-invalid"


class UnsupportedKey(EvidenceError):
    """The device certificate's key is not an ECDSA P-256 key."""

    code = "key-unsupported"


# -- nonces -------------------------------------------------------------------------------------

class NonceError(AttestationError):
    """The evidence's nonce is not a fresh nonce issued to this device."""

    code = "nonce-invalid"


class NonceUnknown(NonceError):
    """No such nonce was ever issued (or it was purged long after expiry)."""

    code = "nonce-unknown"


class NonceReplayed(NonceError):
    """The nonce was issued and has already been used once."""

    code = "nonce-replayed"


class NonceExpired(NonceError):
    """The nonce was issued, unused, but its lifetime is over."""

    code = "nonce-expired"


class NonceWrongDevice(NonceError):
    """The nonce was issued to another device (or certificate, or session)."""

    code = "nonce-wrong-device"


# -- policy and log -------------------------------------------------------------------------------

class PolicyError(AttestationError):
    """The policy file is missing, not TOML, or has a bad value. The message names the place."""

    code = "policy-invalid"


class LogError(AttestationError):
    """The attestation log cannot be read or appended to."""

    code = "log-error"
