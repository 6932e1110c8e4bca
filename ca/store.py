"""The registry interface the CA needs, and the records it exchanges.

The CA never talks SQL: it calls these methods on whatever store it is given (the SQLite
registry in `gateway.registry` today; a PostgreSQL one can implement the same Protocol).
Every method is one transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Iterable, Protocol, Sequence


class DeviceState(str, enum.Enum):
    MANUFACTURED = "manufactured"
    ENROLLED = "enrolled"
    REVOKED = "revoked"


class CertStatus(str, enum.Enum):
    CURRENT = "current"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"


@dataclass(frozen=True)
class DeviceRecord:
    serial: str
    device_type: str
    state: DeviceState
    created_at: datetime
    updated_at: datetime
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    revocation_reason: str | None = None
    # provisioned with a factory PSK (`devid provision --psk`): only such a device may open PSK
    # sessions, with its factory PSK and later its operational one (docs/enrollment.md#psk-devices)
    psk: bool = False


@dataclass(frozen=True)
class CertificateRecord:
    serial: int                 # certificate serial number
    issuer: str                 # issuing CA name: root | manufacturing | operational
    profile: str                # factory | operational | ca | gateway
    device_serial: str | None   # None for CA and gateway certificates
    not_before: datetime
    not_after: datetime
    fingerprint: str            # SHA-256 of the DER, hex
    der: bytes
    issued_at: datetime
    status: CertStatus = CertStatus.CURRENT
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True)
class CertificateLookup:
    """The registry's current word on one certificate and its device: the hot-path view used on
    every DTLS handshake (one query, no timestamps)."""

    der: bytes
    profile: str
    status: CertStatus
    fingerprint: str
    device_serial: str | None
    device_type: str | None
    device_state: DeviceState | None
    # when a superseded certificate was superseded: the issue time of the next certificate of its
    # profile for its device (None unless status is superseded)
    superseded_at: datetime | None = None
    # its device was provisioned with a PSK (DeviceRecord.psk)
    device_psk: bool = False


class Registry(Protocol):
    """Storage of devices and issued certificates, one transaction per call."""

    def get_device(self, serial: str) -> DeviceRecord | None: ...

    def list_devices(self, state: DeviceState | None = None, limit: int | None = None) -> list[DeviceRecord]: ...

    def register_devices(self, pairs: Sequence[tuple[DeviceRecord, CertificateRecord]]) -> None:
        """Insert each device in state manufactured with its factory certificate, all or nothing.

        Raises DuplicateDevice if a device serial exists, SerialCollision if a certificate serial does.
        """

    def record_certificate(self, cert: CertificateRecord, *, supersede_profile: str | None = None,
                           new_state: DeviceState | None = None) -> None:
        """Store an issued certificate; in the same transaction mark the device's other current
        certificates of `supersede_profile` superseded and move the device to `new_state`.

        Raises SerialCollision if the certificate serial exists.
        """

    def record_for_device(self, device_serial: str, build: Callable[[DeviceRecord], CertificateRecord], *,
                          supersede_profile: str | None = None,
                          new_state: DeviceState | None = None) -> CertificateRecord:
        """Check and record in one write transaction: read the device (UnknownDevice if absent,
        DeviceRevoked if revoked), call `build(device)` for the certificate to store, then do what
        `record_certificate` does. Nothing is stored if any step fails.

        Raises SerialCollision if the certificate serial exists.
        """

    def get_certificate(self, serial: int) -> CertificateRecord | None: ...

    def lookup_certificate(self, serial: int) -> CertificateLookup | None:
        """The certificate with its device's type and state (and, if superseded, since when), in one read."""

    def certificates_issued_since(self, device_serial: str, profile: str, since: datetime) -> list[datetime]:
        """Issue times of the device's certificates of `profile` issued at or after `since`, oldest
        first. Inside a write transaction (an issuance), the count cannot change under the caller."""

    def certificates_matching(self, serial_prefix: str | None, fingerprint_prefix: str | None,
                              limit: int = 10) -> list[CertificateRecord]:
        """Certificates whose serial (lower-case hex, no leading zeros) starts with
        `serial_prefix` or whose SHA-256 fingerprint (lower-case hex) starts with
        `fingerprint_prefix`; at most `limit`."""

    def revoke_certificate(self, serial: int, reason: str, now: datetime) -> bool:
        """Mark one certificate revoked (its device is left as it is); False if it was revoked already."""

    def certificates_for_device(self, device_serial: str) -> list[CertificateRecord]: ...

    def revoke_device(self, serial: str, reason: str, now: datetime) -> list[CertificateRecord]:
        """Mark the device revoked and each of its current/superseded certificates revoked;
        returns the certificates newly revoked."""

    def revoked_certificates(self, issuer: str) -> Iterable[CertificateRecord]: ...

    def superseded_certificates(self, issuer: str, now: datetime) -> Iterable[tuple[CertificateRecord, datetime]]:
        """Superseded certificates of `issuer` not yet expired at `now`, with when each was superseded."""
        ...

    def revoked_among(self, serials: Sequence[int]) -> set[int]:
        """The certificate serials among `serials` that are revoked or whose device is."""

    def superseded_among(self, serials: Sequence[int], before: datetime) -> set[int]:
        """The certificate serials among `serials` superseded by a later issuance before `before`."""

    def next_crl_number(self, issuer: str) -> int:
        """Atomically increment and return the CRL number of `issuer`."""

    def reserve_serial_block(self, prefix: str, count: int) -> int:
        """Atomically reserve `count` consecutive sequence numbers under `prefix`; returns the first."""
