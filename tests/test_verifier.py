"""The verifier, branch by branch: each reason, its tier, acceptance and revocation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devid.attestation.evidence import fw_digest_of
from devid.attestation.policy import Tier, parse_policy
from devid.attestation.verifier import STATE_REASONS

from .attest_util import IMAGE_DEPRECATED, IMAGE_OLD, POLICY_TEXT, Clock, SimDevice, memory_service


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def svc(clock):
    return memory_service(clock)


@pytest.fixture
def dev():
    return SimDevice()


def evaluate(svc, dev, **changes):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint, dev.session).value
    return svc.evaluate(dev.token(nonce, **changes), dev.identity)


def codes(result) -> dict[str, str]:
    return {r.code: r.tier.value for r in result.appraisal.verdict.reasons}


def test_good_evidence_is_affirming_and_logged(svc, dev):
    r = evaluate(svc, dev)
    v = r.appraisal.verdict
    assert (v.tier, v.reasons, v.acceptable, v.revoke) == (Tier.AFFIRMING, (), True, False)
    assert v.firmware.version == "2.3.1"
    assert r.entry.seq == 1 and r.entry.claims["swversion"] == "2.3.1" and r.entry.evidence == r.appraisal.token


@pytest.mark.parametrize("changes,code,tier", [
    ({"fw_digest": fw_digest_of(b"evil image")}, "firmware-unknown", "contraindicated"),
    ({"fw_digest": fw_digest_of(IMAGE_OLD), "swversion": "2.0.4"}, "firmware-below-minimum", "contraindicated"),
    ({"fw_digest": fw_digest_of(IMAGE_DEPRECATED), "swversion": "2.2.0"}, "firmware-deprecated", "warning"),
    ({"swversion": "9.9.9"}, "firmware-claims-mismatch", "contraindicated"),
    ({"swname": "other-fw"}, "firmware-claims-mismatch", "contraindicated"),
    ({"secure_boot": False}, "secure-boot-off", "contraindicated"),
    ({"dbgstat": 0}, "debug-enabled", "contraindicated"),
    ({"dbgstat": 1}, "debug-not-disabled-since-boot", "warning"),
    ({"hwmodel": b"meter"}, "hwmodel-mismatch", "contraindicated"),
    ({"oemid": 1234}, "oemid-mismatch", "contraindicated"),
    ({"iat": 1795867200 + 301}, "clock-skew", "warning"),
    ({"iat": 1795867200 - 3600}, "clock-skew", "warning"),
])
def test_each_policy_reason(svc, dev, changes, code, tier):
    r = evaluate(svc, dev, **changes)
    assert codes(r) == {code: tier}
    v = r.appraisal.verdict
    assert v.tier.value == tier
    assert v.acceptable is False          # this device type accepts affirming only
    assert v.revoke is (tier == "contraindicated" and code in STATE_REASONS)   # policy: revoke on
    assert r.entry.tier.value == tier and r.entry.codes == [code]


def test_dbgstat_2_3_4_are_fine_and_skew_at_the_limit_is_fine(svc, dev):
    for dbg in (2, 3, 4):
        assert evaluate(svc, dev, dbgstat=dbg).appraisal.verdict.tier is Tier.AFFIRMING
    assert evaluate(svc, dev, iat=1795867200 + 300).appraisal.verdict.tier is Tier.AFFIRMING


def test_several_reasons_are_all_reported_worst_tier_wins(svc, dev):
    r = evaluate(svc, dev, dbgstat=1, iat=1795867200 - 3600, secure_boot=False)
    assert codes(r) == {"debug-not-disabled-since-boot": "warning", "clock-skew": "warning",
                        "secure-boot-off": "contraindicated"}
    assert r.appraisal.verdict.tier is Tier.CONTRAINDICATED


def test_lenient_type_accepts_warnings_and_downgrades_boot_and_debug(svc):
    dev = SimDevice(serial="LS1", device_type="lenient-sensor")
    r = evaluate(svc, dev, secure_boot=False, dbgstat=0)
    assert codes(r) == {"secure-boot-off": "warning", "debug-enabled": "warning"}
    v = r.appraisal.verdict
    assert v.tier is Tier.WARNING and v.acceptable and not v.revoke
    assert codes(evaluate(svc, dev, dbgstat=1)) == {}      # debug not required off: dbgstat 1 is fine
    r = evaluate(svc, dev, fw_digest=fw_digest_of(b"unknown"))
    assert r.appraisal.verdict.tier is Tier.CONTRAINDICATED and not r.appraisal.verdict.revoke   # flag off


def test_unknown_device_type_is_contraindicated(svc):
    dev = SimDevice(serial="X1", device_type="toaster")
    r = evaluate(svc, dev)
    assert "device-type-unknown" in codes(r)
    assert r.appraisal.verdict.tier is Tier.CONTRAINDICATED and not r.appraisal.verdict.acceptable
    assert not r.appraisal.verdict.revoke
    # even when the evidence is broken, the missing policy is reported too
    r = svc.evaluate(b"\xff", dev.identity)
    assert set(codes(r)) == {"cbor-malformed", "device-type-unknown"}


# -- protocol failures: stop early, never revoke, nonce not burnt -----------------------------------

def test_bad_signature_is_contraindicated_logged_and_does_not_burn_the_nonce(svc, dev):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    forged = dev.token(nonce, key=ec.generate_private_key(ec.SECP256R1()))
    r = svc.evaluate(forged, dev.identity)
    assert codes(r) == {"signature-invalid": "contraindicated"}
    assert r.appraisal.evidence is None and r.entry.claims is None and r.entry.evidence == forged
    assert not r.appraisal.verdict.revoke
    # the real device can still use its nonce
    assert svc.evaluate(dev.token(nonce), dev.identity).appraisal.verdict.tier is Tier.AFFIRMING


@pytest.mark.parametrize("token,code", [
    (b"", "cbor-malformed"), (b"\x00" * 3000, "cbor-too-large"), (b"\xd2\x80", "evidence-structure"),
])
def test_malformed_evidence_is_contraindicated_and_logged(svc, dev, token, code):
    r = svc.evaluate(token, dev.identity)
    assert codes(r) == {code: "contraindicated"} and r.entry.evidence == token


def test_missing_claim_is_contraindicated(svc, dev):
    import cbor2
    from devid.attestation.evidence import sign_evidence
    c = dev.evidence(b"n" * 16).claims()
    del c[263]
    r = svc.evaluate(sign_evidence(cbor2.dumps(c), dev.key), dev.identity)
    assert codes(r) == {"claim-missing": "contraindicated"}


def test_replayed_nonce(svc, dev):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    token = dev.token(nonce)
    assert svc.evaluate(token, dev.identity).appraisal.verdict.tier is Tier.AFFIRMING
    again = svc.evaluate(token, dev.identity)                       # same token
    assert codes(again) == {"nonce-replayed": "contraindicated"} and not again.appraisal.verdict.revoke
    fresh = svc.evaluate(dev.token(nonce, bootcount=13), dev.identity)   # new evidence, same nonce
    assert codes(fresh) == {"nonce-replayed": "contraindicated"}


def test_expired_nonce(svc, dev, clock):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    clock.advance(60)
    r = svc.evaluate(dev.token(nonce, iat=1795867260), dev.identity)
    assert codes(r) == {"nonce-expired": "contraindicated"}


def test_nonce_just_before_expiry_is_fine(svc, dev, clock):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    clock.advance(59.999)
    assert svc.evaluate(dev.token(nonce), dev.identity).appraisal.verdict.tier is Tier.AFFIRMING


def test_nonce_of_another_device_or_certificate_or_session(svc, dev):
    other = SimDevice(serial="TS00000002")
    nonce = svc.issue_nonce(other.serial, other.fingerprint).value
    assert codes(svc.evaluate(dev.token(nonce), dev.identity)) == {"nonce-wrong-device": "contraindicated"}
    # same serial, another certificate (e.g. a cloned serial)
    clone = SimDevice(serial=other.serial)
    clone.fingerprint = "00" * 32
    assert codes(svc.evaluate(clone.token(nonce), clone.identity)) == {"nonce-wrong-device": "contraindicated"}
    # the rightful device can still use it
    assert svc.evaluate(other.token(nonce), other.identity).appraisal.verdict.tier is Tier.AFFIRMING
    # bound to a session
    dev.session = b"session-A"
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint, dev.session).value
    dev.session = b"session-B"
    r = svc.evaluate(dev.token(nonce), dev.identity)
    assert codes(r) == {"nonce-wrong-device": "contraindicated"} and "session" in r.appraisal.verdict.reasons[0].message


def test_unknown_nonce(svc, dev):
    assert codes(svc.evaluate(dev.token(b"z" * 16), dev.identity)) == {"nonce-unknown": "contraindicated"}


# -- only fresh, authentic evidence may revoke (issue 12 item 1) ------------------------------------

STATE_FINDINGS = [{"fw_digest": fw_digest_of(b"evil image")}, {"secure_boot": False}, {"dbgstat": 0},
                  {"hwmodel": b"meter"}, {"oemid": 1234}]


@pytest.mark.parametrize("finding", STATE_FINDINGS)
def test_a_state_finding_in_stale_evidence_never_revokes(svc, dev, clock, finding):
    """revoke_on_contraindicated is on for this type: evidence that is not fresh (replayed,
    expired, unknown or another device's nonce) reports its state findings but revokes nothing,
    and is a refused verdict like any other (logged within the refused-evidence budget)."""
    used = svc.issue_nonce(dev.serial, dev.fingerprint).value
    assert svc.evaluate(dev.token(used), dev.identity).appraisal.verdict.fresh
    expired = svc.issue_nonce(dev.serial, dev.fingerprint).value
    clock.advance(61)
    other = SimDevice(serial="TS00000002")
    foreign = svc.issue_nonce(other.serial, other.fingerprint).value
    for nonce, code in ((used, "nonce-replayed"), (expired, "nonce-expired"), (b"z" * 16, "nonce-unknown"),
                        (foreign, "nonce-wrong-device")):
        r = svc.evaluate(dev.token(nonce, iat=1795867200 + 61, **finding), dev.identity)
        v = r.appraisal.verdict
        assert code in codes(r) and len(codes(r)) == 2 and v.tier is Tier.CONTRAINDICATED, codes(r)
        assert not v.fresh and not v.revoke and not r.entry.revoke
    # the same finding with a fresh nonce revokes
    r = evaluate(svc, dev, iat=1795867200 + 61, **finding)
    assert r.appraisal.verdict.fresh and r.appraisal.verdict.revoke and r.entry.revoke


def test_forged_evidence_with_a_state_finding_never_revokes(svc, dev):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    forged = dev.token(nonce, key=ec.generate_private_key(ec.SECP256R1()), fw_digest=fw_digest_of(b"evil image"))
    v = svc.evaluate(forged, dev.identity).appraisal.verdict
    assert codes_of(v) == {"signature-invalid"} and not v.fresh and not v.revoke


def codes_of(verdict) -> set[str]:
    return {r.code for r in verdict.reasons}


# -- enrollment hand-off: one verdict, one enrollment ------------------------------------------------

def test_take_verdict_once_within_the_window(svc, dev, clock):
    assert svc.take_verdict(dev.serial) is None
    entry = evaluate(svc, dev).entry
    clock.advance(10)
    assert svc.take_verdict(dev.serial).seq == entry.seq
    assert svc.take_verdict(dev.serial) is None                    # used
    evaluate(svc, dev)
    clock.advance(301)
    assert svc.take_verdict(dev.serial) is None                    # outside the 300 s window


def test_take_verdict_refuses_when_the_latest_verdict_is_not_acceptable(svc, dev):
    evaluate(svc, dev)
    evaluate(svc, dev, secure_boot=False)
    assert svc.take_verdict(dev.serial) is None                    # the older affirming one does not count
    assert svc.take_verdict("TS-OTHER") is None


def test_policy_timing_settings_are_used(dev):
    text = POLICY_TEXT.replace("nonce_lifetime_seconds = 60", "nonce_lifetime_seconds = 5")
    clock = Clock()
    svc = memory_service(clock, parse_policy(text))
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint)
    assert nonce.expires_at - nonce.issued_at == timedelta(seconds=5) and len(nonce.value) == 16
    clock.advance(5)
    assert codes(svc.evaluate(dev.token(nonce.value), dev.identity)) == {"nonce-expired": "contraindicated"}
