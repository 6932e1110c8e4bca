"""What a device is and holds: its bundle (`devid provision`), the claims it signs, its firmware,
the CSRs it sends and the files its operational identity is stored in. No network I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from devid.attestation.evidence import Evidence, cose_key_xy, fw_digest_of, sign_evidence
from devid.ca import der, keys
from devid.ca.csr_evidence import embed_evidence
from devid.gateway.device.protocol import EnrollFailed
from devid.gateway.errors import BundleError

DIGEST_ALGS = {64: "sha-256", 96: "sha-384", 128: "sha-512"}
OPERATIONAL_FILES = ("op-key.pem", "op-cert.pem", "op-chain.pem")


# -- the bundle ---------------------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None


SE_GUIDE = ('docs/enrollment.md, "A device with its keys in a secure element (PKCS#11)"')


def token_section(directory: Path) -> dict | None:
    """The `pkcs11` section of a secure-element bundle's secure-element-config.json (`devid
    provision --secure-element`: its keys are in a token, it has no key.pem), or None."""
    directory = Path(directory)
    if (directory / "key.pem").exists():
        return None
    try:
        doc = json.loads((directory / "secure-element-config.json").read_text())
    except (OSError, ValueError):
        return None
    section = doc.get("pkcs11") if isinstance(doc, dict) else None
    return section if isinstance(section, dict) else None


def load_bundle(directory: Path, cert_name: str = "chain.pem", key_name: str = "key.pem", *,
                token_keys: bool = False, token: str | None = None):
    """(leaf, intermediates, key, root) from a device directory made by `devid provision`.

    A secure-element bundle (no key.pem, a `pkcs11` section in secure-element-config.json) has
    its keys in a token: with `token_keys` the key is a `TokenKey` (the factory key, or for
    op-key.pem the current operational key, `SERIAL-op`), opened in the recorded token (or
    `token`, a URI naming the same token, e.g. with its pin-source); without, a BundleError
    says that devid's own DTLS client cannot use it and where the supported path is."""
    directory = Path(directory)
    try:
        chain = x509.load_pem_x509_certificates(_read(directory / cert_name))
        root = x509.load_pem_x509_certificate(_read(directory / "ca.pem"))
    except ValueError as exc:
        raise BundleError(f"{directory}: unreadable certificate ({exc})") from None
    section = token_section(directory) if not (directory / key_name).exists() else None
    if section is not None:
        if not token_keys:
            raise BundleError(f"{directory}: its keys are in a secure element (a PKCS#11 token), which devid's own "
                              f"DTLS client cannot use: enroll it with libcoap's coap-client-gnutls and 'devid se' "
                              f"({SE_GUIDE})")
        key = token_key(directory, section, chain[0], operational=key_name != "key.pem", token=token)
    else:
        key = keys.load_plain_key(directory / key_name)
    if key.public_key() != chain[0].public_key():
        raise BundleError(f"{directory}: {key_name} does not match {cert_name}")
    return chain[0], chain[1:], key, root


def token_key(directory: Path, section: dict, cert: x509.Certificate, *, operational: bool = False,
              token: str | None = None):
    """The TokenKey of a secure-element bundle: its factory key (by the recorded label and id) or
    its current operational key (label SERIAL-op)."""
    from devid.gateway.pkcs11.token import TokenKey
    from devid.gateway.pkcs11.uri import parse
    uri = parse(token or str(section.get("token", "")))
    entry = section.get("objects", {}).get("device_private_key", {})
    label = entry.get("label")
    if not isinstance(label, str):
        raise BundleError(f"{directory}: secure-element-config.json names no device_private_key object")
    if operational:
        return TokenKey.open(uri.with_object(label=f"{label}-op", type="private"))
    try:
        kid = bytes.fromhex(entry.get("id", ""))
    except (TypeError, ValueError):
        raise BundleError(f"{directory}: secure-element-config.json: device_private_key id is not hex") from None
    return TokenKey.open(uri.with_object(label=label, id=kid or None, type="private"))


def operational_files(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate]) -> list[tuple[str, bytes, int]]:
    """(name, content, mode) of op-key.pem (PKCS#8, 0600), op-cert.pem and op-chain.pem (the
    certificate, then the CAs after it)."""
    pem = [c.public_bytes(serialization.Encoding.PEM) for c in chain]
    return [("op-key.pem", keys.plain_key(key), 0o600), ("op-cert.pem", pem[0], 0o644),
            ("op-chain.pem", b"".join(pem), 0o644)]


# -- certificates -----------------------------------------------------------------------------------

def serial_of(cert: x509.Certificate) -> str:
    """The device serial in a device certificate's subject (serialNumber), or ''."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    return attrs[0].value if attrs else ""


def pen_of(cert: x509.Certificate) -> int | None:
    """The manufacturer's PEN from the certificate's `urn:dev:os:<PEN>-<serial>` SAN, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("urn:dev:os:"):
            pen = uri[len("urn:dev:os:"):].split("-", 1)[0]
            if pen.isdigit():
                return int(pen)
    return None


def device_type_of(cert: x509.Certificate) -> str:
    """The device type from the certificate's private extension (the only UTF8String extension
    value devid puts in device certificates)."""
    for ext in cert.extensions:
        if isinstance(ext.value, x509.UnrecognizedExtension):
            try:
                return der.decode_utf8_string(ext.value.value)
            except der.DERError:
                continue
    return ""


def device_csr(key: ec.EllipticCurvePrivateKey, serial: str, evidence: bytes | None = None) -> bytes:
    """The DER CSR a device sends to /sen or /sren (the CA takes only its key). With `evidence`
    (a signed token, `DeviceIdentity.evidence(..., bound_key=key.public_key())`), the CSR carries
    it in the attestation attribute (`devid.ca.csr_evidence`, docs/evidence.md): the one-request
    enrollment."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}")]))
           .sign(key, hashes.SHA256()))
    if evidence is not None:
        return embed_evidence(csr, key, evidence)
    return csr.public_bytes(serialization.Encoding.DER)


def new_p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def server_subject(host: str) -> x509.verification.Subject:
    """What the gateway's certificate must name: the address, or the DNS name, the device dialled."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host)


def server_checker(root: x509.Certificate, host: str,
                   clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
    """Check the gateway's certificate: chain to our root, serverAuth, and a SAN matching `host`."""
    store = Store([root])
    subject = server_subject(host)

    def check(leaf: x509.Certificate, intermediates: list[x509.Certificate]):
        verifier = PolicyBuilder().store(store).time(clock()).build_server_verifier(subject)
        verifier.verify(leaf, intermediates)
        return leaf.subject.rfc4514_string()
    return check


def root_verifier(root: x509.Certificate, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
    """verify(leaf, chain) of an issued certificate: a client certificate chaining to `root`
    through the certificates of the answer (raises on failure)."""
    store = Store([root])

    def verify(leaf: x509.Certificate, chain: list[x509.Certificate]) -> None:
        PolicyBuilder().store(store).time(clock()).build_client_verifier().verify(leaf, chain)
    return verify


# -- what the device claims ------------------------------------------------------------------------

@dataclass(frozen=True)
class Firmware:
    alg: str
    digest: bytes
    name: str
    version: str

    @classmethod
    def from_options(cls, directory: Path, image: Path | None, digest_hex: str | None,
                     name: str | None, version: str | None) -> "Firmware | None":
        """From --firmware/--firmware-digest (+ name and version), or DIR/firmware.json; None: no
        attestation evidence will be sent."""
        meta = {}
        meta_path = Path(directory) / "firmware.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError) as exc:
                raise EnrollFailed("firmware", f"{meta_path}: {exc}") from None
        if image is not None:
            try:
                alg, digest = "sha-256", fw_digest_of(Path(image).read_bytes())
            except OSError as exc:
                raise EnrollFailed("firmware", f"cannot read {image}: {exc.strerror}") from None
        elif digest_hex or meta.get("digest"):
            text = (digest_hex or meta["digest"]).lower()
            if ":" in text:
                alg, _, text = text.partition(":")
            else:
                alg = DIGEST_ALGS.get(len(text), "")
            try:
                digest = bytes.fromhex(text)
            except ValueError:
                raise EnrollFailed("firmware", "the firmware digest is not hex") from None
            if alg not in DIGEST_ALGS.values() or DIGEST_ALGS.get(len(digest) * 2) != alg:
                raise EnrollFailed("firmware", "the firmware digest must be a sha-256, sha-384 or sha-512 value "
                                               "(64, 96 or 128 hex digits)")
        else:
            return None
        name = name or meta.get("name")
        version = version or meta.get("version")
        if not name or not version:
            raise EnrollFailed("firmware", "give --firmware-name and --firmware-version (or DIR/firmware.json)")
        return cls(alg, digest, name, version)


@dataclass(frozen=True)
class DeviceIdentity:
    """The device as its factory bundle defines it: what it claims in its evidence and asks for."""

    serial: str
    device_type: str
    ueid: bytes                                # 0x01 + the first 16 bytes of SHA-256 of the factory public key
    oemid: int                                 # the PEN of the urn:dev:os SAN (0 without one)
    factory_key: ec.EllipticCurvePrivateKey    # signs the evidence

    @classmethod
    def of(cls, factory: x509.Certificate, factory_key: ec.EllipticCurvePrivateKey) -> "DeviceIdentity":
        pub = factory_key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        return cls(serial_of(factory), device_type_of(factory), b"\x01" + hashlib.sha256(pub).digest()[:16],
                   pen_of(factory) or 0, factory_key)

    def evidence(self, nonce: bytes, firmware: Firmware, *, iat: int | None = None, secure_boot: bool = True,
                 dbgstat: int = 2, bootcount: int = 1, bound_key: ec.EllipticCurvePublicKey | None = None) -> bytes:
        """The signed evidence (an EAT, docs/evidence.md) for `nonce`: what a device that booted
        `firmware` measures (secure boot on, debug disabled since boot, first boot). `nonce` is
        a server nonce (GET /attest/nonce) or the session nonce: the exporter value of the DTLS
        session the evidence will be sent in (`session_evidence`).

        `bound_key`: the public key of the CSR the evidence will ride in (the new operational
        key), stated in the confirmation claim `cnf` (8, RFC 8747): the evidence is then good for
        that CSR only. Required for evidence in a CSR; evidence for POST /attest/evidence needs none."""
        cnf = {} if bound_key is None else {"cnf_key": cose_key_xy(bound_key)}
        claims = Evidence(nonce=nonce, ueid=self.ueid, oemid=self.oemid, hwmodel=self.device_type.encode(),
                          swname=firmware.name, swversion=firmware.version, fw_alg=firmware.alg,
                          fw_digest=firmware.digest, secure_boot=secure_boot, dbgstat=dbgstat, bootcount=bootcount,
                          iat=int(time.time()) if iat is None else iat, swversion_scheme=1, **cnf)
        return sign_evidence(claims, self.factory_key)

    def session_evidence(self, exporter: bytes | None, firmware: Firmware, **claims) -> bytes:
        """Evidence bound to one DTLS session: its nonce is the session's exporter value
        (`ClientEngine.exporter`; docs/evidence.md#session-nonces), valid in that session only.
        EnrollFailed when the session has none (no extended master secret): ask for a server
        nonce instead."""
        if exporter is None:
            raise EnrollFailed("evidence", "the DTLS session has no exporter value (no extended master secret); "
                                           "use a server nonce")
        return self.evidence(exporter, firmware, **claims)
