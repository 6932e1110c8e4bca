"""The enrollment service: who may do what, and what happens when they do.

No CoAP here: the resources (`resources.py`) turn requests into calls on this service and its
domain errors into CoAP responses (`problems.py`). Every decision is logged as one structured
line on the `devid.enrollment` logger.

Rules (issue: zero-touch enrollment):
- factory identity (IDevID): nonce, evidence, /sen;
- operational identity (LDevID): /sren (its own device only), configuration;
- an unknown or revoked device: nothing (the DTLS layer already refuses it; checked again here);
- /sen issues only after an acceptable verdict for the same device within the policy's verdict
  window, each verdict used once, unless the device type's policy waives attestation;
- a contraindicated verdict revokes the device when its policy says so;
- re-enrollment with the factory identity of an already enrolled device: allowed unless the
  policy says `reenroll = false`; the previous operational certificate becomes superseded.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, ContextManager

from attestation.nonces import NonceRecord
from attestation.policy import Policy
from attestation.service import AttestationService, Evaluation
from attestation.verifier import AttestingDevice
from ca.authority import CertificateAuthority, CheckedKey, IssuedCertificate
from ca.errors import CAError
from ca.revocation import revoke_device
from ca.store import DeviceRecord, DeviceState

from .configuration import ConfigTemplates
from .identity import FACTORY, OPERATIONAL, PeerIdentity

log = logging.getLogger("devid.enrollment")


class EnrollmentError(Exception):
    """A refusal the device is told about (short reason); `problems.py` maps it to a CoAP code."""

    code = "refused"


class NotAuthenticated(EnrollmentError):
    code = "not-authenticated"


class WrongIdentity(EnrollmentError):
    """A factory identity where an operational one is needed, or the reverse."""

    code = "wrong-identity"


class AttestationRequired(EnrollmentError):
    code = "attestation-required"


class ReenrollmentRefused(EnrollmentError):
    code = "reenrollment-refused"


class DeviceNotAllowed(EnrollmentError):
    """Unknown or revoked device."""

    code = "device-not-allowed"


class UnknownDeviceType(EnrollmentError):
    code = "unknown-device-type"


@dataclass
class EnrollmentService:
    ca: CertificateAuthority
    attestation: AttestationService
    policy: Policy
    configs: ConfigTemplates
    clock: Callable[[], datetime]
    # makes the use of a verdict and the issuance one transaction (the registry's `transaction`):
    # a verdict is used up exactly when a certificate is issued, and one commit instead of two
    atomic: Callable[[], ContextManager] = nullcontext

    # -- helpers -------------------------------------------------------------------------------

    def _decision(self, action: str, who: PeerIdentity | None, result: str, **details) -> None:
        if not log.isEnabledFor(logging.INFO):
            return
        line = {"event": action, "result": result}
        if who is not None:
            line.update(serial=who.serial, kind=who.kind, fingerprint=who.fingerprint)
        line.update({k: v for k, v in details.items() if v is not None})
        log.info(json.dumps(line))

    def _require(self, action: str, who: PeerIdentity | None, kind: str, *,
                 enrolled_factory: bool = False) -> DeviceRecord:
        """The device record of `who` if it may do `action` with its `kind` identity. With
        `enrolled_factory`, the factory identity of an enrolled device is accepted too."""
        if who is None:
            self._decision(action, None, "refused", reason="no device identity")
            raise NotAuthenticated("a device certificate is required")
        device = self.ca.store.get_device(who.serial)
        if who.kind != kind and not (enrolled_factory and who.kind == FACTORY and device is not None
                                     and device.state is DeviceState.ENROLLED):
            self._decision(action, who, "refused", reason=f"needs the {kind} identity")
            raise WrongIdentity(f"this needs the device's {kind} identity, not its {who.kind} one")
        if device is None or device.state is DeviceState.REVOKED:
            self._decision(action, who, "refused", reason="device unknown or revoked")
            raise DeviceNotAllowed(f"device {who.serial} is not allowed")
        return device

    def _attesting(self, who: PeerIdentity) -> AttestingDevice:
        return AttestingDevice(who.serial, who.device_type, who.fingerprint, who.public_key)

    # -- attestation ----------------------------------------------------------------------------

    def nonce(self, who: PeerIdentity | None) -> NonceRecord:
        self._require("nonce", who, FACTORY)
        record = self.attestation.issue_nonce(who.serial, who.fingerprint)
        self._decision("nonce", who, "issued", expires=record.expires_at.isoformat())
        return record

    def evidence(self, who: PeerIdentity | None, token: bytes) -> Evaluation:
        self._require("evidence", who, FACTORY)
        evaluation = self.attestation.evaluate(token, self._attesting(who))
        verdict = evaluation.appraisal.verdict
        revoked = False
        if verdict.revoke:
            revoke_device(self.ca.store, who.serial, "keyCompromise", self.clock())
            revoked = True
        self._decision("evidence", who, verdict.tier.value, acceptable=verdict.acceptable,
                       reasons=list(verdict.codes) or None, log_seq=evaluation.log_seq,
                       revoked=revoked or None)
        return evaluation

    # -- EST ----------------------------------------------------------------------------------

    def enroll(self, who: PeerIdentity | None, csr: bytes) -> IssuedCertificate:
        """/sen: a first operational certificate (or a re-enrollment) for a factory identity."""
        device = self._require("enroll", who, FACTORY)
        tpolicy = self.policy.for_type(who.device_type)
        if tpolicy is None:
            self._decision("enroll", who, "refused", reason="device type not in policy")
            raise UnknownDeviceType(f"device type {who.device_type} is not in the gateway's policy")
        if device.state is DeviceState.ENROLLED and not tpolicy.reenroll:
            self._decision("enroll", who, "refused", reason="re-enrollment not allowed")
            raise ReenrollmentRefused("device already enrolled; policy does not allow re-enrollment")
        csr = self._check_csr("enroll", who, csr)       # a bad CSR must not use up the verdict
        verdict_seq = None
        with self.atomic():         # nor may a failed issuance
            if tpolicy.attestation != "waived":
                entry = self.attestation.take_verdict(who.serial)
                if entry is None:
                    self._decision("enroll", who, "refused", reason="no acceptable verdict in the window")
                    raise AttestationRequired("send fresh, acceptable attestation evidence first")
                verdict_seq = entry.seq
            issued = self._issue("enroll", who, csr)
        self._decision("enroll", who, "issued", certificate=format(issued.cert.serial_number, "x"),
                       verdict_seq=verdict_seq, attestation=tpolicy.attestation,
                       reenrollment=device.state is DeviceState.ENROLLED or None)
        return issued

    def renew(self, who: PeerIdentity | None, csr: bytes) -> IssuedCertificate:
        """/sren: a new operational certificate for the device of this operational identity."""
        self._require("renew", who, OPERATIONAL)
        issued = self._issue("renew", who, csr)
        self._decision("renew", who, "issued", certificate=format(issued.cert.serial_number, "x"))
        return issued

    def _check_csr(self, action: str, who: PeerIdentity, csr: bytes) -> CheckedKey:
        """Parse and check the CSR once; issuance then takes the checked key."""
        try:
            return self.ca.checked_csr_key(csr)
        except CAError as exc:
            self._decision(action, who, "refused", reason=str(exc))
            raise

    def _issue(self, action: str, who: PeerIdentity, csr: "bytes | CheckedKey") -> IssuedCertificate:
        try:
            return self.ca.issue_operational(csr, who.serial, self.clock())
        except CAError as exc:
            self._decision(action, who, "refused", reason=str(exc))
            raise

    def configuration(self, who: PeerIdentity | None) -> dict:
        # The factory identity of an enrolled device may fetch it too: a device gets its
        # configuration in the session it enrolled in (one DTLS handshake per enrollment).
        self._require("config", who, OPERATIONAL, enrolled_factory=True)
        try:
            config = self.configs.for_device(who.serial, who.device_type)
        except CAError as exc:
            self._decision("config", who, "failed", reason=str(exc))
            raise
        self._decision("config", who, "served", device_type=who.device_type)
        return config
