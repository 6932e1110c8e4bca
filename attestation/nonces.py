"""Attestation nonces: random, single-use, bound to the device they were issued to, short-lived.

The gateway issues a nonce to an authenticated device (`issue`), the device puts it in its
evidence as eat_nonce, and the verifier consumes it (`consume`) exactly once. Consumption is a
compare-and-swap in the store ("mark used where unused, unexpired and issued to this device"),
so two gateway processes sharing a database can never both accept the same nonce.

A device holds at most `max_outstanding` unconsumed nonces: storing one more deletes its oldest
unconsumed one in the same transaction, so a device asking for nonces in a loop cannot grow the
store (a displaced nonce is then unknown, like one never issued).

Clock and randomness are passed in; storage is any `NonceStore`.

These are *server nonces*. The other kind, the *session nonce*, is no business of this module's
store: it is the exporter value of the DTLS session the evidence arrives in (docs/evidence.md),
which the gateway passes to the verifier as a value (`AttestingDevice.session_nonce`). `SERVER`
and `SESSION` name the two kinds in verdicts and log entries.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable, Protocol

from .errors import NonceExpired, NonceReplayed, NonceUnknown, NonceWrongDevice

DEFAULT_LIFETIME = timedelta(seconds=60)
DEFAULT_SIZE = 16          # bytes; RFC 9711 allows 8 to 64, we never issue fewer than 16
MIN_SIZE, MAX_SIZE = 16, 64
# consumed and expired nonces are kept this long after expiry, so that a late replay is still
# reported as a replay (or expiry) rather than as an unknown nonce
DEFAULT_RETENTION = timedelta(hours=1)
# unconsumed nonces a device may hold; a device needs one per enrollment
DEFAULT_MAX_OUTSTANDING = 4

# the kinds of nonce evidence can carry (Verdict.nonce, LogEntry.nonce)
SERVER = "server"       # issued by GET /attest/nonce, stored, consumed in the store
SESSION = "session"     # the session's exporter value: no round trip, no row


class SessionNonce:
    """The session-bound nonce of the DTLS session evidence arrived in: its value (the session's
    exporter value), its age (since the handshake that made it: it expires with the policy's
    nonce lifetime, as a server nonce does) and its one use, claimed by the verifier at the moment
    it decides the evidence is fresh (nothing that happens after can leave it unclaimed)."""

    def __init__(self, value: bytes, age: timedelta, used: bool = False) -> None:
        self.value = value
        self.age = age
        self.used = used

    def claim(self) -> bool:
        """Mark the one use; False if it was used before."""
        if self.used:
            return False
        self.used = True
        return True

    def release(self) -> None:
        """Undo a claim whose use left no trace: the caller recorded nothing with it (the
        enrollment the evidence backed rolled back whole, its verdict included), so the one use
        never happened and the device may send the evidence again in this session."""
        self.used = False


@dataclass(frozen=True)
class NonceRecord:
    value: bytes
    device_serial: str
    cert_fingerprint: str           # SHA-256 of the certificate the device authenticated with
    issued_at: datetime
    expires_at: datetime
    session: bytes | None = None    # e.g. the DTLS session or connection id; None: not bound


class ConsumeResult(str, enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    WRONG_DEVICE = "wrong-device"
    WRONG_SESSION = "wrong-session"


class NonceStore(Protocol):
    def put_nonce(self, record: NonceRecord, *, purge_before: datetime, max_outstanding: int | None = None) -> bool:
        """Store a new nonce; False if the value already exists. Nonces that expired before
        `purge_before` may be deleted in the same transaction. With `max_outstanding`, the
        device's oldest unconsumed nonces (by issue time) are deleted in the same transaction
        until it holds at most that many, the new one included."""

    def consume_nonce(self, value: bytes, device_serial: str, cert_fingerprint: str, session: bytes | None,
                      now: datetime) -> ConsumeResult:
        """Atomically mark the nonce used if it exists, is unused, unexpired at `now` and was
        issued to this device, certificate (and session, if it was bound to one). Otherwise
        leave it untouched and say why. Exactly one concurrent caller can get OK."""


class NonceService:
    def __init__(self, store: NonceStore, *, clock: Callable[[], datetime],
                 rand_bytes: Callable[[int], bytes] = os.urandom, lifetime: timedelta = DEFAULT_LIFETIME,
                 size: int = DEFAULT_SIZE, retention: timedelta = DEFAULT_RETENTION,
                 max_outstanding: int | None = DEFAULT_MAX_OUTSTANDING) -> None:
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise ValueError(f"nonce size must be {MIN_SIZE} to {MAX_SIZE} bytes")
        if lifetime <= timedelta(0):
            raise ValueError("nonce lifetime must be positive")
        if max_outstanding is not None and max_outstanding < 1:
            raise ValueError("max_outstanding must be at least 1 (or None: no cap)")
        self.store = store
        self.clock = clock
        self.rand_bytes = rand_bytes
        self.lifetime = lifetime
        self.size = size
        self.retention = retention
        self.max_outstanding = max_outstanding

    def issue(self, device_serial: str, cert_fingerprint: str, session: bytes | None = None) -> NonceRecord:
        now = self.clock()
        for _ in range(4):
            value = self.rand_bytes(self.size)
            if len(value) != self.size:
                raise ValueError("the random source returned a short read")
            record = NonceRecord(value, device_serial, cert_fingerprint, now, now + self.lifetime, session)
            if self.store.put_nonce(record, purge_before=now - self.retention, max_outstanding=self.max_outstanding):
                return record
        raise RuntimeError("the random source keeps repeating itself: refusing to issue nonces")

    def consume(self, value: bytes, device_serial: str, cert_fingerprint: str, session: bytes | None = None,
                now: datetime | None = None) -> None:
        """Use the nonce once, or raise the named reason it cannot be used."""
        result = self.store.consume_nonce(value, device_serial, cert_fingerprint, session,
                                          now if now is not None else self.clock())
        if result is ConsumeResult.OK:
            return
        if result is ConsumeResult.UNKNOWN:
            raise NonceUnknown("nonce was not issued by this gateway (or is long gone)")
        if result is ConsumeResult.REPLAYED:
            raise NonceReplayed("nonce has already been used")
        if result is ConsumeResult.EXPIRED:
            raise NonceExpired(f"nonce has expired (lifetime {self.lifetime.total_seconds():g} s)")
        if result is ConsumeResult.WRONG_SESSION:
            raise NonceWrongDevice("nonce was issued on another session")
        raise NonceWrongDevice("nonce was issued to another device or certificate")


class MemoryNonceStore:
    """`NonceStore` in a dict, for one process (tests, simulators)."""

    def __init__(self) -> None:
        self._nonces: dict[bytes, tuple[NonceRecord, bool]] = {}
        self._outstanding: dict[str, list[bytes]] = {}     # device -> its unconsumed nonces, oldest first
        self._purged: datetime | None = None

    def put_nonce(self, record: NonceRecord, *, purge_before: datetime, max_outstanding: int | None = None) -> bool:
        if self._purged is None or purge_before > self._purged:
            self._purged = purge_before
            for k in [k for k, (r, _) in self._nonces.items() if r.expires_at < purge_before]:
                self._forget(k)
        if record.value in self._nonces:
            return False
        self._nonces[record.value] = (record, False)
        mine = self._outstanding.setdefault(record.device_serial, [])
        mine.append(record.value)
        if max_outstanding is not None:
            for old in mine[:-max_outstanding]:
                del self._nonces[old]
            del mine[:-max_outstanding]
        return True

    def _forget(self, value: bytes) -> None:
        record, used = self._nonces.pop(value)
        if not used:
            self._unlist(record.device_serial, value)

    def _unlist(self, device_serial: str, value: bytes) -> None:
        mine = self._outstanding.get(device_serial)
        if mine is not None:
            mine.remove(value)
            if not mine:
                del self._outstanding[device_serial]

    def outstanding(self, device_serial: str) -> int:
        return len(self._outstanding.get(device_serial, ()))

    def consume_nonce(self, value, device_serial, cert_fingerprint, session, now) -> ConsumeResult:
        entry = self._nonces.get(value)
        if entry is None:
            return ConsumeResult.UNKNOWN
        record, used = entry
        result = classify(record, used, device_serial, cert_fingerprint, session, now)
        if result is ConsumeResult.OK:
            self._nonces[value] = (record, True)
            self._unlist(record.device_serial, value)
        return result


def classify(record: NonceRecord, used: bool, device_serial: str, cert_fingerprint: str,
             session: bytes | None, now: datetime) -> ConsumeResult:
    """Why a nonce can or cannot be used; the order of the checks is part of the contract:
    wrong device before replay before expiry (a nonce is never consumed for another device)."""
    if record.device_serial != device_serial or record.cert_fingerprint != cert_fingerprint:
        return ConsumeResult.WRONG_DEVICE
    if record.session is not None and record.session != session:
        return ConsumeResult.WRONG_SESSION
    if used:
        return ConsumeResult.REPLAYED
    if now >= record.expires_at:
        return ConsumeResult.EXPIRED
    return ConsumeResult.OK
