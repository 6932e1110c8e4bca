"""`devid attest verify-log`: the whole chain, through the sealed segments and the registry.

For each segment the registry has an anchor row for, in order:
- continuity: it starts right after the previous one (entry 1 for the first) and its first
  entry links to the previous segment's head (32 zero bytes for the first);
- if its file is present (in any of the directories searched): the file's SHA-256 equals the
  anchor's, every entry's hash and link, the seal against the entries and the anchor, and the
  seal's signature by a gateway certificate;
- if not: reported as archived (not present); continuity still runs through the anchor row.
Then the registry's entries, which must continue from the last segment's head. Segment files no
anchor row names are problems, except one whose entries are still at the start of the registry
and match it: a rotation that stopped before its transaction (the next rotation records it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from devid.attestation.log import GENESIS, verify_chain
from devid.attestation.segments import SegmentAnchor, check_segment, parse_segment_name

from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.log_rotation import is_segment_file, temporary_files

VERIFIED, BROKEN, ARCHIVED, PENDING, UNRECORDED = "verified", "broken", "archived-not-present", "pending", "unrecorded"


@dataclass
class SegmentResult:
    file: str
    first_seq: int
    last_seq: int
    entries: int
    status: str
    path: Path | None = None

    def as_json(self) -> dict:
        return {"file": self.file, "first_seq": self.first_seq, "last_seq": self.last_seq, "entries": self.entries,
                "status": self.status, "path": str(self.path) if self.path else None}


@dataclass
class LogVerification:
    entries: int = 0                    # entries whose hash was recomputed (registry and present segments)
    registry_entries: int = 0
    head_seq: int = 0
    head_hash: bytes = GENESIS
    segments: list[SegmentResult] = field(default_factory=list)
    problems: list[tuple[int | None, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {"ok": self.ok, "entries": self.entries, "registry_entries": self.registry_entries,
                "head_seq": self.head_seq, "head_hash": self.head_hash.hex(),
                "segments": [s.as_json() for s in self.segments], "notes": self.notes,
                "problems": [{"seq": s, "message": m} for s, m in self.problems]}


def _find_files(directories: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in directories:
        if d.is_dir():
            for p in sorted(d.iterdir()):
                if is_segment_file(p):
                    found.setdefault(p.name, p)
    return found


def verify_log(store: AttestationStore, directories: list[Path], trusted: Callable[[bytes], object], *,
               head: tuple[int, str] | None = None, require_present: bool = False,
               progress: Callable[[int, int], None] | None = None) -> LogVerification:
    report = LogVerification()
    files = _find_files(directories)
    anchors = store.segments()
    span = store.log_span()
    total = (span[2] if span else 0) + sum(a.entries for a in anchors if a.file_name in files)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None and (done % 5000 == 0 or done == total):
            progress(done, total)

    wanted = [head[0]] if head is not None else []
    head_hashes: dict[int, bytes] = {}
    expected, link = 1, GENESIS
    for a in anchors:
        _continuity(report, a, expected, link)
        path = files.get(a.file_name)
        if path is None:
            report.segments.append(SegmentResult(a.file_name, a.first_seq, a.last_seq, a.entries, ARCHIVED))
            if require_present:
                report.problems.append((a.first_seq, f"{a.file_name} (entries {a.first_seq}..{a.last_seq}) is not "
                                                     "present"))
        else:
            before = len(report.problems)
            _check_anchored(report, a, path, trusted, wanted, head_hashes, step)
            report.segments.append(SegmentResult(a.file_name, a.first_seq, a.last_seq, a.entries,
                                                 VERIFIED if len(report.problems) == before else BROKEN, path))
        head_hashes[a.last_seq] = a.head_hash
        expected, link = a.last_seq + 1, a.head_hash

    def registry_entries():
        for e in store.iter_log():
            if e.seq in wanted:
                head_hashes[e.seq] = e.hash
            step(1)
            yield e
    chained = verify_chain(registry_entries(), start_seq=expected, start_hash=link)
    report.registry_entries = chained.entries
    report.entries += chained.entries
    report.head_seq, report.head_hash = chained.head_seq, chained.head_hash
    report.problems.extend(chained.problems)

    recorded = {a.file_name for a in anchors}
    for name, path in files.items():
        if name not in recorded:
            _unrecorded(report, store, name, path, trusted, span)
    for d in directories:
        for tmp in temporary_files(d):
            report.notes.append(f"{tmp}: left by a rotation that stopped while writing it (the next rotation "
                                "removes it)")
    if head is not None:
        _check_head(report, head, head_hashes, anchors, files)
    return report


def _continuity(report: LogVerification, a: SegmentAnchor, expected: int, link: bytes) -> None:
    if a.first_seq > expected:
        report.problems.append((expected, f"entries {expected}..{a.first_seq - 1} are in no recorded segment "
                                          "(anchor row deleted?)"))
    elif a.first_seq < expected:
        report.problems.append((a.first_seq, f"{a.file_name} overlaps the segment before it"))
    elif a.prev_hash != link:
        report.problems.append((a.first_seq, f"{a.file_name} does not link to the segment before it "
                                             "(anchor row changed?)"))


def _check_anchored(report, a: SegmentAnchor, path: Path, trusted, wanted, head_hashes, step) -> None:
    try:
        with open(path, "rb") as f:
            check = check_segment(f, a.file_name, trusted=trusted, start=(a.first_seq, a.prev_hash), want=wanted,
                                  progress=step)
    except OSError as exc:
        report.problems.append((a.first_seq, f"{path}: cannot read: {exc.strerror}"))
        return
    report.entries += check.entries
    head_hashes.update(check.hashes)
    if check.file_sha256 != a.file_sha256:
        report.problems.append((a.first_seq, f"{a.file_name}: the file changed after it was sealed (its SHA-256 is "
                                             "not the one the registry recorded)"))
    report.problems.extend((s if s is not None else a.first_seq, m) for s, m in check.problems)
    seal = check.seal
    if seal is not None and (seal.first_seq, seal.last_seq, seal.entries, seal.head_hash) != \
            (a.first_seq, a.last_seq, a.entries, a.head_hash.hex()):
        report.problems.append((a.first_seq, f"{a.file_name}: the seal does not describe the range the registry "
                                             "recorded for this file"))


def _unrecorded(report, store, name: str, path: Path, trusted, span) -> None:
    first, last = parse_segment_name(name)
    with open(path, "rb") as f:
        check = check_segment(f, name, trusted=trusted)
    in_registry = span is not None and span[0] == first and last <= span[1]
    entry = store.entry(last) if in_registry else None
    if check.ok and entry is not None and entry.hash == check.head_hash and check.first_seq == first:
        report.segments.append(SegmentResult(name, first, last, check.entries, PENDING, path))
        report.notes.append(f"{name}: sealed by a rotation that stopped before recording it; its entries are still "
                            "in the registry (the next 'devid attest log rotate' records it)")
        return
    report.segments.append(SegmentResult(name, first, last, check.entries, UNRECORDED, path))
    report.problems.append((first, f"{name}: a segment file the registry has no anchor row for "
                                   "(anchor row deleted, or a file from elsewhere?)"))


def _check_head(report, head: tuple[int, str], hashes: dict[int, bytes], anchors, files) -> None:
    seq, want = head
    found = hashes.get(seq)
    if found is None:
        inside = next((a for a in anchors if a.first_seq <= seq <= a.last_seq), None)
        if inside is not None and inside.file_name not in files:
            report.notes.append(f"recorded head entry {seq} is in {inside.file_name}, archived (not present): "
                                "not checked")
        else:
            report.problems.append((seq, f"recorded head entry {seq} is no longer in the log (truncated?)"))
    elif found.hex() != want:
        report.problems.append((seq, f"entry {seq} has hash {found.hex()}, not the recorded {want}"))


__all__ = ["ARCHIVED", "BROKEN", "LogVerification", "PENDING", "SegmentResult", "UNRECORDED", "VERIFIED",
           "verify_log"]
