"""The enrollment service: who may do what, and what happens when they do.

No CoAP here: the resources (`resources.py`) turn requests into calls on this service and its
domain errors into CoAP responses (`problems.py`). Every decision is logged as one structured
line on the `devid.enrollment` logger.

Who may do what is a table, `authorization.RULES`, checked by `authorization.authorize` on every
request (with the registry's word on the session's certificate and device, one query):
- factory identity (IDevID): nonce, evidence, /sen; /config too once its device is enrolled;
- operational identity (LDevID): /sren (its own device only), configuration;
- an unknown or revoked device: nothing (the DTLS layer already refuses it; checked again here);
- /sen issues only with acceptable evidence inside its CSR (the one-request enrollment: appraised
  there, bound to the CSR's key by its cnf claim; the verdict's log entry, its use and the
  certificate in one transaction), or after an acceptable verdict for the same device within the
  policy's verdict window (classic), each verdict used once, unless the device type's policy
  waives attestation;
- a PSK session (a PSK is a string in flash, not a key): /sen and /sren only with acceptable
  evidence inside the CSR, signed by the device's attestation key (its factory key), never with a
  verdict of the window, unless the policy waives attestation; GET /psk only in the session whose
  /sen or /sren issued the certificate the key goes with (docs/enrollment.md#psk-devices);
- evidence carries a server nonce (from /attest/nonce, one row, consumed once) or the session's
  nonce (the DTLS session's exporter value: no round trip, no row, accepted once per session);
- a contraindicated verdict of fresh, authentic evidence (signature verified, nonce used by
  this request) revokes the device when its policy says so; stale or forged evidence never does;
- re-enrollment with the factory identity of an already enrolled device: allowed unless the
  policy says `reenroll = false`; the previous operational certificate becomes superseded;
- a superseded certificate (one a later issuance replaced) may not renew nor read /config
  (unless within `Budgets.superseded_grace`), a revoked certificate nothing: the certificate's
  status is read from the registry on every request, with its device, in one query.

Budgets (`budgets.py`): every request of these five actions first spends from its device's
token bucket, before any registry read or write or any parsing (4.29 with Max-Age beyond it;
refusals logged at a bounded rate), and an issuance first counts the device's recent
operational certificates inside the issuance transaction.
"""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable, ContextManager

from devid.attestation.evidence import MAX_EVIDENCE_SIZE, cose_key_xy
from devid.attestation.nonces import SESSION, NonceRecord, SessionNonce
from devid.attestation.policy import Policy
from devid.attestation.service import AttestationService, Evaluation
from devid.attestation.verifier import AttestingDevice
from devid.ca.authority import CertificateAuthority, CheckedKey, IssuedCertificate
from devid.ca.errors import CAError
from devid.ca.revocation import revoke_device
from devid.ca.store import CertificateLookup, DeviceState

from devid.gateway.service.authorization import RULES, authorize
from devid.gateway.service.budgets import Budgets, RateLimiter
from devid.gateway.store.configuration import ConfigTemplates
from devid.gateway.errors import ConfigError
from devid.gateway.service.identity import OPERATIONAL, PSK_KINDS, PeerIdentity, attestation_identity
from devid.gateway.service.psk_rules import PskRules
# the service's refusals (refusals.py), imported from here too
from devid.gateway.service.refusals import (
    EnrollmentError, NotAuthenticated, WrongIdentity, AttestationRequired, AttestationRefused, ReenrollmentRefused, DeviceNotAllowed, UnknownDeviceType, CertificateRevoked, CertificateSuperseded, TooManyRequests, TooManyCertificates)
from devid.gateway.system import metrics

__all__ = ["EnrollmentService", "EvidenceOutcome", "Issuance", "EnrollmentError", "NotAuthenticated",
           "WrongIdentity", "AttestationRequired", "AttestationRefused", "ReenrollmentRefused", "DeviceNotAllowed",
           "UnknownDeviceType", "CertificateRevoked", "CertificateSuperseded", "TooManyRequests",
           "TooManyCertificates"]

log = logging.getLogger("devid.enrollment")


@dataclass(frozen=True)
class Issuance:
    """What /sen or /sren gave: the certificate, and the appraisal of evidence that came in its CSR."""

    issued: IssuedCertificate
    evaluation: Evaluation | None = None
    config: dict | None = None        # the configuration, when the caller asked for it with the certificate


@dataclass(frozen=True)
class EvidenceOutcome:
    """What `EnrollmentService.evidence` did: the appraisal (logged), and whether it revoked the device."""

    evaluation: Evaluation
    revoked: bool


@dataclass
class EnrollmentService(PskRules):
    ca: CertificateAuthority
    attestation: AttestationService
    policy: Policy
    configs: ConfigTemplates
    clock: Callable[[], datetime]
    # makes the use of a verdict and the issuance one transaction (the registry's `transaction`):
    # a verdict is used up exactly when a certificate is issued, and one commit instead of two
    atomic: Callable[[str], ContextManager] = nullcontext     # (device serial): its checks and writes as one
    budgets: Budgets = field(default_factory=Budgets)
    # the request-rate clock (seconds, monotonic): apart from `clock`, which is wall time
    monotonic: Callable[[], float] = time.monotonic
    # the gateway's anomaly tracker (service/anomalies.py): verdicts and renewals per device
    anomalies: Any = None
    # the PSK secret (ca/psk.py), None while there is none: GET /psk (service/psk.py)
    psk_secret: Callable[[], bytes | None] = lambda: None
    # randomness: the ephemeral keys that seal operational PSKs (service/psk_rules.py)
    random: Callable[[int], bytes] = os.urandom
    # (the gateway's private key, its certificate chain without the root): signs GET /psk's
    # answer (service/psk_rules.py); None: no operational PSK is served
    delivery: tuple[Any, list] | None = None

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.budgets, self.monotonic)

    # -- helpers -------------------------------------------------------------------------------

    def _decision(self, action: str, who: PeerIdentity | None, result: str, level: int = logging.INFO,
                  **details) -> None:
        metrics.DECISIONS.labels(action, result).inc()
        if not log.isEnabledFor(level):
            return
        line = {"result": result}
        if who is not None:
            line.update(serial=who.serial, kind=who.kind, fingerprint=who.fingerprint)
        line.update(details)
        log.log(level, action, extra=line)      # one JSON line (gateway/system/logs.py); None fields left out

    def _require(self, action: str, who: PeerIdentity | None) -> CertificateLookup:
        """The registry's word on `who`'s certificate and device, if it may do `action`
        (authorization.RULES); first its device pays for the request from its budget."""
        if who is None:
            self._decision(action, None, "refused", reason="no device identity")
            raise NotAuthenticated("a device certificate is required")
        self._spend(action, who)
        return self._standing(action, who)

    def _spend(self, action: str, who: PeerIdentity) -> None:
        """One request from the device's token bucket for `action`, or 4.29: nothing but memory
        is touched before this."""
        wait = self.limiter.take(who.serial, action)
        if not wait:
            return
        retry = max(1, math.ceil(wait))
        count = self.limiter.refused(who.serial)
        if count is not None:       # at most one line per device per refusal_log_interval
            self._decision(action, who, "rate-limited", logging.WARNING, refused=count, retry_after=retry)
        raise TooManyRequests(f"too many {action} requests from this device; retry in {retry} s", retry)

    def _standing(self, action: str, who: PeerIdentity, grace: timedelta | None = None) -> CertificateLookup:
        """The certificate of this session and its device, in one registry query, authorized
        (`grace`: for a superseded certificate, instead of the budgets' grace period)."""
        found = self.ca.store.lookup_certificate(who.certificate_serial)
        refusal = authorize(action, who, found, self.clock(),
                            self.budgets.superseded_grace if grace is None else grace)
        if refusal is None:
            return found
        self._decision(action, who, "refused", reason=refusal.reason)
        if refusal.code == "wrong-identity":
            raise WrongIdentity(f"this needs the device's {RULES[action][0].kind} identity, not its {who.kind} one")
        if refusal.code == "device-not-allowed":
            raise DeviceNotAllowed(f"device {who.serial} is not allowed")
        if refusal.code == "certificate-revoked":
            raise CertificateRevoked(f"certificate {who.certificate_serial:x} is revoked")
        raise CertificateSuperseded(f"certificate {who.certificate_serial:x} was replaced by a newer one: "
                                    "use that, or enroll again with the factory identity")

    def _certificate_quota(self, action: str, who: PeerIdentity) -> None:
        """At most `certificates_per_window` operational certificates per device in any
        `certificate_window`. Called inside the issuance transaction: concurrent requests on
        other workers wait for the registry's write lock, so the count holds everywhere."""
        now = self.clock()
        limit, window = self.budgets.certificates_per_window, self.budgets.certificate_window
        issued = self.ca.store.certificates_issued_since(who.serial, OPERATIONAL, now - window)
        if len(issued) < limit:
            return
        retry = max(1, math.ceil((issued[len(issued) - limit] + window - now).total_seconds()))
        self._decision(action, who, "refused", reason="certificate quota reached", retry_after=retry)
        raise TooManyCertificates(f"at most {limit} certificates per {window.total_seconds() / 3600:g} h for one "
                                  f"device; retry in {retry} s", retry)

    def _attesting(self, who: PeerIdentity, session_nonce: SessionNonce | None = None,
                   bound_key: tuple[bytes, bytes] | None = None) -> AttestingDevice:
        return AttestingDevice(who.serial, who.device_type, who.fingerprint, who.public_key,
                               session_nonce=session_nonce, bound_key=bound_key)

    # -- attestation ----------------------------------------------------------------------------

    def nonce(self, who: PeerIdentity | None) -> NonceRecord:
        self._require("nonce", who)
        # an operational-psk session's evidence is signed with the factory key: its nonce is that
        # certificate's (identity.attestation_identity)
        attester = attestation_identity(self.ca.store, who) or who
        record = self.attestation.issue_nonce(who.serial, attester.fingerprint)
        self._decision("nonce", who, "issued", expires=record.expires_at.isoformat())
        return record

    def evidence(self, who: PeerIdentity | None, token: bytes,
                 session_nonce: SessionNonce | None = None) -> EvidenceOutcome:
        """Appraise and log the evidence. Its nonce is either the session's (`session_nonce`: the
        DTLS session's exporter value, accepted once per session and within the nonce lifetime;
        the verifier claims its use on the object, which the caller keeps for the session) or a
        server nonce from `nonce` (docs/evidence.md)."""
        self._require("evidence", who)
        return self._judged(who, self.attestation.evaluate(token, self._attesting(who, session_nonce)))

    def _judged(self, who: PeerIdentity, evaluation: Evaluation, **details) -> EvidenceOutcome:
        """Act on a logged appraisal: revoke when it says so, and log the decision."""
        verdict = evaluation.appraisal.verdict
        # Only fresh, authentic evidence changes the device's state: the verifier sets `revoke`
        # only when the signature verified with this certificate's key and this request consumed
        # the nonce (`fresh`); both are checked here again, before anything is written.
        revoked = verdict.revoke and verdict.fresh
        if revoked:
            revoke_device(self.ca.store, who.serial, "keyCompromise", self.clock())
        tier = verdict.tier.value
        metrics.VERDICTS.labels(tier).inc()
        for reason in verdict.reasons:
            metrics.VERDICT_REASONS.labels(reason.code, reason.tier.value).inc()
        if self.anomalies is not None:
            self.anomalies.verdict(who.serial, tier, evaluation.log_seq)
        self._decision("evidence", who, verdict.tier.value, acceptable=verdict.acceptable,
                       reasons=list(verdict.codes) or None, log_seq=evaluation.log_seq, nonce=verdict.nonce,
                       revoked=revoked or None, **details)
        return EvidenceOutcome(evaluation, revoked)

    # -- EST ----------------------------------------------------------------------------------

    def enroll(self, who: PeerIdentity | None, csr: bytes, session_nonce: SessionNonce | None = None, *,
               with_config: bool = False) -> Issuance:
        """/sen: a first operational certificate (or a re-enrollment) for a factory identity.

        Its attestation is either evidence inside the CSR (appraised here, with the session's
        nonce or a server nonce, and bound to the CSR's key by its cnf claim) or an earlier
        verdict from /attest/evidence. With evidence in the CSR, the verdict's log entry, its use
        and the certificate are written in one transaction (`atomic`). `with_config`: the answer
        carries the device's configuration too; it is built before anything is issued, so a
        template that cannot be served refuses the request instead of losing a certificate."""
        started = time.perf_counter()
        found = self._require("enroll", who)
        tpolicy = self.policy.for_type(who.device_type)
        if tpolicy is None:
            self._decision("enroll", who, "refused", reason="device type not in policy")
            raise UnknownDeviceType(f"device type {who.device_type} is not in the gateway's policy")
        reenrollment = found.device_state is DeviceState.ENROLLED
        if reenrollment and not tpolicy.reenroll:
            self._decision("enroll", who, "refused", reason="re-enrollment not allowed")
            raise ReenrollmentRefused("device already enrolled; policy does not allow re-enrollment")
        checked = self._check_csr("enroll", who, csr, evidence=True)   # a bad CSR must not use up the verdict
        if who.kind in PSK_KINDS and checked.evidence is None and tpolicy.attestation != "waived":
            # a PSK is a string in flash, not a key: it never spends a verdict of the window (which
            # the real device may just have earned); evidence signed by the attestation key and
            # bound to this CSR's key is the proof (docs/enrollment.md#psk-devices)
            self._psk_without_evidence("enroll", who)
        # before the evidence is appraised: a template that cannot be served refuses the request
        # without using the evidence's nonce
        config = self._config(who) if with_config else None
        appraisal = None
        if checked.evidence is not None:
            # appraised before the transaction: a session nonce writes nothing, and the signature
            # check stays outside the registry's write lock
            device = self._attesting(who, session_nonce, cose_key_xy(checked.public_key))
            appraisal = self.attestation.appraise(checked.evidence, device)
            if not appraisal.verdict.acceptable:
                outcome = self._judged(who, self.attestation.record(appraisal), via="csr")
                verdict = appraisal.verdict
                raise AttestationRefused(f"verdict {verdict.tier.value}: {', '.join(verdict.codes)}"
                                         + (" (the device was revoked)" if outcome.revoked else ""))
        verdict_seq, evaluation = None, None
        try:
            with self.atomic(who.serial):     # nor may a failed issuance
                if not tpolicy.reenroll and self._standing("enroll", who).device_state is DeviceState.ENROLLED:
                    # again under the registry's write lock: of first enrollments racing on several
                    # workers, the first makes the device enrolled and the others are refused here
                    self._decision("enroll", who, "refused", reason="re-enrollment not allowed")
                    raise ReenrollmentRefused("device already enrolled; policy does not allow re-enrollment")
                self._certificate_quota("enroll", who)
                if appraisal is None and tpolicy.attestation != "waived":
                    entry = self.attestation.take_verdict(who.serial)
                    if entry is None:
                        self._decision("enroll", who, "refused", reason="no acceptable verdict in the window")
                        raise AttestationRequired(
                            f"device type {who.device_type} requires attestation: put evidence in the CSR "
                            "(attribute id-aa-attestation) or send it to /attest/evidence first")
                    verdict_seq = entry.seq
                issued = self._issue("enroll", who, checked)
                if appraisal is not None:
                    # the log entry last: appends to the one chain are serialised (on PostgreSQL
                    # across hosts, by an advisory lock held to COMMIT), so the signature above
                    # is not done while holding that lock
                    evaluation = self.attestation.record(appraisal, used_for="enrollment")
                    verdict_seq = evaluation.log_seq
        except BaseException:
            # nothing was written: the verdict's entry rolled back with the certificate. A session
            # nonce the appraisal claimed is released, so the device may retry in this session
            # (after a 4.29 or a 5.03) with the same evidence; a server nonce stays consumed
            if appraisal is not None and appraisal.verdict.fresh and appraisal.verdict.nonce == SESSION \
                    and session_nonce is not None:
                session_nonce.release()
            raise
        if evaluation is not None:
            self._judged(who, evaluation, via="csr")
        self._decision("enroll", who, "issued", certificate=format(issued.cert.serial_number, "x"),
                       verdict_seq=verdict_seq, attestation=tpolicy.attestation,
                       reenrollment=reenrollment or None, config=with_config or None)
        metrics.ISSUANCE_SECONDS.labels("enroll").observe(time.perf_counter() - started)
        return Issuance(issued, evaluation, config)

    def renew(self, who: PeerIdentity | None, csr: bytes, *, with_config: bool = False) -> Issuance:
        """/sren: a new operational certificate for the device of this operational identity,
        which must be its current one (or superseded within the grace period). `with_config`:
        as for `enroll`, the configuration is built before anything is issued. A PSK session
        (operational-psk) must put evidence in its CSR, signed with the device's attestation key
        and bound to the CSR's key, and it must be acceptable (unless the policy waives
        attestation): its verdict is logged with the certificate, in one transaction."""
        started = time.perf_counter()
        self._require("renew", who)
        psk = who.kind in PSK_KINDS
        checked = self._check_csr("renew", who, csr, evidence=psk)
        config = self._config(who) if with_config else None
        appraisal = self._psk_appraisal(who, checked) if psk else None
        evaluation = None
        with self.atomic(who.serial):
            # again under the registry's write lock: of renewals racing with one certificate
            # (on any worker), the first supersedes it and the others are refused here
            self._standing("renew", who)
            self._certificate_quota("renew", who)
            issued = self._issue("renew", who, checked)
            if appraisal is not None:
                evaluation = self.attestation.record(appraisal, used_for="renewal")
        if evaluation is not None:
            self._judged(who, evaluation, via="csr")
        self._decision("renew", who, "issued", certificate=format(issued.cert.serial_number, "x"),
                       config=with_config or None, verdict_seq=evaluation.log_seq if evaluation else None)
        metrics.ISSUANCE_SECONDS.labels("renew").observe(time.perf_counter() - started)
        if self.anomalies is not None:
            self.anomalies.renewed(who.serial)
        return Issuance(issued, evaluation, config)

    def _check_csr(self, action: str, who: PeerIdentity, csr: bytes, evidence: bool = False) -> CheckedKey:
        """Parse and check the CSR once; issuance then takes the checked key. `evidence`: take
        the attestation evidence it carries (else a CSR with evidence is refused)."""
        try:
            return self.ca.checked_csr_key(csr, evidence_cap=MAX_EVIDENCE_SIZE if evidence else None)
        except CAError as exc:
            self._decision(action, who, "refused", reason=str(exc))
            raise

    def _issue(self, action: str, who: PeerIdentity, csr: "bytes | CheckedKey") -> IssuedCertificate:
        try:
            return self.ca.issue_operational(csr, who.serial, self.clock(),
                                             validity=self.policy.certificate_validity(who.device_type))
        except CAError as exc:
            self._decision(action, who, "refused", reason=str(exc))
            raise

    def configuration(self, who: PeerIdentity | None) -> dict:
        """The device's configuration. The factory identity of an enrolled device may fetch it
        too: a device gets its configuration in the session it enrolled in (one DTLS handshake
        per enrollment)."""
        self._require("config", who)
        config = self._config(who)
        self._decision("config", who, "served", device_type=who.device_type)
        return config

    def _config(self, who: PeerIdentity) -> dict:
        try:
            config = self.configs.for_device(who.serial, who.device_type)
        except (CAError, ConfigError) as exc:
            # the operator's template, not the device, is at fault: a warning naming the file
            self._decision("config", who, "failed", logging.WARNING, reason=str(exc))
            raise
        # the renewal threshold is the policy's, per device type (docs/enrollment.md#configuration-templates)
        config["renewal"]["window_days"] = self.policy.renewal_threshold(who.device_type).days
        return config
