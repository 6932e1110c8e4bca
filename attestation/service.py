"""What the gateway calls: issue a nonce, evaluate evidence (appraise + log), and take an
acceptable verdict once for an enrollment. Still no network I/O: the CoAP resources call these."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from .log import AttestationLog, LogEntry, LogStore
from .log_budget import LogBudget, admit
from .nonces import DEFAULT_MAX_OUTSTANDING, NonceRecord, NonceService, NonceStore
from .policy import Policy
from .verifier import Appraisal, AttestingDevice, Verifier


@dataclass(frozen=True)
class Evaluation:
    appraisal: Appraisal
    entry: LogEntry | None          # None: refused beyond the device's log budget, only counted

    @property
    def log_seq(self) -> int | None:
        return self.entry.seq if self.entry is not None else None


class AttestationService:
    def __init__(self, policy: Policy, nonce_store: NonceStore, log_store: LogStore, *,
                 clock: Callable[[], datetime], rand_bytes: Callable[[int], bytes] = os.urandom,
                 max_outstanding_nonces: int | None = DEFAULT_MAX_OUTSTANDING,
                 log_budget: LogBudget = LogBudget()) -> None:
        self.policy = policy
        self.log_budget = log_budget
        self.clock = clock
        self.nonces = NonceService(nonce_store, clock=clock, rand_bytes=rand_bytes, lifetime=policy.nonce_lifetime,
                                   max_outstanding=max_outstanding_nonces)
        self.verifier = Verifier(policy, self.nonces, clock=clock)
        self.log = AttestationLog(log_store)

    def use_policy(self, policy: Policy) -> None:
        """Appraise with `policy` from now on (a reload); nonces already issued keep their expiry."""
        self.policy = policy
        self.verifier.policy = policy
        self.nonces.lifetime = policy.nonce_lifetime

    def issue_nonce(self, device_serial: str, cert_fingerprint: str, session: bytes | None = None) -> NonceRecord:
        return self.nonces.issue(device_serial, cert_fingerprint, session)

    def evaluate(self, token: bytes, device: AttestingDevice) -> Evaluation:
        """Appraise the evidence and log the result: acceptable and revoking verdicts always, refused
        ones within the device's `LogBudget` (beyond it they are counted, and a summary entry
        stands for them: `entry` is None)."""
        return self.record(self.appraise(token, device))

    def appraise(self, token: bytes, device: AttestingDevice) -> Appraisal:
        """The appraisal alone (`record` logs it): a session nonce writes nothing, so a caller can
        appraise before it opens the transaction that records the verdict with what it decides."""
        return self.verifier.appraise(token, device, self.clock())

    def record(self, appraisal: Appraisal, used_for: str | None = None) -> Evaluation:
        """Log an appraisal as `evaluate` does. `used_for`: an acceptable verdict is taken for that
        purpose in the same transaction (evidence that came with its CSR serves that request only,
        and no later `take_verdict`)."""
        budget = self.log_budget
        return Evaluation(appraisal, self.log.append(appraisal, lambda tally: admit(tally, appraisal, budget),
                                                     used_for=used_for))

    def take_verdict(self, device_serial: str, purpose: str = "enrollment") -> LogEntry | None:
        """The device's latest verdict within the policy's verdict window, if acceptable and not
        used before; it is marked used, so one verdict serves one enrollment."""
        now = self.clock()
        return self.log.store.take_verdict(device_serial, now - self.policy.verdict_window, now, purpose)
