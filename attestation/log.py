"""The attestation log: every appraisal, appended with a sequence number and a hash chain.

Each entry's hash is SHA-256 over a canonical JSON document of the entry (keys sorted, no
spaces, UTF-8) that includes the previous entry's hash and the SHA-256 of the raw evidence:

    hash(n) = SHA-256(canonical_json({"v": 1, "seq": n, "time": ..., "device": ..., "device_type": ...,
                                      "fingerprint": ..., "tier": ..., "acceptable": ..., "revoke": ...,
                                      "reasons": [...], "claims": {...} | null,
                                      "evidence_sha256": hex, "prev": hex(hash(n - 1))}))
    hash(0) = 32 zero bytes

`verify_chain` recomputes every hash from the stored fields and the stored evidence, so an
edited field, a removed entry (a gap in the sequence, or a broken link) and reordered entries
are all found. Truncating the *end* of the log leaves a valid shorter chain: compare the head
(`seq`, `hash`) with one recorded elsewhere (`devid attest verify-log --head SEQ:HASH`).

Appending is serialised by the store: reading the head and inserting the new entry happen in one
transaction (`LogStore.append_entry`), so concurrent gateways cannot fork the chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol

from .policy import Tier
from .verifier import Appraisal, Reason

GENESIS = bytes(32)
FORMAT_VERSION = 1
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_time(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(s: str) -> datetime:
    return datetime.strptime(s, TIME_FORMAT).replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class LogEntry:
    seq: int
    time: str                       # TIME_FORMAT, UTC, fixed width (sorts as text)
    device_serial: str
    device_type: str
    cert_fingerprint: str
    tier: Tier
    acceptable: bool
    revoke: bool
    reasons: tuple[dict[str, str], ...]     # {"code", "tier", "message"}
    claims: dict[str, Any] | None
    evidence: bytes
    prev_hash: bytes
    hash: bytes = field(default=b"")

    def body(self) -> dict[str, Any]:
        return {"v": FORMAT_VERSION, "seq": self.seq, "time": self.time, "device": self.device_serial,
                "device_type": self.device_type, "fingerprint": self.cert_fingerprint, "tier": self.tier.value,
                "acceptable": self.acceptable, "revoke": self.revoke, "reasons": list(self.reasons),
                "claims": self.claims, "evidence_sha256": hashlib.sha256(self.evidence).hexdigest(),
                "prev": self.prev_hash.hex()}

    def compute_hash(self) -> bytes:
        return hashlib.sha256(canonical_json(self.body())).digest()

    @property
    def codes(self) -> list[str]:
        return [r["code"] for r in self.reasons]

    def as_json(self) -> dict[str, Any]:
        d = self.body()
        del d["v"]
        d["evidence"] = self.evidence.hex()
        d["hash"] = self.hash.hex()
        return d


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_from_appraisal(a: Appraisal, seq: int, prev_hash: bytes) -> LogEntry:
    e = LogEntry(seq=seq, time=format_time(a.time), device_serial=a.device.serial, device_type=a.device.device_type,
                 cert_fingerprint=a.device.cert_fingerprint, tier=a.verdict.tier, acceptable=a.verdict.acceptable,
                 revoke=a.verdict.revoke, reasons=tuple(r.as_json() for r in a.verdict.reasons),
                 claims=a.evidence.as_json() if a.evidence is not None else None, evidence=a.token,
                 prev_hash=prev_hash)
    # the claims go through JSON once, so that the entry hashes the same before and after storage
    e = LogEntry(**{**e.__dict__, "claims": json.loads(canonical_json(e.claims))})
    return LogEntry(**{**e.__dict__, "hash": e.compute_hash()})


class LogStore(Protocol):
    def append_entry(self, build: Callable[[int, bytes], LogEntry]) -> LogEntry:
        """In one serialised transaction: read the head (last seq, last hash; 0 and GENESIS for an
        empty log), call build(head_seq + 1, head_hash), insert what it returns."""

    def log_entries(self, *, device_serial: str | None = None, tier: Tier | None = None,
                    since: datetime | None = None, limit: int | None = None) -> list[LogEntry]:
        """Matching entries in sequence order; with `limit`, the newest `limit` of them."""

    def iter_log(self) -> Iterator[LogEntry]:
        """Every entry, in sequence order."""

    def take_verdict(self, device_serial: str, since: datetime, now: datetime, purpose: str) -> LogEntry | None:
        """The device's latest verdict at or after `since`, if it is acceptable and was never
        taken before: marked taken in the same transaction (one verdict, one enrollment)."""


class AttestationLog:
    def __init__(self, store: LogStore) -> None:
        self.store = store

    def append(self, appraisal: Appraisal) -> LogEntry:
        return self.store.append_entry(lambda seq, prev: entry_from_appraisal(appraisal, seq, prev))


@dataclass
class ChainReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: bytes = GENESIS
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(entries: Iterable[LogEntry], *, max_problems: int = 100) -> ChainReport:
    report = ChainReport()
    expected, prev = 1, GENESIS
    for e in entries:
        report.entries += 1
        if e.seq != expected:
            if e.seq > expected:
                missing = f"entry {expected}" if e.seq == expected + 1 else f"entries {expected}..{e.seq - 1}"
                report.problems.append((expected, f"{missing} missing (removed?)"))
            else:
                report.problems.append((e.seq, f"entry {e.seq} out of order after {expected - 1}"))
        if e.compute_hash() != e.hash:
            report.problems.append((e.seq, f"entry {e.seq} was modified: its hash does not match its content"))
        if e.prev_hash != prev:
            report.problems.append((e.seq, f"entry {e.seq} does not link to the entry before it "
                                           "(an entry was removed, inserted or reordered)"))
        prev, expected = e.hash, e.seq + 1
        report.head_seq, report.head_hash = e.seq, e.hash
        if len(report.problems) >= max_problems:
            break
    return report


class MemoryLogStore:
    """`LogStore` in a list, for one process (tests, simulators)."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self.taken: set[int] = set()

    def append_entry(self, build):
        head_seq, head = (self.entries[-1].seq, self.entries[-1].hash) if self.entries else (0, GENESIS)
        e = build(head_seq + 1, head)
        self.entries.append(e)
        return e

    def log_entries(self, *, device_serial=None, tier=None, since=None, limit=None):
        out = [e for e in self.entries if (device_serial is None or e.device_serial == device_serial)
               and (tier is None or e.tier is tier) and (since is None or e.time >= format_time(since))]
        return out[-limit:] if limit else out

    def iter_log(self):
        return iter(list(self.entries))

    def take_verdict(self, device_serial, since, now, purpose):
        mine = [e for e in self.entries if e.device_serial == device_serial and e.time >= format_time(since)]
        if not mine or not mine[-1].acceptable or mine[-1].seq in self.taken:
            return None
        self.taken.add(mine[-1].seq)
        return mine[-1]


__all__ = ["AttestationLog", "ChainReport", "GENESIS", "LogEntry", "LogStore", "MemoryLogStore", "Reason",
           "canonical_json", "entry_from_appraisal", "format_time", "parse_time", "verify_chain"]
