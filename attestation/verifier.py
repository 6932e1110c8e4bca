"""Appraisal of evidence against the policy: a `Verdict` with a tier and its reasons.

The caller (the gateway) passes the identity the device authenticated with: serial, device type
and certificate fingerprint from the certificate, and its public key. The verifier never trusts
the evidence for who the device is: the signature must verify with that certificate's key, the
nonce must have been issued to that certificate, and the hwmodel must name the certificate's
device type.

Order of the checks (the first three stop the appraisal, since nothing after them can be trusted):
1. strict CBOR and COSE_Sign1 structure, ES256 in the protected header;
2. the signature, with the certificate's key;
3. the claims' types and sizes;
4. the nonce, used exactly once (only now, so forged evidence cannot burn a device's nonce): a
   nonce equal to the session's (`AttestingDevice.session_nonce`, the DTLS session's exporter
   value, compared first) is fresh unless it is older than the nonce lifetime or the session used
   it before (its one use is claimed here); any other nonce is a server nonce, consumed in the nonce store;
   then, for evidence that came inside a CSR, the binding: its cnf claim names the CSR's key;
5. the policy for the certificate's device type: hwmodel, oemid, firmware reference values,
   minimum version, secure boot, debug state, clock skew.
All reasons found in 4 and 5 are reported, not just the first.

Only fresh, authentic evidence may change a device's state: a verdict revokes only when the
signature verified (2) and this appraisal used the nonce (4). Evidence with an expired,
replayed, unknown or foreign nonce still has its state reasons reported, but never revokes: a
stale retransmission, or a recording of the device's old evidence, must not brick it.

The verdict names the kind of nonce it took (`Verdict.nonce`: "session" or "server"), and so does
its log entry. The session nonce is a value passed in: this module knows no DTLS. Evidence
carrying it was made for one session and no other (each session's exporter value differs), so it
cannot be replayed in another session nor relayed into another device's; within its session the
caller keeps the one-use record (the gateway: a flag on the session, set when `Verdict.fresh` and
the kind is "session").
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

from .errors import EvidenceError, NonceError, NonceExpired, NonceReplayed, NonceUnknown
from .evidence import (DBG_DISABLED, DBG_ENABLED, MAX_EVIDENCE_SIZE, DBGSTAT_NAMES, Evidence, decode_claims,
                       parse_sign1)
from .nonces import SERVER, SESSION, NonceService, SessionNonce
from .policy import DeviceTypePolicy, Policy, ReferenceValue, Tier

# Reasons that describe the device's state (as opposed to a malformed, forged or stale message);
# only these may trigger automatic revocation when the policy asks for it.
STATE_REASONS = frozenset({"hwmodel-mismatch", "oemid-mismatch", "firmware-unknown", "firmware-claims-mismatch",
                           "firmware-below-minimum", "secure-boot-off", "debug-enabled"})


@dataclass(frozen=True)
class AttestingDevice:
    """Who the device is, from the certificate it authenticated with (never from the evidence)."""

    serial: str
    device_type: str
    cert_fingerprint: str      # SHA-256 of the certificate DER, hex
    public_key: Any            # the certificate's public key (ECDSA P-256)
    session: bytes | None = None
    # the session-bound nonce of the DTLS session the evidence arrived in (its exporter value, its
    # age, its one use); None: the session has none, and only server nonces are accepted
    session_nonce: SessionNonce | None = None
    # the key the evidence must vouch for in its cnf claim (x, y): the CSR's key when the evidence
    # came inside a CSR (docs/evidence.md#evidence-inside-the-csr); None: no binding asked
    bound_key: tuple[bytes, bytes] | None = None


@dataclass(frozen=True)
class Reason:
    code: str
    tier: Tier
    message: str

    def as_json(self) -> dict[str, str]:
        return {"code": self.code, "tier": self.tier.value, "message": self.message}


@dataclass(frozen=True)
class Verdict:
    tier: Tier
    reasons: tuple[Reason, ...]
    acceptable: bool           # the policy accepts this tier for enrollment
    revoke: bool               # fresh, authentic, contraindicated state, and the policy asks to revoke
    firmware: ReferenceValue | None = None
    fresh: bool = False        # signature verified and the nonce used by this appraisal
    nonce: str | None = None   # the kind of nonce the evidence carried: "session", "server"; None
                               # when the token could not be decoded and verified

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(r.code for r in self.reasons)


@dataclass(frozen=True)
class Appraisal:
    device: AttestingDevice
    evidence: Evidence | None        # None when the token could not be decoded or verified
    verdict: Verdict
    token: bytes
    time: datetime


def make_verdict(reasons: list[Reason], tpolicy: DeviceTypePolicy | None,
                 firmware: ReferenceValue | None = None, *, fresh: bool = False, nonce: str | None = None) -> Verdict:
    """The verdict of `reasons` under the device type's policy. `fresh`: the evidence's signature
    verified and its nonce was used by this appraisal; without it nothing revokes. `nonce`: its kind."""
    tier = Tier.AFFIRMING
    for r in reasons:
        if r.tier.rank > tier.rank:
            tier = r.tier
    acceptable = tpolicy is not None and tpolicy.accepts(tier)
    revoke = (fresh and tier is Tier.CONTRAINDICATED and tpolicy is not None and tpolicy.revoke_on_contraindicated
              and any(r.code in STATE_REASONS and r.tier is Tier.CONTRAINDICATED for r in reasons))
    return Verdict(tier, tuple(reasons), acceptable, revoke, firmware, fresh, nonce)


class Verifier:
    def __init__(self, policy: Policy, nonces: NonceService, *, clock: Callable[[], datetime],
                 max_size: int = MAX_EVIDENCE_SIZE) -> None:
        self.policy = policy
        self.nonces = nonces
        self.clock = clock
        self.max_size = max_size

    def appraise(self, token: bytes, device: AttestingDevice, now: datetime | None = None) -> Appraisal:
        now = now if now is not None else self.clock()
        tpolicy = self.policy.for_type(device.device_type)
        try:
            sign1 = parse_sign1(token, max_size=self.max_size)
            sign1.verify(device.public_key)
            evidence = decode_claims(sign1.payload, max_size=self.max_size)
        except EvidenceError as exc:
            reasons = [Reason(exc.code, Tier.CONTRAINDICATED, str(exc))]
            if tpolicy is None:
                reasons.append(_unknown_type(device))
            return Appraisal(device, None, make_verdict(reasons, tpolicy), token, now)

        reasons: list[Reason] = []
        kind, fresh = self._use_nonce(evidence.nonce, device, now, reasons)
        if device.bound_key is not None and (evidence.cnf_key is None or not hmac.compare_digest(
                evidence.cnf_key[0] + evidence.cnf_key[1], device.bound_key[0] + device.bound_key[1])):
            reasons.append(Reason("key-not-bound", Tier.CONTRAINDICATED,
                                  "the evidence's cnf claim does not name the CSR's key" if evidence.cnf_key
                                  else "evidence in a CSR must name the CSR's key in its cnf claim"))
        skew = abs(now.timestamp() - evidence.iat)
        if skew > self.policy.max_clock_skew.total_seconds():
            reasons.append(Reason("clock-skew", Tier.WARNING,
                                  f"iat is {skew:.0f} s away from the gateway's clock "
                                  f"(allowed {self.policy.max_clock_skew.total_seconds():.0f} s)"))
        if self.policy.oemid is not None and evidence.oemid != self.policy.oemid:
            reasons.append(Reason("oemid-mismatch", Tier.CONTRAINDICATED,
                                  f"oemid {evidence.oemid!r} is not the fleet's ({self.policy.oemid})"))
        if evidence.hwmodel != device.device_type.encode():
            reasons.append(Reason("hwmodel-mismatch", Tier.CONTRAINDICATED,
                                  f"evidence hwmodel {evidence.hwmodel!r} is not the certificate's device type "
                                  f"{device.device_type!r}"))
        if tpolicy is None:
            reasons.append(_unknown_type(device))
            return Appraisal(device, evidence, make_verdict(reasons, None, fresh=fresh, nonce=kind), token, now)
        firmware = self._firmware(evidence, tpolicy, reasons)
        self._boot_and_debug(evidence, tpolicy, reasons)
        return Appraisal(device, evidence, make_verdict(reasons, tpolicy, firmware, fresh=fresh, nonce=kind),
                         token, now)

    def _use_nonce(self, nonce: bytes, device: AttestingDevice, now: datetime,
                   reasons: list[Reason]) -> tuple[str, bool]:
        """(the nonce's kind, whether this appraisal used it): the session's nonce first (a value
        compare, nothing stored), else a server nonce consumed in the store."""
        session = device.session_nonce
        if session is not None and hmac.compare_digest(nonce, session.value):
            if session.age > self.policy.nonce_lifetime:
                reasons.append(Reason(NonceExpired.code, Tier.CONTRAINDICATED,
                                      f"the session's nonce is older than the nonce lifetime "
                                      f"({self.policy.nonce_lifetime.total_seconds():g} s): open a new session"))
                return SESSION, False
            if not session.claim():             # claimed now: the one use, whatever happens next
                reasons.append(Reason(NonceReplayed.code, Tier.CONTRAINDICATED,
                                      "the session's nonce was used by earlier evidence in this session"))
                return SESSION, False
            return SESSION, True
        try:
            self.nonces.consume(nonce, device.serial, device.cert_fingerprint, device.session, now)
            return SERVER, True
        except NonceUnknown as exc:
            message = str(exc) if session is None else "nonce is neither this session's nor one this gateway issued"
            reasons.append(Reason(exc.code, Tier.CONTRAINDICATED, message))
        except NonceError as exc:
            reasons.append(Reason(exc.code, Tier.CONTRAINDICATED, str(exc)))
        return SERVER, False

    @staticmethod
    def _firmware(ev: Evidence, tp: DeviceTypePolicy, reasons: list[Reason]) -> ReferenceValue | None:
        ref = tp.reference(ev.firmware)
        if ref is None:
            reasons.append(Reason("firmware-unknown", Tier.CONTRAINDICATED,
                                  f"firmware digest {ev.firmware[:24]}... ({ev.swname} {ev.swversion}) matches no "
                                  f"reference value for {tp.device_type}"))
            return None
        if ev.swname != ref.name or ev.swversion != ref.version:
            reasons.append(Reason("firmware-claims-mismatch", Tier.CONTRAINDICATED,
                                  f"evidence claims {ev.swname} {ev.swversion} but the digest is "
                                  f"{ref.name} {ref.version}"))
        if tp.below_minimum(ref):
            reasons.append(Reason("firmware-below-minimum", Tier.CONTRAINDICATED,
                                  f"firmware {ref.name} {ref.version} is below the minimum "
                                  f"{tp.minimum_firmware_version}"))
        if ref.deprecated:
            reasons.append(Reason("firmware-deprecated", Tier.WARNING,
                                  f"firmware {ref.name} {ref.version} is deprecated"))
        return ref

    @staticmethod
    def _boot_and_debug(ev: Evidence, tp: DeviceTypePolicy, reasons: list[Reason]) -> None:
        if not ev.secure_boot:
            if tp.secure_boot_required:
                reasons.append(Reason("secure-boot-off", Tier.CONTRAINDICATED,
                                      "secure boot is off (oemboot false) and the policy requires it"))
            else:
                reasons.append(Reason("secure-boot-off", Tier.WARNING, "secure boot is off (oemboot false)"))
        if ev.dbgstat == DBG_ENABLED:
            if tp.debug_disabled_required:
                reasons.append(Reason("debug-enabled", Tier.CONTRAINDICATED,
                                      "debug is enabled (dbgstat 0) and the policy requires it disabled"))
            else:
                reasons.append(Reason("debug-enabled", Tier.WARNING, "debug is enabled (dbgstat 0)"))
        elif ev.dbgstat == DBG_DISABLED and tp.debug_disabled_required:
            reasons.append(Reason("debug-not-disabled-since-boot", Tier.WARNING,
                                  f"dbgstat 1 ({DBGSTAT_NAMES[1]}): debug may have been used since boot"))


def _unknown_type(device: AttestingDevice) -> Reason:
    return Reason("device-type-unknown", Tier.CONTRAINDICATED,
                  f"the policy has no section for device type {device.device_type!r}")
