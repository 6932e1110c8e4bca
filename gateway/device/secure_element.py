"""The device side of a secure-element bundle (`devid provision --secure-element`): its keys stay
in a PKCS#11 token, so the DTLS handshake is made by a client that signs with the token
(libcoap's coap-client-gnutls through p11-kit), and devid makes, with the token's keys, what
that client cannot: the attestation evidence, the operational key and its CSR, and the storing
of the issued certificate (`devid se`, docs/enrollment.md, "A device with its keys in a secure
element (PKCS#11)"). No network I/O.

Objects in the token, beside the factory key and certificate (label SERIAL) and the root CA
certificate (label devid-root-ca) that provisioning stored:

    SERIAL-op       the current operational key pair and its certificate (one CKA_ID)
    SERIAL-op-new   a new operational key whose certificate is not stored yet (a CSR was made)

Storing a certificate for SERIAL-op-new: the certificate object (same id), then op-chain.pem and
op-cert.pem in the bundle (each written atomically, op-cert.pem last: it is what decides), then
the old SERIAL-op objects are destroyed and the new ones relabelled SERIAL-op (the private key
last, each time: it is what the others are found by). Each step is safe to interrupt: until
op-cert.pem is written the old identity is complete (run `devid se store` again with the same
answer); after that, `settle` (run by every `devid se` command) finishes the swap, whichever
object it stopped at. A second CSR while one is pending reuses the pending key.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.gateway.device.flow import read_nonce
from devid.gateway.device.identity import (DeviceIdentity, Firmware, device_csr, load_bundle,
                                           root_verifier, serial_of, token_section)
from devid.gateway.device.protocol import CT_CBOR, Answer, EnrollFailed
from devid.gateway.errors import BundleError, TokenError
from devid.gateway.pkcs11 import objects
from devid.gateway.pkcs11.token import Token, TokenKey
from devid.gateway.pkcs11.uri import TokenURI, parse
from devid.gateway.system.fs import write_atomic

OP, PENDING = "-op", "-op-new"


def read_nonce_file(path: Path) -> bytes:
    """The nonce of a GET /attest/nonce answer saved to a file (coap-client -o): a CBOR map."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None
    try:
        return read_nonce(Answer(0x45, CT_CBOR, data))
    except EnrollFailed as exc:
        raise BundleError(f"{path}: not a GET /attest/nonce answer ({exc.reason})") from None


def read_certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates of a /sen or /sren answer as saved: PKCS#7 certs-only (281, DER or PEM), a
    DER certificate (287), or PEM certificates."""
    for load in (pkcs7.load_der_pkcs7_certificates, pkcs7.load_pem_pkcs7_certificates,
                 lambda d: [x509.load_der_x509_certificate(d)], x509.load_pem_x509_certificates):
        try:
            certs = load(data)
        except ValueError:
            continue
        if certs:
            return certs
    raise BundleError("not a certificate: give the /sen or /sren answer (PKCS#7 certs-only 281, a DER certificate "
                      "287, or PEM)")


@dataclass
class SecureDevice:
    """A secure-element bundle and its token."""

    directory: Path
    uri: TokenURI
    section: dict
    factory: x509.Certificate
    root: x509.Certificate

    @classmethod
    def open(cls, directory: Path, token: str | None = None) -> "SecureDevice":
        """The bundle in `directory`; `token`: a URI for the same token (its pin-source, another
        module path) instead of the one recorded. BundleError for a bundle without a token."""
        directory = Path(directory)
        section = token_section(directory)
        if section is None:
            if not (directory / "cert.pem").exists():
                raise BundleError(f"{directory}: not a device bundle (no cert.pem)")
            raise BundleError(f"{directory}: not a secure-element bundle (it has key.pem, or its "
                              "secure-element-config.json has no pkcs11 section): use 'devid enroll'")
        uri = parse(token or str(section.get("token", "")))
        recorded = parse(str(section.get("token", "")))
        if (uri.token, uri.serial) != (recorded.token, recorded.serial):
            raise BundleError(f"--token names {uri.token_label}, the bundle's keys are in {recorded.token_label}")
        try:
            factory = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
            root = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{directory}: unreadable certificate ({exc})") from None
        device = cls(directory, uri.token_only(), section, factory, root)
        device.settle()
        return device

    @property
    def serial(self) -> str:
        return serial_of(self.factory)

    @property
    def token(self) -> Token:
        return Token.of(self.uri)

    def factory_key(self) -> TokenKey:
        _, _, key, _ = load_bundle(self.directory, token_keys=True, token=str(self.uri))
        return key

    def identity(self) -> DeviceIdentity:
        return DeviceIdentity.of(self.factory, self.factory_key())

    # -- evidence and CSRs ------------------------------------------------------------------------

    def evidence(self, nonce: bytes, firmware: Firmware, **claims) -> bytes:
        """Evidence for `nonce` (POST /attest/evidence), signed by the factory key in the token."""
        return self.identity().evidence(nonce, firmware, iat=int(time.time()), **claims)

    def _key(self, kid: bytes, label: str | None = None) -> TokenKey:
        """The key pair with CKA_ID `kid` (ids are unique: SERIAL-op-<random>); found by id alone,
        so a pair whose halves a relabel left with different labels is still found."""
        return TokenKey.open(self.uri.with_object(id=kid, type="private"))

    def _matches(self, kid: bytes, cert: x509.Certificate) -> bool:
        try:
            return self._key(kid).public_key() == cert.public_key()
        except TokenError:              # half of a pair a destroy left behind: not the one
            return False

    def pending_key(self) -> TokenKey:
        """The operational key waiting for its certificate (SERIAL-op-new), made in the token if
        there is none: sensitive, never extractable."""
        label = self.serial + PENDING
        ids = objects.ids_labelled(self.token, label)
        if ids:
            return self._key(ids[0], label)
        kid = f"{self.serial}-op-{secrets.token_hex(4)}".encode()
        public = self.token.generate_ec_key(ec.SECP256R1(), label, kid)
        return TokenKey(self.token, kid, label, public)

    def operational_csr(self, nonce: bytes | None = None, firmware: Firmware | None = None,
                        **claims) -> tuple[bytes, TokenKey]:
        """(a CSR for /sen or /sren, the operational key in the token it is for). With a nonce and
        firmware, evidence for that nonce bound to the new key rides in the CSR (one /sen)."""
        key = self.pending_key()
        evidence = None
        if nonce is not None and firmware is not None:
            evidence = self.identity().evidence(nonce, firmware, iat=int(time.time()),
                                                bound_key=key.public_key(), **claims)
        return device_csr(key, self.serial, evidence), key

    # -- the issued certificate ------------------------------------------------------------------

    def store(self, answer: bytes) -> x509.Certificate:
        """Store the certificate of a /sen or /sren answer: in the token beside its key, and as
        op-cert.pem and op-chain.pem in the bundle; then the previous operational key goes."""
        certs = read_certificates(answer)
        candidates = [(kid, self.serial + PENDING) for kid in objects.ids_labelled(self.token, self.serial + PENDING)]
        candidates += [(kid, self.serial + OP) for kid in objects.ids_labelled(self.token, self.serial + OP)]
        for kid, label in candidates:
            key = self._key(kid, label)
            leaf = next((c for c in certs if c.public_key() == key.public_key()), None)
            if leaf is not None:
                break
        else:
            raise BundleError(f"the answer holds no certificate for an operational key of {self.serial} in the "
                              f"{self.uri.token_label} (make one with 'devid se csr')")
        if serial_of(leaf) != self.serial:
            raise BundleError(f"the certificate was issued for {serial_of(leaf)!r}, not {self.serial}")
        chain = [c for c in certs if c is not leaf and c.subject == leaf.issuer and c.subject != c.issuer]
        try:
            root_verifier(self.root)(leaf, chain)
        except Exception as exc:
            raise BundleError(f"the certificate does not validate to the bundle's root ({exc}): give the whole "
                              "answer in format 281 (the certificate and the operational CA)") from None
        self.token.store_certificate(leaf.public_bytes(serialization.Encoding.DER), label, kid,
                                     subject=leaf.subject.public_bytes())
        pem = [c.public_bytes(serialization.Encoding.PEM) for c in (leaf, *chain)]
        write_atomic(self.directory / "op-chain.pem", b"".join(pem))
        write_atomic(self.directory / "op-cert.pem", pem[0])
        self.settle()
        return leaf

    def settle(self) -> bool:
        """Finish a swap of operational keys that was interrupted after op-cert.pem was written:
        every object of the key of op-cert.pem (found by its private key, labelled SERIAL-op-new
        or already SERIAL-op) is labelled SERIAL-op, and every other object labelled SERIAL-op,
        of any class, goes. True if it changed anything."""
        try:
            current = x509.load_pem_x509_certificate((self.directory / "op-cert.pem").read_bytes())
        except (OSError, ValueError):
            return False
        op, pending = self.serial + OP, self.serial + PENDING
        kid = next((k for label in (pending, op) for k in objects.ids_labelled(self.token, label)
                    if self._matches(k, current)), None)
        if kid is None:
            return False
        changed = False
        for cls in objects.ALL_CLASSES:
            for old in objects.ids_labelled(self.token, op, cls):
                if old != kid:
                    objects.destroy(self.token, old)
                    changed = True
        if any(kid in objects.ids_labelled(self.token, pending, cls) for cls in objects.ALL_CLASSES):
            objects.relabel(self.token, kid, op)
            changed = True
        return changed

    # -- what a libcoap client is given ------------------------------------------------------------

    def uris(self) -> dict[str, str]:
        """PKCS#11 URIs of the objects for coap-client-gnutls (-c, -j, -R), as p11-kit finds them
        (the token's registered module: no module-path)."""
        base = TokenURI(token=self.uri.token, serial=self.uri.serial)
        ca = self.section.get("objects", {}).get("ca_certificate", {}).get("label", "devid-root-ca")
        s = self.serial
        return {"factory_certificate": str(base.with_object(label=s, type="cert")),
                "factory_key": str(base.with_object(label=s, type="private")),
                "operational_certificate": str(base.with_object(label=s + OP, type="cert")),
                "operational_key": str(base.with_object(label=s + OP, type="private")),
                "ca_certificate": str(base.with_object(label=ca, type="cert"))}

    def status(self) -> dict:
        """What the token holds for this device, as the token says it (no secret)."""
        factory = self.factory_key()
        attrs = self.token.key_attributes(factory.id)
        ca_entry = self.section.get("objects", {}).get("ca_certificate", {})
        ca_id = bytes.fromhex(ca_entry.get("id", "")) if isinstance(ca_entry.get("id"), str) else b""
        ca_der = self.token.certificate(ca_id, ca_entry.get("label")) if ca_id else None
        op = objects.ids_labelled(self.token, self.serial + OP, "CERTIFICATE")
        return {"serial": self.serial, "token": str(self.uri), "factory_key": attrs,
                "factory_certificate_stored": self.token.certificate(factory.id, factory.label) ==
                self.factory.public_bytes(serialization.Encoding.DER),
                "ca_certificate_stored": ca_der == self.root.public_bytes(serialization.Encoding.DER),
                "ca_certificate_trusted": bool(ca_id) and objects.is_trusted(self.token, ca_id, ca_entry.get("label")),
                "operational_certificate": bool(op),
                "pending_operational_key": bool(objects.ids_labelled(self.token, self.serial + PENDING)),
                "uris": self.uris()}

