"""Path validation of device certificates, then the registry's word on revocation.

Chain building and RFC 5280 checks are `cryptography.x509.verification`'s; this module adds what
it leaves to us: the certificate must be one we issued (known to the registry), neither it nor
its device may be revoked, and the device identity it carries must be well formed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from .authority import to_utc
from .errors import DeviceRevoked, InvalidSerial, ValidationFailed
from .identity import DeviceIdentity, IdentitySettings, read_device_identity
from .store import CertStatus, DeviceState, Registry


class DeviceVerifier:
    """Validates device certificates against one trust anchor (the manufacturing CA for factory
    identities, the operational CA for operational ones)."""

    def __init__(self, anchor: x509.Certificate, profile: str, settings: IdentitySettings,
                 store: Registry, max_chain_depth: int = 2) -> None:
        self.anchor = anchor
        self.profile = profile
        self.settings = settings
        self.store = store
        self._store = Store([anchor])
        self._depth = max_chain_depth

    def verify(self, leaf: x509.Certificate, intermediates: Sequence[x509.Certificate] = (),
               *, now: datetime) -> DeviceIdentity:
        verifier = (PolicyBuilder().store(self._store).time(to_utc(now))
                    .max_chain_depth(self._depth).build_client_verifier())
        try:
            verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            raise ValidationFailed(f"certificate path does not validate: {exc}") from None
        try:
            identity = read_device_identity(leaf, self.settings)
        except InvalidSerial as exc:
            raise ValidationFailed(str(exc)) from None
        self.check_registry(identity)
        return identity

    def check_registry(self, identity: DeviceIdentity) -> None:
        """Revocation: by our registry, not by a CRL the peer may have fetched long ago."""
        record = self.store.get_certificate(identity.certificate_serial)
        if record is None or record.fingerprint != identity.fingerprint:
            raise ValidationFailed("certificate unknown to the registry")
        if record.profile != self.profile or record.device_serial != identity.serial:
            raise ValidationFailed(f"certificate is not a {self.profile} certificate of device {identity.serial}")
        if record.status is CertStatus.REVOKED:
            raise DeviceRevoked(f"certificate of device {identity.serial} is revoked")
        device = self.store.get_device(identity.serial)
        if device is None:
            raise ValidationFailed(f"device {identity.serial} unknown to the registry")
        if device.state is DeviceState.REVOKED:
            raise DeviceRevoked(f"device {identity.serial} is revoked")
