"""Attestation evidence: an Entity Attestation Token (RFC 9711) as a CWT (RFC 8392) in a
COSE_Sign1 (RFC 9052, tag 18), signed with ES256 by the device's identity key.

The exact format is specified in docs/evidence.md. This module has three parts:

- `Evidence`: the claims, as a frozen dataclass;
- `encode_claims` / `sign_evidence`: the device side (used by tests, tools and simulators);
- `parse_sign1` / `Sign1.verify` / `decode_claims`: the verifier side, strict. The CBOR is
  decoded by `cbor_strict` (size cap, nesting limit, no duplicate keys, no trailing bytes), the
  structure and every claim's type are checked, and the signature is checked with
  `cryptography` over the Sig_structure of RFC 9052 §4.4.

Why the verifier does not call `cwt` to check the signature: the token has to be decoded by our
strict decoder anyway (cwt decodes with cbor2, which accepts duplicate keys and trailing bytes),
after which all that is left is the fixed four-element Sig_structure and one ECDSA verification.
cwt's decoder costs about a fifth of the whole verification on top of that (measured in
benchmarks/bench_attestation.py, which runs both side by side). The tests check both
directions against cwt: tokens made here verify with cwt, and tokens made by cwt verify here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import cbor2
from cbor2 import CBORTag
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from . import cbor_strict
from .errors import (InvalidClaim, InvalidSignature, InvalidStructure, MissingClaim, UnsupportedAlgorithm,
                     UnsupportedKey)

# -- claim keys (RFC 8392 CWT, RFC 9711 EAT) ------------------------------------------------------

IAT = 6
CNF = 8                     # RFC 8747 confirmation claim: the key the evidence vouches for
EAT_NONCE = 10
UEID = 256
OEMID = 258
HWMODEL = 259
OEMBOOT = 262
DBGSTAT = 263
BOOTCOUNT = 267
SWNAME = 270
SWVERSION = 271
# Private-use claim (RFC 8392 §9.1: integers below -65536): the digest of the running firmware
# image as a CoSWID hash-entry (RFC 9393 §2.9.1): [hash-alg-id, hash-value].
FWDIGEST = -70001

CLAIM_NAMES = {IAT: "iat", CNF: "cnf", EAT_NONCE: "eat_nonce", UEID: "ueid", OEMID: "oemid", HWMODEL: "hwmodel",
               OEMBOOT: "oemboot", DBGSTAT: "dbgstat", BOOTCOUNT: "bootcount", SWNAME: "swname",
               SWVERSION: "swversion", FWDIGEST: "fwdigest"}
REQUIRED_CLAIMS = (EAT_NONCE, UEID, OEMID, HWMODEL, SWNAME, SWVERSION, FWDIGEST, OEMBOOT, DBGSTAT, BOOTCOUNT, IAT)

# IANA "Named Information Hash Algorithm Registry" identifiers, as in CoSWID hash-entry
HASH_ALGS = {1: ("sha-256", 32), 7: ("sha-384", 48), 8: ("sha-512", 64)}
HASH_ALG_IDS = {name: alg_id for alg_id, (name, _) in HASH_ALGS.items()}

# dbgstat values (RFC 9711 §4.2.9)
DBG_ENABLED = 0
DBG_DISABLED = 1
DBG_DISABLED_SINCE_BOOT = 2
DBG_DISABLED_PERMANENTLY = 3
DBG_DISABLED_FULLY_AND_PERMANENTLY = 4
DBGSTAT_NAMES = {0: "enabled", 1: "disabled", 2: "disabled-since-boot", 3: "disabled-permanently",
                 4: "disabled-fully-and-permanently"}

# UEID types (RFC 9711 §4.2.1): first byte, allowed total lengths
UEID_TYPES = {0x01: (17, 25, 33), 0x02: (7, 9), 0x03: (15,)}

COSE_SIGN1_TAG = 18
COSE_ALG = 1
COSE_CRIT = 2
COSE_KID = 4
ES256 = -7

# cnf (RFC 8747 §3.2): {1 (COSE_Key): {1 (kty): 2 (EC2), -1 (crv): 1 (P-256), -2: x, -3: y}}
CNF_COSE_KEY = 1
COSE_KTY, COSE_KTY_EC2, COSE_CRV, COSE_CRV_P256, COSE_X, COSE_Y = 1, 2, -1, 1, -2, -3

MAX_EVIDENCE_SIZE = 2048
MAX_DEPTH = 8
NONCE_MIN, NONCE_MAX = 8, 64
_UINT64_MAX = 2**64 - 1
_SIGN1_TAGS = frozenset({COSE_SIGN1_TAG})
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class Evidence:
    """The claims of one attestation token."""

    nonce: bytes                 # eat_nonce (10): the gateway's nonce, echoed
    ueid: bytes                  # ueid (256): type byte + identifier
    oemid: int | bytes           # oemid (258): IANA PEN (int) or IEEE OUI/random id (bstr)
    hwmodel: bytes               # hwmodel (259): the device type, UTF-8
    swname: str                  # swname (270): firmware name
    swversion: str               # swversion (271) [0]
    fw_alg: str                  # fwdigest (-70001) [0], as a name: sha-256 | sha-384 | sha-512
    fw_digest: bytes             # fwdigest (-70001) [1]
    secure_boot: bool            # oemboot (262)
    dbgstat: int                 # dbgstat (263), 0..4
    bootcount: int               # bootcount (267)
    iat: int                     # iat (6), seconds since the epoch
    swversion_scheme: int | None = None    # swversion (271) [1], optional
    # cnf (8), optional: the P-256 public key (x, y: 32 bytes each) the evidence vouches for, as
    # a COSE_Key (RFC 8747 §3.2); evidence in a CSR must name the CSR's key (docs/evidence.md)
    cnf_key: tuple[bytes, bytes] | None = None

    @property
    def device_type(self) -> str | None:
        try:
            return self.hwmodel.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def firmware(self) -> str:
        return f"{self.fw_alg}:{self.fw_digest.hex()}"

    def claims(self) -> dict[int, Any]:
        """The claims set as a CBOR map, integer keys in ascending order."""
        swversion: list = [self.swversion] if self.swversion_scheme is None else [self.swversion,
                                                                                   self.swversion_scheme]
        m = {IAT: self.iat, EAT_NONCE: self.nonce, UEID: self.ueid, OEMID: self.oemid, HWMODEL: self.hwmodel,
             OEMBOOT: self.secure_boot, DBGSTAT: self.dbgstat, BOOTCOUNT: self.bootcount, SWNAME: self.swname,
             SWVERSION: swversion, FWDIGEST: [HASH_ALG_IDS[self.fw_alg], self.fw_digest]}
        if self.cnf_key is not None:
            m[CNF] = {CNF_COSE_KEY: {COSE_KTY: COSE_KTY_EC2, COSE_CRV: COSE_CRV_P256, COSE_X: self.cnf_key[0],
                                     COSE_Y: self.cnf_key[1]}}
        return dict(sorted(m.items(), key=lambda kv: (kv[0] < 0, abs(kv[0]))))

    def as_json(self) -> dict[str, Any]:
        """JSON-friendly view for logs and `--json` output (bytes as lower-case hex)."""
        view = {"eat_nonce": self.nonce.hex(), "ueid": self.ueid.hex(),
                "oemid": self.oemid if isinstance(self.oemid, int) else self.oemid.hex(),
                "hwmodel": self.device_type if self.device_type is not None else self.hwmodel.hex(),
                "swname": self.swname, "swversion": self.swversion, "swversion_scheme": self.swversion_scheme,
                "fwdigest": self.firmware, "oemboot": self.secure_boot, "dbgstat": self.dbgstat,
                "bootcount": self.bootcount, "iat": self.iat}
        if self.cnf_key is not None:        # the bound key's x || y (absent from classic evidence)
            view["cnf"] = (self.cnf_key[0] + self.cnf_key[1]).hex()
        return view


def cose_key_xy(public_key) -> tuple[bytes, bytes]:
    """(x, y) of a P-256 public key, 32 bytes each: the COSE_Key of a `cnf` claim."""
    numbers = public_key.public_numbers()
    return numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")


def fw_digest_of(image: bytes, alg: str = "sha-256") -> bytes:
    return hashlib.new(alg.replace("-", ""), image).digest()


# -- device side -------------------------------------------------------------------------------------

def encode_claims(evidence: Evidence) -> bytes:
    return cbor2.dumps(evidence.claims())


def sign_evidence(evidence: Evidence | bytes, private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """COSE_Sign1 (tag 18) with protected header {1: -7}, empty unprotected header, the claims as
    payload, signed with ES256 by `private_key`. `evidence` may also be a pre-encoded claims set
    (for tests of malformed claims).

    Built here rather than with `cwt`: cwt takes the key only as PEM/JWK, and importing it costs
    0.31 ms per token against 0.05 ms for the signature (measured with py-spy on the load
    generator, where every device signs once). The structure is the one the verifier checks
    (`Sign1.to_be_signed`); the tests verify our tokens with cwt and cwt's tokens with us."""
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve,
                                                                                 ec.SECP256R1):
        raise UnsupportedKey("evidence is signed with an ECDSA P-256 key")
    payload = evidence if isinstance(evidence, bytes) else encode_claims(evidence)
    tbs = Sign1(_ES256_ONLY, {}, payload, b"").to_be_signed()
    r, s = decode_dss_signature(private_key.sign(tbs, _ECDSA))
    return (b"\xd2\x84\x43" + _ES256_ONLY + b"\xa0" + _bstr_head(len(payload)) + payload
            + b"\x58\x40" + r.to_bytes(32, "big") + s.to_bytes(32, "big"))


# -- verifier side -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sign1:
    """A structurally valid COSE_Sign1 with ES256 in its protected header; not yet verified."""

    protected: bytes      # the protected header, as the bstr it was sent in
    unprotected: dict
    payload: bytes
    signature: bytes

    def to_be_signed(self) -> bytes:
        """Sig_structure = ["Signature1", body_protected, external_aad = h'', payload] (RFC 9052 §4.4)."""
        return b"\x84\x6aSignature1" + _bstr_head(len(self.protected)) + self.protected + b"\x40" \
            + _bstr_head(len(self.payload)) + self.payload

    def verify(self, public_key) -> None:
        """Check the ES256 signature with the device certificate's public key."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise UnsupportedKey("the device certificate's key is not an ECDSA P-256 key")
        sig = self.signature
        if len(sig) != 64:
            raise InvalidSignature(f"ES256 signature must be 64 bytes, got {len(sig)}")
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            public_key.verify(der, self.to_be_signed(), _ECDSA)
        except _CryptoInvalidSignature:
            raise InvalidSignature("evidence signature does not verify with the device certificate's key") from None


_ES256_ONLY = b"\xa1\x01\x26"


def _bstr_head(n: int) -> bytes:
    if n < 24:
        return bytes([0x40 | n])
    if n < 0x100:
        return bytes([0x58, n])
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    return b"\x5a" + n.to_bytes(4, "big")


def parse_sign1(token: bytes, *, max_size: int = MAX_EVIDENCE_SIZE) -> Sign1:
    """Strictly decode a tagged COSE_Sign1 and check its algorithm. Raises `MalformedCBOR`
    subclasses, `InvalidStructure` or `UnsupportedAlgorithm`."""
    top = cbor_strict.loads(token, max_size=max_size, max_depth=MAX_DEPTH, tags=_SIGN1_TAGS)
    if not isinstance(top, CBORTag) or top.tag != COSE_SIGN1_TAG:
        raise InvalidStructure("evidence must be a COSE_Sign1 with tag 18")
    v = top.value
    if not isinstance(v, list) or len(v) != 4:
        raise InvalidStructure("COSE_Sign1 must be an array of 4 elements")
    protected, unprotected, payload, signature = v
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict) or not isinstance(signature, bytes):
        raise InvalidStructure("COSE_Sign1 must be [protected: bstr, unprotected: map, payload, signature: bstr]")
    if not isinstance(payload, bytes):
        raise InvalidStructure("COSE_Sign1 payload must be an attached bstr (not detached, not nil)")
    if protected == _ES256_ONLY:      # {1: -7}, what every ES256 signer sends: no decoder run needed
        headers = {COSE_ALG: ES256}
    else:
        headers = cbor_strict.loads(protected, max_size=max_size, max_depth=MAX_DEPTH) if protected else {}
    if not isinstance(headers, dict):
        raise InvalidStructure("COSE protected header must be a map")
    if COSE_CRIT in headers:
        raise InvalidStructure("COSE protected header has critical parameters this verifier does not know")
    if COSE_ALG in unprotected:
        raise UnsupportedAlgorithm("the algorithm must be in the protected header only")
    alg = headers.get(COSE_ALG)
    if alg is None:
        raise UnsupportedAlgorithm("no algorithm in the protected header (ES256, -7, required)")
    if alg != ES256 or isinstance(alg, bool):
        raise UnsupportedAlgorithm(f"COSE algorithm {alg!r} is not accepted (ES256, -7, required)")
    return Sign1(protected, unprotected, payload, signature)


def _claim(claims: dict, key: int) -> Any:
    try:
        return claims[key]
    except KeyError:
        raise MissingClaim(f"claim {CLAIM_NAMES[key]} ({key}) is missing") from None


def _bad(key: int, what: str) -> InvalidClaim:
    return InvalidClaim(f"claim {CLAIM_NAMES[key]} ({key}) {what}")


def _uint(claims: dict, key: int, limit: int = _UINT64_MAX) -> int:
    v = _claim(claims, key)
    if type(v) is not int or not 0 <= v <= limit:
        raise _bad(key, f"must be an unsigned integer <= {limit}")
    return v


def decode_claims(payload: bytes, *, max_size: int = MAX_EVIDENCE_SIZE) -> Evidence:
    """Strictly decode the claims set and check the type and size of every claim devid uses.
    Claims devid does not know are ignored (RFC 8392 §3)."""
    claims = cbor_strict.loads(payload, max_size=max_size, max_depth=MAX_DEPTH)
    if not isinstance(claims, dict):
        raise InvalidStructure("the COSE payload must be a CWT claims set (a map)")
    for key in REQUIRED_CLAIMS:
        if key not in claims:
            raise MissingClaim(f"claim {CLAIM_NAMES[key]} ({key}) is missing")

    nonce = claims[EAT_NONCE]
    if not isinstance(nonce, bytes) or not NONCE_MIN <= len(nonce) <= NONCE_MAX:
        raise _bad(EAT_NONCE, f"must be a byte string of {NONCE_MIN} to {NONCE_MAX} bytes")
    ueid = claims[UEID]
    if not isinstance(ueid, bytes) or len(ueid) not in UEID_TYPES.get(ueid[:1][0] if ueid else -1, ()):
        raise _bad(UEID, "must be a byte string: type 0x01 (RAND, 16/24/32 bytes), 0x02 (EUI-48/64) "
                         "or 0x03 (IMEI, 14 bytes) followed by the identifier")
    oemid = claims[OEMID]
    if not ((type(oemid) is int and 0 <= oemid <= _UINT64_MAX) or (isinstance(oemid, bytes) and len(oemid) in (3, 16))):
        raise _bad(OEMID, "must be an IANA PEN (unsigned integer) or a 3- or 16-byte string")
    hwmodel = claims[HWMODEL]
    if not isinstance(hwmodel, bytes) or not 1 <= len(hwmodel) <= 32:
        raise _bad(HWMODEL, "must be a byte string of 1 to 32 bytes")
    swname = claims[SWNAME]
    if not isinstance(swname, str) or not 1 <= len(swname) <= 64:
        raise _bad(SWNAME, "must be a text string of 1 to 64 characters")
    swv = claims[SWVERSION]
    if (not isinstance(swv, list) or not 1 <= len(swv) <= 2 or not isinstance(swv[0], str)
            or not 1 <= len(swv[0]) <= 64 or (len(swv) == 2 and type(swv[1]) is not int)):
        raise _bad(SWVERSION, "must be [version: tstr, ? version-scheme: int]")
    fw = claims[FWDIGEST]
    if not isinstance(fw, list) or len(fw) != 2 or type(fw[0]) is not int or not isinstance(fw[1], bytes):
        raise _bad(FWDIGEST, "must be [hash-alg-id: int, digest: bstr]")
    if fw[0] not in HASH_ALGS:
        raise _bad(FWDIGEST, f"hash algorithm {fw[0]} is not supported (1 = sha-256, 7 = sha-384, 8 = sha-512)")
    alg_name, alg_len = HASH_ALGS[fw[0]]
    if len(fw[1]) != alg_len:
        raise _bad(FWDIGEST, f"{alg_name} digest must be {alg_len} bytes, got {len(fw[1])}")
    oemboot = claims[OEMBOOT]
    if not isinstance(oemboot, bool):
        raise _bad(OEMBOOT, "must be true or false")
    dbgstat = _uint(claims, DBGSTAT, 4)
    bootcount = _uint(claims, BOOTCOUNT)
    iat = claims[IAT]
    if type(iat) is not int or not 0 <= iat <= _UINT64_MAX:
        raise _bad(IAT, "must be an integer NumericDate (seconds since 1970, no fraction)")
    return Evidence(nonce=nonce, ueid=ueid, oemid=oemid, hwmodel=hwmodel, swname=swname, swversion=swv[0],
                    fw_alg=alg_name, fw_digest=fw[1], secure_boot=oemboot, dbgstat=dbgstat, bootcount=bootcount,
                    iat=iat, swversion_scheme=swv[1] if len(swv) == 2 else None, cnf_key=_cnf(claims))


def _cnf(claims: dict) -> tuple[bytes, bytes] | None:
    """The cnf claim's key, if the claim is there: exactly {1: {1: 2, -1: 1, -2: x, -3: y}}."""
    if CNF not in claims:
        return None
    cnf = claims[CNF]
    key = cnf.get(CNF_COSE_KEY) if isinstance(cnf, dict) and len(cnf) == 1 else None
    if (not isinstance(key, dict) or set(key) != {COSE_KTY, COSE_CRV, COSE_X, COSE_Y}
            or key[COSE_KTY] != COSE_KTY_EC2 or type(key[COSE_KTY]) is not int
            or key[COSE_CRV] != COSE_CRV_P256 or type(key[COSE_CRV]) is not int
            or not isinstance(key[COSE_X], bytes) or len(key[COSE_X]) != 32
            or not isinstance(key[COSE_Y], bytes) or len(key[COSE_Y]) != 32):
        raise _bad(CNF, "must be {1: COSE_Key} with an EC2 P-256 key: {1: 2, -1: 1, -2: x (32 bytes), -3: y (32 bytes)}")
    return key[COSE_X], key[COSE_Y]


def decode_evidence(token: bytes, public_key, *, max_size: int = MAX_EVIDENCE_SIZE) -> Evidence:
    """parse_sign1 + verify + decode_claims: the whole check of one token, signature first."""
    sign1 = parse_sign1(token, max_size=max_size)
    sign1.verify(public_key)
    return decode_claims(sign1.payload, max_size=max_size)
