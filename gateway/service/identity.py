"""Who is at the other end of a DTLS session: the gateway's authenticator for device certificates.

A device authenticates with its factory identity (chain to the manufacturing CA) or its
operational identity (chain to the operational CA). OpenSSL has verified the chain (signatures,
validity, EKU clientAuth and key usage, depth) and, in the handshake, the device's possession of
the key. Then the registry match: the certificate must be, byte for byte, one devid issued and
recorded with its anchor's profile, and it and its device must still be good (one read, by the
certificate's serial, the table's primary key). That is stricter than a second path validation
and cheaper; `cryptography.x509.verification` (ca.validation.DeviceVerifier) runs only for a
certificate no registry row holds, to name why it is refused (docs/gateway.md#who-may-connect
lists each check and where it happens).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import psk as ca_psk
from devid.ca.errors import DeviceRevoked, ValidationFailed
from devid.ca.identity import IdentitySettings
from devid.ca.store import CertStatus, DeviceState, Registry
from devid.ca.authority import to_utc
from devid.ca.validation import DeviceVerifier

from devid.gateway.dtls.alerts import CertificateRefused
from devid.gateway.dtls.psk import PskRefused

SUPERSEDED_SESSION_GRACE = timedelta(seconds=247)

FACTORY = "factory"
OPERATIONAL = "operational"
FACTORY_PSK = ca_psk.FACTORY_PSK            # the same devices, authenticated by a pre-shared key
OPERATIONAL_PSK = ca_psk.OPERATIONAL_PSK
SECRET_RETRY = 5.0          # s between looks for a PSK secret that is not there yet
SECRET_BACKOFF_MAX = 300.0  # s: the longest wait after a secret that is there but cannot be used


@dataclass(frozen=True)
class PeerIdentity:
    """What `request.remote.authenticated_claims` yields for a device."""

    serial: str
    device_type: str
    kind: str                 # "factory" (IDevID) or "operational" (LDevID); "factory-psk" or
                              # "operational-psk" for a PSK session (then the certificate fields
                              # are those of the device's certificate the key goes with)
    fingerprint: str          # SHA-256 of the certificate, hex
    certificate_serial: int
    public_key: ec.EllipticCurvePublicKey

    def as_dict(self) -> dict:
        return {"serial": self.serial, "device_type": self.device_type, "kind": self.kind,
                "fingerprint": self.fingerprint, "certificate_serial": format(self.certificate_serial, "x")}


class DeviceAuthenticator:
    """`engine.Authenticator` for devices: picks the anchor by the leaf's issuer."""

    def __init__(self, manufacturing: x509.Certificate, operational: x509.Certificate,
                 settings: IdentitySettings, registry: Registry, clock: Callable[[], datetime],
                 superseded_grace: timedelta = timedelta(0)) -> None:
        self.clock = clock
        self.registry = registry
        # live sessions of a superseded certificate end this long after the supersession: the CoAP
        # exchange lifetime, so a device whose /sren answer was lost still gets it from the
        # deduplication cache (RFC 7252 EXCHANGE_LIFETIME, 247 s), or the grace period if longer
        self.session_grace = max(superseded_grace, SUPERSEDED_SESSION_GRACE)
        # a superseded operational certificate is refused at the handshake once its grace is over
        # (docs/certificates.md#lifecycle); factory certificates are never superseded
        self._verifiers = {
            manufacturing.subject: (FACTORY, DeviceVerifier(manufacturing, FACTORY, settings, registry)),
            operational.subject: (OPERATIONAL, DeviceVerifier(operational, OPERATIONAL, settings, registry,
                                                             superseded_grace=superseded_grace)),
        }

    def authenticate(self, leaf: x509.Certificate, intermediates: list[x509.Certificate]) -> PeerIdentity:
        """The peer's identity, or `CertificateRefused` with the alert that tells the device why
        (certificate_revoked, certificate_expired, unknown_ca, bad_certificate). A registry that
        fails raises on: the engine answers internal_error."""
        try:
            kind, verifier = self._verifiers[leaf.issuer]
        except KeyError:
            raise CertificateRefused("certificate not issued by the manufacturing or the operational CA",
                                     "unknown_ca") from None
        now = to_utc(self.clock())
        if now > leaf.not_valid_after_utc:
            raise CertificateRefused(f"certificate path does not validate: the certificate expired on "
                                     f"{leaf.not_valid_after_utc:%Y-%m-%d}", "certificate_expired")
        if now < leaf.not_valid_before_utc:         # as OpenSSL answers it (X509_V_ERR_CERT_NOT_YET_VALID)
            raise CertificateRefused(f"certificate path does not validate: the certificate is not valid before "
                                     f"{leaf.not_valid_before_utc:%Y-%m-%d}", "bad_certificate")
        try:
            ident = verifier.match(leaf, now=now)
            if ident is None:
                # no certificate devid recorded: path validation says what is wrong with it, and
                # one that passes is refused all the same (unknown to the registry). A factory CA
                # of another manufacturer, if one is ever trusted, would be validated here.
                ident = verifier.verify(leaf, intermediates, now=now)
        except DeviceRevoked as exc:
            raise CertificateRefused(str(exc), "certificate_revoked") from None
        except ValidationFailed as exc:
            raise CertificateRefused(str(exc), "bad_certificate") from None
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise CertificateRefused("device key is not an EC key", "bad_certificate")
        return PeerIdentity(ident.serial, ident.device_type, kind, ident.fingerprint, ident.certificate_serial, key)

    def revoked(self, identities: list[PeerIdentity]) -> list[PeerIdentity]:
        """The identities of live sessions whose certificate or device is now revoked: one query
        for all."""
        if not identities:
            return []
        gone = self.registry.revoked_among([i.certificate_serial for i in identities])
        return [i for i in identities if i.certificate_serial in gone]

    def ended(self, identities: list[PeerIdentity]) -> list[tuple[PeerIdentity, str]]:
        """The live sessions' identities that may no longer be served, with why: revoked (or its
        device), or superseded for longer than `session_grace`. A superseded certificate's session
        is refused /sren and /config meanwhile; ending it stops it from spending its device's
        request budgets (which a stolen, superseded key could otherwise keep empty)."""
        out = [(i, "certificate or device revoked") for i in self.revoked(identities)]
        done = {id(i) for i, _ in out}
        rest = [i for i in identities if id(i) not in done and i.kind in (OPERATIONAL, OPERATIONAL_PSK)]
        if rest:
            old = self.registry.superseded_among([i.certificate_serial for i in rest],
                                                 self.clock() - self.session_grace)
            out.extend((i, "certificate superseded") for i in rest if i.certificate_serial in old)
        return out


class PskDeviceAuthenticator:
    """`server.PskAuthenticator` for devices (ca/psk.py has the identities and keys).

    A factory PSK identity (the serial) stands for the device's current factory certificate, an
    operational one (``op:`` + serial) for its current operational certificate: the session's
    `PeerIdentity` carries that certificate's serial, fingerprint and public key (the device's
    attestation key), so authorization, budgets, enrollment and the revocation sweep treat the
    PSK session as they treat that certificate's. Refused: an identity devid does not issue, a
    device unknown or revoked, no such certificate (an operational key before enrollment or
    after its certificate was superseded or revoked: each renewal rotates the key)."""

    def __init__(self, registry: Registry, secret: Callable[[], bytes | None],
                 monotonic: Callable[[], float] | None = None,
                 clock: Callable[[], datetime] | None = None,
                 issuers: dict[str, list[x509.Certificate]] | None = None) -> None:
        self.registry = registry
        # the chain above each profile, its issuing CA first (FACTORY: the manufacturing CA and
        # the root, OPERATIONAL: the operational CA and the root): a certificate a PSK stands for
        # must come from that CA, and each of them be within its validity, as the chain of a
        # certificate in a handshake must
        self.issuers = issuers or {}
        # the certificate a PSK stands for must be within its validity, as DeviceAuthenticator
        # requires of a certificate presented in the handshake
        self.clock = clock or (lambda: datetime.now().astimezone())
        self._load = secret
        self._secret: bytes | None = None
        self._monotonic = monotonic or time.monotonic
        self._next_look = 0.0
        self._looking = False
        self._backoff = SECRET_RETRY

    def load_now(self) -> bytes | None:
        """Read the PSK secret now, if there is one (at start, before any handshake: scrypt
        takes ~0.5 s)."""
        if self._secret is None:
            self._next_look = self._monotonic() + SECRET_RETRY
            self._take(self._look_once())
        return self._secret

    def secret(self) -> bytes | None:
        """The PSK secret once it is read. One that appears later (`devid provision --psk` makes
        it while the gateway runs) is never read inside a handshake callback, on the event loop:
        a look runs in a thread of its own, at most every SECRET_RETRY seconds, and until it has
        found the secret PSK identities are refused."""
        if self._secret is None and not self._looking and self._monotonic() >= self._next_look:
            self._next_look = self._monotonic() + SECRET_RETRY
            self._looking = True
            threading.Thread(target=self._look, name="devid-psk-secret", daemon=True).start()
        return self._secret

    def _look_once(self) -> "bytes | None | Exception":
        try:
            return self._load()
        except Exception as exc:        # the loader says why (app/server.py)
            return exc

    def _take(self, found: "bytes | None | Exception") -> None:
        """A secret that is there but fails (another host's, a wrong passphrase) is looked at
        again after twice as long each time, up to SECRET_BACKOFF_MAX: each look costs an scrypt
        (~0.5 s of CPU); one that is not there yet, every SECRET_RETRY seconds (a stat)."""
        if isinstance(found, Exception):
            self._next_look = self._monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, SECRET_BACKOFF_MAX)
            return
        self._backoff = SECRET_RETRY
        if found is not None:
            self._secret = found

    def _look(self) -> None:
        try:
            self._take(self._look_once())
        finally:
            self._looking = False

    def psk_for(self, identity: bytes) -> tuple[bytes, PeerIdentity]:
        parsed = ca_psk.parse_identity(identity)
        if parsed is None:
            raise PskRefused("not a devid PSK identity")
        kind, serial = parsed
        secret = self.secret()
        if secret is None:
            raise PskRefused("no PSK secret (none made yet by 'devid provision --psk', or this host's is missing or "
                             "unusable: see the log)")
        profile = FACTORY if kind == FACTORY_PSK else OPERATIONAL
        mine = [c for c in self.registry.certificates_for_device(serial) if c.profile == profile]
        if not mine:
            raise PskRefused(f"device {serial} unknown" if profile == FACTORY else
                             f"device {serial} has no operational certificate (not enrolled)")
        record = mine[-1]           # the newest: the current one, unless revoked
        found = self.registry.lookup_certificate(record.serial)
        if (found is None or found.device_state in (None, DeviceState.REVOKED)
                or found.status is CertStatus.REVOKED):
            raise PskRefused(f"device {serial} or its {profile} certificate revoked")
        if found.status is not CertStatus.CURRENT:
            raise PskRefused(f"certificate {record.serial:x} is {found.status.value}")
        if not found.device_psk:
            raise PskRefused(f"device {serial} was not provisioned with a PSK")
        cert = x509.load_der_x509_certificate(found.der)
        now = to_utc(self.clock())
        if now > cert.not_valid_after_utc:
            raise PskRefused(f"the {profile} certificate {record.serial:x} of device {serial} expired on "
                             f"{cert.not_valid_after_utc:%Y-%m-%d}")
        if now < cert.not_valid_before_utc:
            raise PskRefused(f"the {profile} certificate {record.serial:x} of device {serial} is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d}")
        chain = self.issuers.get(profile)
        if chain:
            if cert.issuer != chain[0].subject:
                raise PskRefused(f"the {profile} certificate {record.serial:x} of device {serial} is not of this "
                                 "gateway's CA")
            for ca_cert in chain:
                if not ca_cert.not_valid_before_utc <= now <= ca_cert.not_valid_after_utc:
                    raise PskRefused(f"a CA certificate above the {profile} certificate of device {serial} is "
                                     f"outside its validity ({ca_cert.not_valid_before_utc:%Y-%m-%d} to "
                                     f"{ca_cert.not_valid_after_utc:%Y-%m-%d})")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise PskRefused("device key is not an EC key")
        name = identity.decode("ascii")
        psk = ca_psk.derive_key(secret, name, record.serial if kind == OPERATIONAL_PSK else None)
        return psk, PeerIdentity(serial, found.device_type, kind, found.fingerprint, record.serial, key)


def operational_psk(registry: Registry, secret: bytes, serial: str
                    ) -> tuple[str, bytes, int, x509.Certificate] | None:
    """(identity, key, certificate serial, certificate) of the device's current operational
    PSK: the one that goes with its current operational certificate (the key is sealed to that
    certificate's key for delivery, ca/sealed.py); None before its first enrollment."""
    current = [c for c in registry.certificates_for_device(serial)
               if c.profile == OPERATIONAL and c.status is CertStatus.CURRENT]
    found = registry.lookup_certificate(current[-1].serial) if current else None
    if found is None:
        return None
    cert = x509.load_der_x509_certificate(found.der)
    if not isinstance(cert.public_key(), ec.EllipticCurvePublicKey):
        return None
    name = ca_psk.operational_identity(serial)
    return name, ca_psk.derive_key(secret, name, current[-1].serial), current[-1].serial, cert


def attestation_identity(registry: Registry, who: PeerIdentity) -> PeerIdentity | None:
    """Who signs the evidence of `who`'s device: `who` itself, except for an operational-psk
    session, whose evidence is signed with the device's attestation key (its factory
    certificate's key, not the operational key the PSK's certificate carries): then the identity
    of the device's newest factory certificate, None if it has none that is current.

    Its validity period is not checked, on purpose (docs/enrollment.md#rotation-renewal-and-revocation):
    the factory key stays the device's attestation key for as long as its certificate is current
    (not revoked), and a factory certificate that expires in service must not strand a device
    that renews with its operational PSK, as it does not strand an X.509 device, which renews with
    its operational certificate and never shows the factory one again."""
    if who.kind != OPERATIONAL_PSK:
        return who
    mine = [c for c in registry.certificates_for_device(who.serial) if c.profile == FACTORY]
    found = registry.lookup_certificate(mine[-1].serial) if mine else None
    if found is None or found.status is not CertStatus.CURRENT:
        return None
    key = x509.load_der_x509_certificate(found.der).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return PeerIdentity(who.serial, who.device_type, who.kind, found.fingerprint, mine[-1].serial, key)


PSK_KINDS = (FACTORY_PSK, OPERATIONAL_PSK)
