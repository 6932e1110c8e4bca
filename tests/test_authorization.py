"""The authorization table (gateway/service/authorization.py), over every combination of action,
identity kind, device state and certificate status: exactly the listed combinations are
allowed, and every other one is refused with the reason a device is told."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.store import CertificateLookup, CertStatus, DeviceState
from devid.gateway.service.authorization import RULES, authorize
from devid.gateway.service.identity import FACTORY, FACTORY_PSK, OPERATIONAL, OPERATIONAL_PSK, PeerIdentity

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
GRACE = timedelta(minutes=10)
KEY = ec.generate_private_key(ec.SECP256R1()).public_key()
M, E, R = DeviceState.MANUFACTURED, DeviceState.ENROLLED, DeviceState.REVOKED

# certificate situations: its status, and for a superseded one whether it is within the grace
CURRENT, IN_GRACE, STALE, REVOKED = "current", "superseded in grace", "superseded", "revoked"
DEVICE_STATES = [None, M, E, R]          # None: the registry has no such device
ACTIONS = ["nonce", "evidence", "enroll", "renew", "config", "psk"]
KINDS = (FACTORY, OPERATIONAL, FACTORY_PSK, OPERATIONAL_PSK)

ALLOWED = {
    *((a, FACTORY, state, CURRENT) for a in ("nonce", "evidence", "enroll") for state in (M, E)),
    ("renew", OPERATIONAL, E, CURRENT), ("renew", OPERATIONAL, E, IN_GRACE),
    ("config", OPERATIONAL, E, CURRENT), ("config", OPERATIONAL, E, IN_GRACE),
    ("config", FACTORY, E, CURRENT),
    # PSK devices (issue 18): each PSK kind as the certificate kind it stands for, and GET /psk
    *((a, FACTORY_PSK, state, CURRENT) for a in ("nonce", "evidence", "enroll") for state in (M, E)),
    ("renew", OPERATIONAL_PSK, E, CURRENT), ("renew", OPERATIONAL_PSK, E, IN_GRACE),
    ("config", OPERATIONAL_PSK, E, CURRENT), ("config", OPERATIONAL_PSK, E, IN_GRACE),
    ("config", FACTORY_PSK, E, CURRENT),
    ("psk", OPERATIONAL_PSK, E, CURRENT), ("psk", OPERATIONAL_PSK, E, IN_GRACE), ("psk", FACTORY_PSK, E, CURRENT),
    # the evidence of a PSK renewal, in its CSR, needs a server nonce (tinydtls has no session nonce);
    # /psk's "only in the session that was issued the certificate" is the service's (test_psk.py)
    ("nonce", OPERATIONAL_PSK, E, CURRENT),
}


def lookup(state, situation, serial="SN1") -> CertificateLookup:
    status = {CURRENT: CertStatus.CURRENT, IN_GRACE: CertStatus.SUPERSEDED, STALE: CertStatus.SUPERSEDED,
              REVOKED: CertStatus.REVOKED}[situation]
    superseded_at = {IN_GRACE: NOW - GRACE / 2, STALE: NOW - 2 * GRACE}.get(situation)
    return CertificateLookup(b"der", "factory", status, "f" * 64, serial, "sensor", state, superseded_at)


def who(kind: str) -> PeerIdentity:
    return PeerIdentity("SN1", "sensor", kind, "f" * 64, 1, KEY)


def expected(action, kind, state, situation) -> str | None:
    """The refusal code, in the order a device is told: identity kind, device, certificate."""
    if (action, kind, state, situation) in ALLOWED:
        return None
    kinds = {g.kind for g in RULES[action]}
    if kind not in kinds:
        return "wrong-identity"
    if state in (None, R):
        return "device-not-allowed"
    if not any((action, kind, state, s) in ALLOWED for s in (CURRENT, IN_GRACE)):
        return "wrong-identity"             # this kind, but not in this device state
    if situation == REVOKED:
        return "certificate-revoked"
    return "certificate-superseded"


def test_the_table_names_every_action_of_the_enrollment_service():
    assert sorted(RULES) == sorted(ACTIONS)


@pytest.mark.parametrize("action", ACTIONS)
def test_every_combination(action):
    allowed = set()
    for kind, state, situation in itertools.product(KINDS, DEVICE_STATES,
                                                    (CURRENT, IN_GRACE, STALE, REVOKED)):
        refusal = authorize(action, who(kind), lookup(state, situation), NOW, GRACE)
        want = expected(action, kind, state, situation)
        assert (refusal.code if refusal else None) == want, (action, kind, state, situation)
        if refusal is None:
            allowed.add((action, kind, state, situation))
    assert allowed == {c for c in ALLOWED if c[0] == action}


@pytest.mark.parametrize("action", ACTIONS)
def test_no_grace_means_no_superseded_certificate(action):
    for kind in KINDS:
        refusal = authorize(action, who(kind), lookup(E, IN_GRACE), NOW, timedelta(0))
        assert refusal is not None


@pytest.mark.parametrize("action", ACTIONS)
def test_a_certificate_unknown_to_the_registry_or_of_another_device_is_refused(action):
    for kind in KINDS:
        for found in (None, lookup(E, CURRENT, serial="SN2")):
            refusal = authorize(action, who(kind), found, NOW, GRACE)
            assert refusal is not None and refusal.code in ("wrong-identity", "device-not-allowed")
