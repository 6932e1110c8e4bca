"""Issuance: a public key, a profile and a registry record in; a signed, recorded certificate out.

From a CSR the CA takes only the public key, after checking the CSR's signature and the key
against the profile. Subject, SubjectAltName, device type, key usages and validity come from the
profile and the registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .csr_evidence import extract_evidence
from .errors import DuplicateDevice, InvalidCSR, KeyPolicyViolation, SerialCollision
from .identity import IdentitySettings, check_device_type, check_serial, fingerprint_der
from .profiles import Profile, device_subject, extensions_for_device, get_profile
from .store import CertificateRecord, DeviceRecord, DeviceState, Registry

SERIAL_BITS = 127          # positive, fits 16 DER octets; >= 64 random bits as CA/B and RFC 5280 ask
MAX_SERIAL_ATTEMPTS = 4


@dataclass(frozen=True)
class Issuer:
    """A CA certificate with its private key, and the AKI its children carry."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def aki(self) -> x509.AuthorityKeyIdentifier:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm:
        return hash_for(self.key)


def hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    """The signature hash that matches the key size (SHA-384 for P-384, SHA-256 for P-256)."""
    return hashes.SHA384() if key.curve.key_size > 256 else hashes.SHA256()


@dataclass(frozen=True)
class CheckedKey:
    """A public key taken from a CSR whose signature verified and whose key the profile allows."""

    public_key: ec.EllipticCurvePublicKey
    profile: str
    # the attestation evidence the CSR carried (`csr_evidence.extract_evidence`), unverified: the
    # caller appraises it; None when the CSR carried none or the caller did not ask for it
    evidence: bytes | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    cert: x509.Certificate
    record: CertificateRecord

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


# the hashes a CSR may be signed with; SHA-1 (and MD5, SHA-224...) are refused by name, before
# the signature is checked, so the device learns why (OpenSSL would only say it does not verify)
CSR_HASHES = {"sha256": "SHA-256", "sha384": "SHA-384", "sha512": "SHA-512"}
_HASH_NAMES = {"sha1": "SHA-1", "sha224": "SHA-224", **CSR_HASHES}


def _check_csr_hash(csr: x509.CertificateSigningRequest) -> None:
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise InvalidCSR(f"CSR signature algorithm {csr.signature_algorithm_oid.dotted_string} is not "
                         f"supported (sign with ECDSA and {', '.join(CSR_HASHES.values())})") from None
    if algorithm is None:       # Ed25519/Ed448: no separate hash; the key check refuses the key
        return
    if algorithm.name not in CSR_HASHES:
        name = _HASH_NAMES.get(algorithm.name, algorithm.name.upper())
        raise InvalidCSR(f"CSR is signed with {name}, a hash the CA refuses "
                         f"(sign with {', '.join(CSR_HASHES.values())})")


def load_csr(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR, check that its signature hash is one the CA accepts
    (`CSR_HASHES`), and check its self-signature (load_*_csr alone does not)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            csr = x509.load_pem_x509_csr(data)
        else:
            csr = x509.load_der_x509_csr(data)
    except ValueError:
        raise InvalidCSR("malformed CSR: not a PKCS#10 request in DER or PEM") from None
    _check_csr_hash(csr)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidCSR(f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise InvalidCSR("CSR signature does not verify")
    return csr


def random_serial(rand_bytes: Callable[[int], bytes]) -> int:
    while True:
        serial = int.from_bytes(rand_bytes(16), "big") >> (128 - SERIAL_BITS)
        if serial >= 1 << 63:    # keeps at least 64 significant bits; rejects ~2^-64 of draws
            return serial


def to_utc(t: datetime) -> datetime:
    if t.tzinfo is None:
        raise ValueError("naive datetime: pass an aware UTC time")
    return t.astimezone(timezone.utc).replace(microsecond=0)


class CertificateAuthority:
    """Issues device certificates under named profiles and records them in the registry."""

    def __init__(self, issuers: Callable[[str], Issuer], profiles: dict[str, Profile],
                 settings: IdentitySettings, store: Registry,
                 rand_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self._issuers = issuers
        self._aki_cache: dict[str, tuple[x509.AuthorityKeyIdentifier, hashes.HashAlgorithm]] = {}
        self.profiles = profiles
        self.settings = settings
        self.store = store
        self._rand = rand_bytes

    # -- building ----------------------------------------------------------------------------

    def check_public_key(self, key: object, profile: Profile) -> ec.EllipticCurvePublicKey:
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise KeyPolicyViolation(f"profile {profile.name} requires an EC key")
        if key.curve.name not in profile.allowed_curves:
            raise KeyPolicyViolation(
                f"profile {profile.name} does not allow curve {key.curve.name} (allowed: {', '.join(profile.allowed_curves)})")
        return key

    def sign_device_certificate(self, public_key: ec.EllipticCurvePublicKey, profile: Profile,
                                serial: str, device_type: str, now: datetime) -> IssuedCertificate:
        """Build and sign a device certificate. Pure: records nothing."""
        now = to_utc(now)
        issuer = self._issuers(profile.issuer)
        cached = self._aki_cache.get(issuer.name)
        if cached is None:
            cached = self._aki_cache[issuer.name] = (issuer.aki, issuer.hash_algorithm)
        aki, hash_algorithm = cached
        not_before = now - profile.backdate
        not_after = min(now + profile.validity, issuer.cert.not_valid_after_utc)
        builder = (x509.CertificateBuilder()
                   .subject_name(device_subject(serial, self.settings))
                   .issuer_name(issuer.cert.subject)
                   .public_key(public_key)
                   .serial_number(random_serial(self._rand))
                   .not_valid_before(not_before)
                   .not_valid_after(not_after))
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        for ext, critical in extensions_for_device(profile, serial, device_type, self.settings, ski, aki):
            builder = builder.add_extension(ext, critical)
        cert = builder.sign(issuer.key, hash_algorithm)
        der = cert.public_bytes(serialization.Encoding.DER)     # once: for the record and its fingerprint
        record = CertificateRecord(
            serial=cert.serial_number, issuer=issuer.name, profile=profile.name, device_serial=serial,
            not_before=not_before, not_after=not_after, fingerprint=fingerprint_der(der),
            der=der, issued_at=now)
        return IssuedCertificate(cert, record)

    def with_store(self, store: Registry) -> "CertificateAuthority":
        """The same CA (issuers, profiles, settings, randomness) recording into another store."""
        ca = CertificateAuthority(self._issuers, self.profiles, self.settings, store, self._rand)
        ca._aki_cache = self._aki_cache
        return ca

    # -- issuing and recording ----------------------------------------------------------------

    def checked_csr_key(self, csr_data: bytes, profile_name: str = "operational", *,
                        evidence_cap: int | None = None) -> "CheckedKey":
        """Parse the CSR, check its signature and its key against the profile: what issuance takes
        from a CSR. Callers that must refuse a bad CSR early pass the result to issue_operational.
        `evidence_cap`: also take the attestation evidence the CSR carries (at most that many
        bytes; `csr_evidence`); without it, a CSR that carries evidence is refused."""
        profile = get_profile(self.profiles, profile_name)
        csr = load_csr(csr_data)
        evidence = extract_evidence(csr, max_size=evidence_cap or 0xFFFF)
        if evidence is not None and evidence_cap is None:
            raise InvalidCSR("attestation evidence in a CSR is taken at enrollment (/sen) only")
        return CheckedKey(self.check_public_key(csr.public_key(), profile), profile.name, evidence)

    def issue_operational(self, csr_data: "bytes | CheckedKey", device_serial: str, now: datetime,
                          profile_name: str = "operational", validity: timedelta | None = None) -> IssuedCertificate:
        """Issue an operational certificate for a registered, non-revoked device from its CSR.

        The device moves to `enrolled`; its previous operational certificates become superseded,
        in the same transaction. The registry looks the device up inside that transaction (raising
        UnknownDevice or DeviceRevoked) and the certificate is signed there, so the device check,
        the record and the state change cannot interleave with a revocation. `validity`: the
        device type's own validity (its attestation policy), instead of the profile's.
        """
        profile = get_profile(self.profiles, profile_name)
        if validity is not None:
            profile = replace(profile, validity=validity)
        if isinstance(csr_data, CheckedKey):
            if csr_data.profile != profile.name:
                raise KeyPolicyViolation(f"key was checked for profile {csr_data.profile}, not {profile.name}")
            public_key = csr_data.public_key
        else:
            public_key = self.checked_csr_key(csr_data, profile_name).public_key
        check_serial(device_serial)
        issued: list[IssuedCertificate] = []

        def build(device: DeviceRecord) -> CertificateRecord:
            # runs inside the registry's write transaction, after its device check
            issued.append(self.sign_device_certificate(public_key, profile, device.serial, device.device_type, now))
            return issued[-1].record

        for _ in range(MAX_SERIAL_ATTEMPTS):
            try:
                self.store.record_for_device(device_serial, build, supersede_profile=profile.name,
                                             new_state=DeviceState.ENROLLED)
                return issued[-1]
            except DuplicateDevice:
                raise
            except SerialCollision:
                continue    # another certificate already has this serial: draw again
        raise SerialCollision("could not draw an unused certificate serial")

    def new_factory_identity(self, public_key: ec.EllipticCurvePublicKey, serial: str, device_type: str,
                             now: datetime) -> tuple[DeviceRecord, IssuedCertificate]:
        """Build (not record) a factory identity for a new device; see `register_factory_identities`."""
        profile = get_profile(self.profiles, "factory")
        self.check_public_key(public_key, profile)
        check_serial(serial)
        check_device_type(device_type)
        issued = self.sign_device_certificate(public_key, profile, serial, device_type, now)
        t = to_utc(now)
        device = DeviceRecord(serial=serial, device_type=device_type, state=DeviceState.MANUFACTURED,
                              created_at=t, updated_at=t)
        return device, issued

    def issue_factory_from_csr(self, csr_data: bytes, serial: str, device_type: str,
                               now: datetime) -> IssuedCertificate:
        """Register a new device with a factory identity for a key made elsewhere (a secure element)."""
        csr = load_csr(csr_data)
        for _ in range(MAX_SERIAL_ATTEMPTS):
            device, issued = self.new_factory_identity(csr.public_key(), serial, device_type, now)
            try:
                self.store.register_devices([(device, issued.record)])
                return issued
            except DuplicateDevice:
                raise
            except SerialCollision:
                continue    # another certificate already has this serial: draw again
        raise SerialCollision("could not draw an unused certificate serial")
