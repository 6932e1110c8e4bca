"""The attestation log: appraisals (refused ones within a per-device budget), appended with a
sequence number and a hash chain.

Each entry's hash is SHA-256 over a canonical JSON document of the entry (keys sorted, no
spaces, UTF-8) that includes the previous entry's hash and the SHA-256 of the raw evidence:

    hash(n) = SHA-256(canonical_json({"v": 1, "seq": n, "time": ..., "device": ..., "device_type": ...,
                                      "fingerprint": ..., "tier": ..., "acceptable": ..., "revoke": ...,
                                      "reasons": [...], "claims": {...} | null,
                                      "evidence_sha256": hex, "prev": hex(hash(n - 1))}))
    hash(0) = 32 zero bytes

A second kind of entry summarises refused evidence that the per-device budget kept out of the
log (attestation/log_budget.py): "N more refused evidence messages from this device between T1
and T2", with counts by reason code. Its hash covers

    {"v": 1, "kind": "refused-summary", "seq", "time", "device", "device_type", "fingerprint",
     "tier" (the worst of them), "acceptable": false, "count", "first", "last",
     "reason_counts": {code: n}, "prev"}

and it is chained like any other entry. Appraisal entries hash exactly as before (no "kind" in
their hashed document), so logs written before summaries existed still verify.

An appraisal entry records which kind of nonce its evidence carried (`nonce`: "session", the DTLS
session's exporter value, or "server", one from GET /attest/nonce; docs/evidence.md). Its hashed
document then has `"nonce": kind` too, so the kind cannot be edited unseen; entries without a
kind (written before kinds were recorded, or evidence that could not be decoded) hash without
the key, exactly as before.

`verify_chain` recomputes every hash from the stored fields and the stored evidence, so an
edited field, a removed entry (a gap in the sequence, or a broken link) and reordered entries
are all found. Old entries can be moved into sealed segment files (attestation/segments.py);
the chain continues across them, so `verify_chain` takes where to start (`start_seq`,
`start_hash`: the last segment's head). Truncating the *end* of the log leaves a valid shorter
chain: compare the head (`seq`, `hash`) with one recorded elsewhere
(`devid attest verify-log --head SEQ:HASH`).

Appending is serialised by the store: reading the head and inserting the new entry happen in one
transaction (`LogStore.append_entry`), so concurrent gateways cannot fork the chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
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


KIND_APPRAISAL = "appraisal"
KIND_SUMMARY = "refused-summary"


@dataclass(frozen=True)
class RefusedSummary:
    """What a summary entry says: `count` refused appraisals between `first` and `last`."""

    count: int
    first: str                                  # TIME_FORMAT
    last: str
    reason_counts: tuple[tuple[str, int], ...]  # (code, how many of them had it), sorted by code

    def counts(self) -> dict[str, int]:
        return dict(self.reason_counts)


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
    summary: RefusedSummary | None = None   # set on summary entries only
    nonce: str | None = None                # appraisal entries: the kind of nonce ("session", "server")

    @property
    def kind(self) -> str:
        return KIND_APPRAISAL if self.summary is None else KIND_SUMMARY

    def body(self) -> dict[str, Any]:
        if self.summary is not None:
            s = self.summary
            return {"v": FORMAT_VERSION, "kind": KIND_SUMMARY, "seq": self.seq, "time": self.time,
                    "device": self.device_serial, "device_type": self.device_type,
                    "fingerprint": self.cert_fingerprint, "tier": self.tier.value, "acceptable": self.acceptable,
                    "count": s.count, "first": s.first, "last": s.last, "reason_counts": s.counts(),
                    "prev": self.prev_hash.hex()}
        body = {"v": FORMAT_VERSION, "seq": self.seq, "time": self.time, "device": self.device_serial,
                "device_type": self.device_type, "fingerprint": self.cert_fingerprint, "tier": self.tier.value,
                "acceptable": self.acceptable, "revoke": self.revoke, "reasons": list(self.reasons),
                "claims": self.claims, "evidence_sha256": hashlib.sha256(self.evidence).hexdigest(),
                "prev": self.prev_hash.hex()}
        if self.nonce is not None:
            body["nonce"] = self.nonce
        return body

    def compute_hash(self) -> bytes:
        return hashlib.sha256(canonical_json(self.body())).digest()

    @property
    def codes(self) -> list[str]:
        if self.summary is not None:
            return [code for code, _ in self.summary.reason_counts]
        return [r["code"] for r in self.reasons]

    def as_json(self) -> dict[str, Any]:
        d = self.body()
        del d["v"]
        if self.summary is None:
            d = {"kind": KIND_APPRAISAL, **d, "evidence": self.evidence.hex()}
        d["hash"] = self.hash.hex()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LogEntry":
        """The entry `as_json` wrote (a line of a segment file). Values are taken as they are, so
        that an edited one changes the hash; ValueError, KeyError or TypeError if it cannot be
        an entry at all."""
        common = dict(seq=d["seq"], time=d["time"], device_serial=d["device"], device_type=d["device_type"],
                      cert_fingerprint=d["fingerprint"], tier=Tier(d["tier"]), prev_hash=bytes.fromhex(d["prev"]),
                      hash=bytes.fromhex(d["hash"]))
        if not isinstance(d["seq"], int):
            raise TypeError("seq is not an integer")
        kind = d.get("kind", KIND_APPRAISAL)
        if kind == KIND_SUMMARY:
            counts = d["reason_counts"]
            summary = RefusedSummary(d["count"], d["first"], d["last"], tuple(sorted(counts.items())))
            return cls(**common, acceptable=d["acceptable"], revoke=False, reasons=(), claims=None, evidence=b"",
                       summary=summary)
        if kind != KIND_APPRAISAL:
            raise ValueError(f"unknown entry kind {kind!r}")
        return cls(**common, acceptable=d["acceptable"], revoke=d["revoke"], reasons=tuple(d["reasons"]),
                   claims=d["claims"], evidence=bytes.fromhex(d["evidence"]), nonce=d.get("nonce"))


@dataclass(frozen=True)
class RefusedTally:
    """One device's refused appraisals in its current budget window: the gateway keeps one per
    device that had refused evidence recently (attestation/log_budget.py decides what changes)."""

    window_end: str                 # TIME_FORMAT: the window closes at this time
    logged: int                     # refused appraisals appended in full in this window
    suppressed: int = 0             # refused appraisals not appended since the last summary
    first: str | None = None        # time of the first and the last of those
    last: str | None = None
    reason_counts: tuple[tuple[str, int], ...] = ()
    device_type: str = ""           # of the last suppressed appraisal
    cert_fingerprint: str = ""
    tier: Tier = Tier.CONTRAINDICATED   # the worst tier among the suppressed


@dataclass(frozen=True)
class Admission:
    """What to do with one appraisal, given the device's tally: append a summary of
    `summarise` first (if set), append the appraisal (if `append`), then store `tally` (None:
    delete the device's row) if `write`."""

    append: bool
    time: str                               # TIME_FORMAT: of the appraisal, and of the summary (if any)
    summarise: RefusedTally | None = None
    tally: RefusedTally | None = None
    write: bool = False


def summary_entry(device_serial: str, tally: RefusedTally, seq: int, prev_hash: bytes, time: str) -> LogEntry:
    """The chained entry that stands for `tally.suppressed` refused appraisals."""
    e = LogEntry(seq=seq, time=time, device_serial=device_serial, device_type=tally.device_type,
                 cert_fingerprint=tally.cert_fingerprint, tier=tally.tier, acceptable=False, revoke=False,
                 reasons=(), claims=None, evidence=b"", prev_hash=prev_hash,
                 summary=RefusedSummary(tally.suppressed, tally.first or time, tally.last or time,
                                        tally.reason_counts))
    return replace(e, hash=e.compute_hash())


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def entry_from_appraisal(a: Appraisal, seq: int, prev_hash: bytes) -> LogEntry:
    # the claims go through JSON once, so that the entry hashes the same before and after storage
    claims = json.loads(canonical_json(a.evidence.as_json())) if a.evidence is not None else None
    e = LogEntry(seq=seq, time=format_time(a.time), device_serial=a.device.serial, device_type=a.device.device_type,
                 cert_fingerprint=a.device.cert_fingerprint, tier=a.verdict.tier, acceptable=a.verdict.acceptable,
                 revoke=a.verdict.revoke, reasons=tuple(r.as_json() for r in a.verdict.reasons), claims=claims,
                 evidence=a.token, prev_hash=prev_hash, nonce=a.verdict.nonce)
    return replace(e, hash=e.compute_hash())


class LogStore(Protocol):
    def append_entry(self, build: Callable[[int, bytes], LogEntry], *, device_serial: str | None = None,
                     admit: Callable[[RefusedTally | None], Admission] | None = None,
                     used_for: str | None = None, now: datetime | None = None) -> LogEntry | None:
        """In one serialised transaction: read the head (last seq, last hash; after a rotation that
        emptied the registry, the last segment's head; 0 and GENESIS for an empty log). Without
        `admit`, call build(head_seq + 1, head_hash) and insert what it returns. With it, read the
        device's tally too and do what `admit(tally)` says (`Admission`): the appended entry, or
        None when the appraisal was only counted. `used_for`: an acceptable entry appended is
        taken at once for that purpose at `now` (as `take_verdict` takes one), in the same
        transaction: the verdict of evidence that came with its CSR serves that request only."""

    def flush_refused(self, now: datetime) -> list[LogEntry]:
        """Append a summary entry for every device with suppressed appraisals; drop tallies
        whose window has closed. Returns the summaries."""

    def refused_tallies(self) -> dict[str, RefusedTally]:
        """The tallies kept now, by device serial."""

    def log_entries(self, *, device_serial: str | None = None, tier: Tier | None = None,
                    since: datetime | None = None, limit: int | None = None) -> list[LogEntry]:
        """Matching entries in sequence order; with `limit`, the newest `limit` of them."""

    def iter_log(self) -> Iterator[LogEntry]:
        """Every entry, in sequence order."""

    def take_verdict(self, device_serial: str, since: datetime, now: datetime, purpose: str) -> LogEntry | None:
        """The device's latest verdict at or after `since`, if it is acceptable and was never
        taken before: marked taken in the same transaction (one verdict, one enrollment). A
        device with suppressed (refused, not yet summarised) appraisals has a refused latest
        verdict: None."""


class AttestationLog:
    def __init__(self, store: LogStore) -> None:
        self.store = store

    def append(self, appraisal: Appraisal,
               admit: Callable[[RefusedTally | None], Admission] | None = None,
               used_for: str | None = None) -> LogEntry | None:
        if used_for is None:        # (stores written before `used_for` need not know it)
            return self.store.append_entry(lambda seq, prev: entry_from_appraisal(appraisal, seq, prev),
                                           device_serial=appraisal.device.serial, admit=admit)
        return self.store.append_entry(lambda seq, prev: entry_from_appraisal(appraisal, seq, prev),
                                       device_serial=appraisal.device.serial, admit=admit, used_for=used_for,
                                       now=appraisal.time)


@dataclass
class ChainReport:
    entries: int = 0
    head_seq: int = 0
    head_hash: bytes = GENESIS
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(entries: Iterable[LogEntry], *, start_seq: int = 1, start_hash: bytes = GENESIS,
                 max_problems: int = 100) -> ChainReport:
    """Check that `entries` continue a chain whose next entry is `start_seq`, linking to
    `start_hash` (the start of the log, or the head of the last segment before them)."""
    report = ChainReport(head_seq=start_seq - 1, head_hash=start_hash)
    expected, prev = start_seq, start_hash
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
        self.tallies: dict[str, RefusedTally] = {}

    def _add(self, build: Callable[[int, bytes], LogEntry]) -> LogEntry:
        head_seq, head = (self.entries[-1].seq, self.entries[-1].hash) if self.entries else (0, GENESIS)
        e = build(head_seq + 1, head)
        self.entries.append(e)
        return e

    def append_entry(self, build, *, device_serial=None, admit=None, used_for=None, now=None):
        if admit is None:
            e = self._add(build)
        else:
            adm = admit(self.tallies.get(device_serial))
            if adm.summarise is not None:
                self._add(lambda seq, prev: summary_entry(device_serial, adm.summarise, seq, prev, adm.time))
            e = self._add(build) if adm.append else None
            if adm.write:
                if adm.tally is None:
                    self.tallies.pop(device_serial, None)
                else:
                    self.tallies[device_serial] = adm.tally
        if used_for is not None and e is not None and e.acceptable:
            self.taken.add(e.seq)
        return e

    def flush_refused(self, now):
        t, out = format_time(now), []
        for serial, tally in sorted(self.tallies.items()):
            if tally.suppressed:
                out.append(self._add(lambda seq, prev: summary_entry(serial, tally, seq, prev, t)))
            if tally.window_end <= t:
                del self.tallies[serial]
            elif tally.suppressed:
                self.tallies[serial] = RefusedTally(tally.window_end, tally.logged)
        return out

    def refused_tallies(self):
        return dict(self.tallies)

    def log_entries(self, *, device_serial=None, tier=None, since=None, limit=None):
        out = [e for e in self.entries if (device_serial is None or e.device_serial == device_serial)
               and (tier is None or e.tier is tier) and (since is None or e.time >= format_time(since))]
        return out[-limit:] if limit else out

    def iter_log(self):
        return iter(list(self.entries))

    def take_verdict(self, device_serial, since, now, purpose):
        tally = self.tallies.get(device_serial)
        if tally is not None and tally.suppressed:
            return None
        mine = [e for e in self.entries if e.device_serial == device_serial and e.time >= format_time(since)]
        if not mine or not mine[-1].acceptable or mine[-1].seq in self.taken:
            return None
        self.taken.add(mine[-1].seq)
        return mine[-1]


__all__ = ["Admission", "AttestationLog", "ChainReport", "GENESIS", "KIND_APPRAISAL", "KIND_SUMMARY", "LogEntry",
           "LogStore", "MemoryLogStore", "Reason", "RefusedSummary", "RefusedTally", "canonical_json",
           "entry_from_appraisal", "format_time", "parse_time", "summary_entry", "verify_chain"]
