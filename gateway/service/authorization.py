"""Who may do what at the gateway, as data: one table, checked by one function.

Each action of the enrollment service lists its grants. A grant names the identity kind
(the certificate the DTLS session authenticated with: factory IDevID or operational LDevID), the
device states in which that kind may act, and whether a superseded certificate of that kind is
still honoured within the grace period (`Budgets.superseded_grace`). A revoked certificate, a
revoked or unknown device, or a certificate that is not the session's device's, is never
allowed. `authorize` is pure: the enrollment service reads the registry (one query joining the
certificate and its device) and passes what it found.

The order of the checks decides what a refused device is told, most basic first: the identity
kind, then the device, then the certificate's status.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from devid.ca.store import CertificateLookup, CertStatus, DeviceState
from devid.ca.validation import within_grace

from devid.gateway.service.identity import FACTORY, FACTORY_PSK, OPERATIONAL, OPERATIONAL_PSK, PeerIdentity

MANUFACTURED, ENROLLED = DeviceState.MANUFACTURED, DeviceState.ENROLLED


@dataclass(frozen=True)
class Grant:
    kind: str                                   # FACTORY, OPERATIONAL, FACTORY_PSK or OPERATIONAL_PSK
    device_states: frozenset[DeviceState]
    superseded_in_grace: bool = False           # a superseded certificate, within the grace period


# action -> its grants (the first one names the identity a refused device is told it needs)
# A PSK identity may do what the certificate identity of its kind may (factory-psk as factory,
# operational-psk as operational: identity.PskDeviceAuthenticator), with more proof where a PSK is
# weaker than a key (docs/enrollment.md#psk-devices): /sen and /sren of a PSK session need evidence
# inside the CSR, signed by the device's attestation key (EnrollmentService.enroll, renew), so
# operational-psk may ask for a server nonce too (tinydtls exports no session nonce); and it may
# fetch its device's operational PSK ("psk", GET /psk), only in the session whose /sen or /sren
# issued the certificate the key goes with (service/psk.py checks the session; this table the
# device). Certificate identities get no PSK: a device that has certificates does not need one.
RULES: dict[str, tuple[Grant, ...]] = {
    "nonce": (Grant(FACTORY, frozenset({MANUFACTURED, ENROLLED})),
              Grant(FACTORY_PSK, frozenset({MANUFACTURED, ENROLLED})),
              Grant(OPERATIONAL_PSK, frozenset({ENROLLED}))),
    "evidence": (Grant(FACTORY, frozenset({MANUFACTURED, ENROLLED})),
                 Grant(FACTORY_PSK, frozenset({MANUFACTURED, ENROLLED}))),
    # a first enrollment, or a re-enrollment with the factory identity (the policy may forbid it)
    "enroll": (Grant(FACTORY, frozenset({MANUFACTURED, ENROLLED})),
               Grant(FACTORY_PSK, frozenset({MANUFACTURED, ENROLLED}))),
    "renew": (Grant(OPERATIONAL, frozenset({ENROLLED}), superseded_in_grace=True),
              Grant(OPERATIONAL_PSK, frozenset({ENROLLED}), superseded_in_grace=True)),
    # the factory identity of an enrolled device too: the configuration in the session that enrolled
    "config": (Grant(OPERATIONAL, frozenset({ENROLLED}), superseded_in_grace=True),
               Grant(FACTORY, frozenset({ENROLLED})),
               Grant(OPERATIONAL_PSK, frozenset({ENROLLED}), superseded_in_grace=True),
               Grant(FACTORY_PSK, frozenset({ENROLLED}))),
    "psk": (Grant(OPERATIONAL_PSK, frozenset({ENROLLED}), superseded_in_grace=True),
            Grant(FACTORY_PSK, frozenset({ENROLLED}))),
}


@dataclass(frozen=True)
class Refusal:
    code: str          # wrong-identity | device-not-allowed | certificate-revoked | certificate-superseded
    reason: str        # for the log line


def authorize(action: str, who: PeerIdentity, found: CertificateLookup | None, now: datetime,
              grace: timedelta) -> Refusal | None:
    """None if `who` may do `action`, given the registry's `found` for its certificate; else why not."""
    grants = RULES[action]
    device_ok = (found is not None and found.device_serial == who.serial
                 and found.device_state not in (None, DeviceState.REVOKED))
    grant = next((g for g in grants if g.kind == who.kind
                  and (not device_ok or found.device_state in g.device_states)), None)
    if grant is None:
        return Refusal("wrong-identity", f"needs the {grants[0].kind} identity")
    if not device_ok:
        return Refusal("device-not-allowed", "device unknown or revoked")
    if found.status is CertStatus.REVOKED:
        return Refusal("certificate-revoked", "certificate revoked")
    if found.status is CertStatus.SUPERSEDED and not (grant.superseded_in_grace and within_grace(found, now, grace)):
        return Refusal("certificate-superseded", "certificate superseded")
    return None
