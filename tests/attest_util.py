"""Helpers for attestation tests: a device with a real P-256 key, evidence builders, a policy."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import datetime, timezone, timedelta

from cryptography.hazmat.primitives.asymmetric import ec

from devid.attestation.evidence import Evidence, fw_digest_of, sign_evidence
from devid.attestation.log import MemoryLogStore
from devid.attestation.nonces import MemoryNonceStore
from devid.attestation.policy import parse_policy
from devid.attestation.service import AttestationService
from devid.attestation.verifier import AttestingDevice

# Attestation tests run on a fixed clock of their own: the documented test vector's iat
# (docs/evidence.md), 2026-11-28T12:00:00Z. Nothing here touches OpenSSL's clock.
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)

IMAGE_CURRENT = b"ts-firmware 2.3.1 image"
IMAGE_DEPRECATED = b"ts-firmware 2.2.0 image"
IMAGE_OLD = b"ts-firmware 2.0.4 image"
DIGEST_CURRENT = fw_digest_of(IMAGE_CURRENT)
OEMID = 32473

POLICY_TEXT = f"""
version = 1
[settings]
nonce_lifetime_seconds = 60
verdict_window_seconds = 300
max_clock_skew_seconds = 300
oemid = {OEMID}

[device_types.temperature-sensor]
attestation = "required"
accept = "affirming"
revoke_on_contraindicated = true
secure_boot_required = true
debug_disabled_required = true
minimum_firmware_version = "2.1.0"
[[device_types.temperature-sensor.firmware]]
name = "ts-firmware"
version = "2.3.1"
digest = "sha-256:{DIGEST_CURRENT.hex()}"
[[device_types.temperature-sensor.firmware]]
name = "ts-firmware"
version = "2.2.0"
digest = "sha-256:{fw_digest_of(IMAGE_DEPRECATED).hex()}"
deprecated = true
[[device_types.temperature-sensor.firmware]]
name = "ts-firmware"
version = "2.0.4"
digest = "sha-256:{fw_digest_of(IMAGE_OLD).hex()}"

[device_types.lenient-sensor]
attestation = "required"
accept = "warning"
secure_boot_required = false
debug_disabled_required = false
[[device_types.lenient-sensor.firmware]]
name = "ts-firmware"
version = "2.3.1"
digest = "sha-256:{DIGEST_CURRENT.hex()}"
"""

POLICY = parse_policy(POLICY_TEXT, "test-policy.toml")


@dataclass
class SimDevice:
    serial: str = "TS00000001"
    device_type: str = "temperature-sensor"
    key: ec.EllipticCurvePrivateKey = None
    session: bytes | None = None

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = ec.generate_private_key(ec.SECP256R1())
        self.fingerprint = hashlib.sha256(self.serial.encode() + b"-cert").hexdigest()

    @property
    def identity(self) -> AttestingDevice:
        return AttestingDevice(self.serial, self.device_type, self.fingerprint, self.key.public_key(), self.session)

    def evidence(self, nonce: bytes, **changes) -> Evidence:
        ev = Evidence(nonce=nonce, ueid=b"\x01" + hashlib.sha256(self.serial.encode()).digest()[:16], oemid=OEMID,
                      hwmodel=self.device_type.encode(), swname="ts-firmware", swversion="2.3.1",
                      fw_alg="sha-256", fw_digest=DIGEST_CURRENT, secure_boot=True, dbgstat=3, bootcount=12,
                      iat=int(NOW.timestamp()), swversion_scheme=1)
        return replace(ev, **changes)

    def token(self, nonce: bytes, key=None, **changes) -> bytes:
        return sign_evidence(self.evidence(nonce, **changes), key or self.key)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def memory_service(clock: Clock | None = None, policy=POLICY) -> AttestationService:
    return AttestationService(policy, MemoryNonceStore(), MemoryLogStore(), clock=clock or Clock())
