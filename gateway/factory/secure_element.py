"""Provisioning into a secure element: `devid provision --secure-element URI` (docs/certificates.md,
"Factory bundles"). SoftHSM2, or any PKCS#11 token, stands in for the element: one token, one
key object per device, labelled by its serial.

Per device, in the token (the seed's ATECC608A slots, recorded in secure-element-config.json):

    slot 0   the device's private key: generated in the token (sensitive, never extractable,
             sign-only; read back from the token after generation), label SERIAL, CKA_ID
             SERIAL (ASCII) + "-" + 6 random bytes (so no key of another run or another
             deployment in the same token ever shares its id)
    slot 10  its factory certificate (IDevID): a certificate object, label SERIAL, the key's id
    slot 11  the root CA certificate, to authenticate the gateway: one object per token, label
             `devid-root-ca`, written once per run; marked trusted (CKA_TRUSTED) when the
             security officer's PIN is given ($DEVID_PKCS11_SO_PIN): libcoap's GnuTLS client
             takes only a trusted certificate object as its trust anchor

The certificate is issued from a CSR the token signs (proof of possession: the CSR's signature is
checked before the public key is taken). The bundle holds no key.pem.

Crash safety: the bundle's partial directory is made first, with a `.token` marker naming the
token and the key's CKA_ID (fsynced, with the directory's name in OUT), and only then is the key
generated; the device is registered after its key and its certificate object exist. So a
registered device always has its key object, and a key object of an unregistered serial always
has a partial directory naming its id: the next run removes exactly those objects. A partial
directory of another token refuses the run until it is given that token (it will not leave
stray keys). A run whose serials are already labels of private keys in the token (another
deployment's devices, the same prefix) is refused before it makes anything.

Workers: each worker process opens its own session (Token does, after fork), and the token
operations of all the run's processes take turns (`lock`, shared across the fork): SoftHSM2's
file store is not safe for one process writing while another opens a session or reads (measured
here: C_OpenSession/C_Login failing with CKR_GENERAL_ERROR, or the token not listed at all, with
two workers). The CA's signatures and the bundle files stay parallel.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devid.ca.authority import load_csr
from devid.gateway.errors import ProvisioningError
from devid.gateway.pkcs11 import objects
from devid.gateway.pkcs11.token import Token, TokenKey
from devid.gateway.pkcs11.uri import TokenURI, parse

MARKER = ".token"                   # in a partial directory: the token its key may be in
CA_LABEL = "devid-root-ca"
CA_ID = b"devid-root-ca"
KEY_SLOT, CERT_SLOT, CA_SLOT = 0, 10, 11
LOCK_WAIT = 120


def new_key_id(serial: str) -> bytes:
    """The CKA_ID of a device's key pair and certificate: its serial, ASCII, '-' and 6 random bytes."""
    return serial.encode() + b"-" + os.urandom(6)


def marker_text(recorded: str, kid: bytes) -> bytes:
    """The `.token` marker of a partial directory: the token's URI, then the key's CKA_ID (hex)."""
    return f"{recorded}\n{kid.hex()}\n".encode()


def recorded_uri(uri: TokenURI) -> str:
    """The token's URI as a bundle records it: the token and module, no object, and no
    pin-source (a path on the provisioning host; the device side names its own PIN)."""
    return str(replace(uri.token_only(), pin_source=None))


def same_token(a: TokenURI, b: TokenURI) -> bool:
    return (a.module, a.token, a.serial, a.slot_id) == (b.module, b.token, b.serial, b.slot_id)


@dataclass(frozen=True)
class SecureElement:
    """The token a provisioning run generates keys in; `so_pin` marks the CA certificate trusted."""

    uri: TokenURI
    so_pin: str | None = field(default=None, repr=False)
    trusted: bool = False                   # what the token says of its CA certificate object (prepare)
    lock: object = field(default=None, compare=False, repr=False)    # a multiprocessing lock, or None

    @contextmanager
    def turn(self):
        """Hold the run's token lock (if any) for one token operation."""
        if self.lock is None:
            yield
            return
        if not self.lock.acquire(timeout=LOCK_WAIT):
            raise ProvisioningError(f"{self.uri.token_label}: another provisioning process held the token for "
                                    f"{LOCK_WAIT} s (a worker that died?)")
        try:
            yield
        finally:
            self.lock.release()

    @classmethod
    def of(cls, text: str, so_pin: str | None = None) -> "SecureElement":
        uri = parse(text)
        if uri.object is not None or uri.id is not None or uri.type is not None:
            raise ProvisioningError("--secure-element names a token, not an object: leave out object=, id= "
                                    "and type= (each device's key is labelled by its serial)")
        if uri.module_path and not os.path.isabs(uri.module_path):      # the bundles outlive this directory
            uri = replace(uri, module_path=os.path.abspath(uri.module_path))
        return cls(uri.token_only(), so_pin or None)

    @property
    def token(self) -> Token:
        return Token.of(self.uri)

    @property
    def recorded(self) -> str:
        return recorded_uri(self.uri)

    def check_free(self, serials: list[str]) -> None:
        """Refuse serials that already label private keys in the token (another deployment's
        devices with the same prefix): their URIs (object=SERIAL) would name two keys."""
        taken = sorted(set(serials) & objects.labels(self.token, "PRIVATE_KEY"))
        if taken:
            raise ProvisioningError(f"the PKCS#11 {self.uri.token_label} already holds private keys labelled "
                                    f"{', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}: another "
                                    "deployment's devices? use another --serial-prefix or another token")

    def prepare(self, root: x509.Certificate) -> "SecureElement":
        """Before the run: the root CA certificate object (slot 11), trusted with the SO PIN. An
        object already there with the same certificate is kept as it is (a run without the SO
        PIN never takes the trust a run with it gave); another CA's certificate under that label
        is refused. Returns self with `trusted` as the token reports it."""
        der = root.public_bytes(serialization.Encoding.DER)
        held = self.token.certificate(CA_ID, CA_LABEL)
        if held is not None and held != der:
            raise ProvisioningError(f"the PKCS#11 {self.uri.token_label} holds another CA's root certificate "
                                    f"labelled {CA_LABEL}: use a token of this deployment")
        trusted = held is not None and objects.is_trusted(self.token, CA_ID, CA_LABEL)
        if held is None or (self.so_pin is not None and not trusted):
            self.token.store_certificate(der, CA_LABEL, CA_ID, subject=root.subject.public_bytes(),
                                         trusted=self.so_pin is not None, so_pin=self.so_pin)
            trusted = objects.is_trusted(self.token, CA_ID, CA_LABEL)
        return replace(self, trusted=trusted)

    def new_key(self, serial: str, kid: bytes) -> tuple[TokenKey, ec.EllipticCurvePublicKey]:
        """A new P-256 key in the token for `serial`, and its public key as the CSR the token signed
        states it (checked: proof of possession). No object with this id can exist already: the
        serial was reserved by this run, and the recovery of a crashed run removes the objects of
        the serials it did not register (a search for them here would cost as much as the
        generation: SoftHSM2's searches go through every object of the token)."""
        token = self.token
        with self.turn():
            public = token.generate_ec_key(ec.SECP256R1(), serial, kid)
            attrs = token.key_attributes(kid)
            if not (attrs["sensitive"] and attrs["never_extractable"] and not attrs["extractable"]):
                raise ProvisioningError(f"the PKCS#11 {self.uri.token_label} made {serial}'s key extractable "
                                        f"({attrs}): refusing to use it")
            key = TokenKey(token, kid, serial, public)
            csr = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device-{serial}")]))
                   .sign(key, hashes.SHA256()))
        checked = load_csr(csr.public_bytes(serialization.Encoding.DER)).public_key()
        if checked != public:
            raise ProvisioningError(f"{self.uri.token_label}: the CSR of {serial}'s key does not carry its key")
        return key, checked

    def store_certificate(self, serial: str, kid: bytes, cert: x509.Certificate) -> None:
        """The device's factory certificate (slot 10), beside its key."""
        with self.turn():
            self.token.store_certificate(cert.public_bytes(serialization.Encoding.DER), serial, kid,
                                         subject=cert.subject.public_bytes(), replace=False)

    def forget(self, kid: bytes) -> None:
        """Remove the key pair and certificate with CKA_ID `kid` (an unregistered device's)."""
        with self.turn():
            objects.destroy(self.token, kid)

    def forget_unnamed(self) -> int:
        """Remove key objects with neither a label nor an id: what a run killed inside the token's
        own key generation leaves (measured with SoftHSM2 2.6.1: its file store writes a new
        object's attributes one by one, so a kill -9 during C_GenerateKeyPair can leave a key
        object without the label and id of its template). Only after a crashed run of this token
        was found (recover_partials); how many went."""
        with self.turn():
            return objects.destroy_unnamed(self.token)

    def section(self, serial: str, kid_bytes: bytes) -> dict:
        """The `pkcs11` section of a device's secure-element-config.json."""
        kid = kid_bytes.hex()
        return {
            "token": self.recorded,
            "objects": {
                "device_private_key": {"slot": KEY_SLOT, "label": serial, "id": kid, "type": "private"},
                "device_certificate": {"slot": CERT_SLOT, "label": serial, "id": kid, "type": "cert"},
                "ca_certificate": {"slot": CA_SLOT, "label": CA_LABEL, "id": CA_ID.hex(), "type": "cert",
                                   "trusted": self.trusted},
            },
            "private_key": {"sensitive": True, "never_extractable": True, "generated_in_token": True},
            "configuration_locked": True,
        }


def config_json(plain: bytes, section: dict) -> bytes:
    """A device's secure-element-config.json (`plain`: the file without a token) with its `pkcs11` section."""
    doc = json.loads(plain)
    doc["pkcs11"] = section
    return (json.dumps(doc, indent=2) + "\n").encode()


def partial_token(entry: Path) -> tuple[TokenURI, bytes | None] | None:
    """(the token, the key's CKA_ID) a partial bundle directory's key may be in: from its
    secure-element-config.json, or from the marker written before the key was generated; None
    for a bundle without a token."""
    text = kid = None
    try:
        doc = json.loads((entry / "secure-element-config.json").read_text())
        section = doc.get("pkcs11", {}) if isinstance(doc, dict) else {}
        text = section.get("token")
        kid = section.get("objects", {}).get("device_private_key", {}).get("id")
    except (OSError, ValueError, AttributeError):
        text = None
    if text is None:
        try:
            lines = (entry / MARKER).read_text().split()
        except OSError:
            return None
        text, kid = (lines + [None, None])[:2]
    try:
        return parse(text), bytes.fromhex(kid) if kid else None
    except Exception:
        return None


def has_token_key(entry: Path) -> bool:
    """A bundle whose key is in a token (secure-element-config.json has a pkcs11 section)."""
    try:
        doc = json.loads((entry / "secure-element-config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and isinstance(doc.get("pkcs11"), dict)
