"""Rotation of the attestation log into sealed segment files (`devid attest log rotate`).

    DATA/attestation-log/attestation-log-<first seq>-<last seq>.jsonl     (format: attestation/segments.py)

A rotation moves the oldest entries of the registry's log, never one inside the policy's
verdict window (so never a verdict that enrollment could still take), into segment files of at
most `segment_entries` entries, each in two steps:

1. `write_segment`: the entries (each checked against the chain: a tampered registry is never
   sealed) and the seal, signed with the gateway's key, go to a temporary name; the file is
   fsynced, renamed to its final name, and the directory fsynced;
2. `commit_segment`: one registry transaction checks that the registry still holds exactly
   those entries, records the anchor row (range, links, file name and SHA-256) and deletes them.

A crash between 1 and 2 leaves a sealed file whose entries are still in the registry: the next
rotation finds it (`recover`), checks it, and does step 2; `verify-log` reports it as pending.
A crash in 1 leaves a temporary file, which the next rotation removes. One rotation at a time:
a lock file in the data directory.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Iterator

from cryptography.hazmat.primitives import serialization

from devid.attestation.errors import LogError
from devid.attestation.log import GENESIS, format_time, verify_chain
from devid.attestation.segments import SegmentAnchor, SegmentWriter, check_segment, parse_segment_name, segment_name

from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.errors import DirectoryBusy
from devid.gateway.system.fs import directory_lock, fsync_path

SEGMENT_DIR = "attestation-log"
DEFAULT_SEGMENT_ENTRIES = 50_000
LOCK_FILE = "attestation-log.lock"
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"

Trusted = Callable[[bytes], object]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PendingSegment:
    """A sealed, durable segment file whose entries are still in the registry."""

    path: Path
    anchor: SegmentAnchor


@dataclass
class RotationReport:
    before: datetime
    segments: list[SegmentAnchor] = field(default_factory=list)
    summaries: int = 0
    recovered: list[str] = field(default_factory=list)
    removed_temporary: list[str] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)
    kept: tuple[int, int, int] | None = None            # (first, last, count) left in the registry


def is_segment_file(path: Path) -> bool:
    return path.is_file() and parse_segment_name(path.name) is not None


def temporary_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_SUFFIX)
                  and parse_segment_name(p.name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)]) is not None)


@contextmanager
def rotation_lock(path: Path) -> Iterator[None]:
    """One rotation at a time per registry (the lock file is in the data directory, whatever
    --out says): a second one is refused at once."""
    try:
        with directory_lock(path):
            yield
    except DirectoryBusy as exc:
        raise LogError(f"another 'devid attest log rotate' is running (process {exc.pid or '?'}, lock {path})") \
            from None


def write_segment(store: AttestationStore, directory: Path, first_seq: int, last_seq: int, prev_hash: bytes,
                  signer, now: datetime, progress: Callable[[int], None] | None = None) -> PendingSegment:
    """Step 1: entries `first_seq`..`last_seq` of the registry into a sealed, fsynced file under
    its final name. `signer` has `.cert` and `.key` (the gateway's `Issuer`)."""
    name = segment_name(first_seq, last_seq)
    final = directory / name
    if final.exists():
        raise LogError(f"{final} already exists: not overwriting a segment")
    tmp = directory / f"{TEMP_PREFIX}{name}{TEMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            writer = SegmentWriter(f, first_seq, prev_hash)
            for e in store.iter_log(first_seq, last_seq):
                writer.add(e)
                if progress is not None:
                    progress(1)
            if writer.entries != last_seq - first_seq + 1:
                raise LogError(f"entries {first_seq + writer.entries}..{last_seq} are missing from the registry: "
                               "run 'devid attest verify-log'; nothing was rotated")
            seal = writer.seal(format_time(now), signer.cert.public_bytes(serialization.Encoding.DER), signer.key)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        fsync_path(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PendingSegment(final, SegmentAnchor(first_seq, last_seq, prev_hash, bytes.fromhex(seal.head_hash),
                                               writer.entries, name, writer.file_sha256, seal.sealed_at))


def commit_segment(store: AttestationStore, pending: PendingSegment) -> None:
    """Step 2: the anchor row and the deletion of the segment's entries, in one transaction."""
    store.record_segment(pending.anchor)


def _next_start(store: AttestationStore) -> tuple[int, bytes]:
    anchors = store.segments()
    return (anchors[-1].last_seq + 1, anchors[-1].head_hash) if anchors else (1, GENESIS)


def recover(store: AttestationStore, directory: Path, trusted: Trusted, report: RotationReport) -> None:
    """Finish what a crashed rotation left in `directory`: temporary files are removed; a sealed
    file whose entries are still at the start of the registry is checked and committed."""
    for tmp in temporary_files(directory):
        tmp.unlink(missing_ok=True)
        report.removed_temporary.append(tmp.name)
    recorded = {a.file_name for a in store.segments()}
    for path in sorted(p for p in directory.iterdir() if is_segment_file(p) and p.name not in recorded):
        first, last = parse_segment_name(path.name)
        start, link = _next_start(store)
        if first != start:
            report.ignored.append((path.name, f"not recorded in the registry, and does not start at entry {start}"))
            continue
        with open(path, "rb") as f:
            check = check_segment(f, path.name, trusted=trusted, start=(start, link))
        if not check.ok or check.seal is None or (check.first_seq, check.last_seq) != (first, last):
            report.ignored.append((path.name, "not recorded in the registry, and does not verify"))
            continue
        # the registry's copy must be intact too: recording the file deletes it
        held = verify_chain(store.iter_log(first, last), start_seq=start, start_hash=link)
        if not held.ok or held.head_hash != check.head_hash or held.entries != check.entries:
            report.ignored.append((path.name, f"the registry's entries {first}..{last} do not verify or differ "
                                              "from the file: run 'devid attest verify-log'"))
            continue
        try:
            store.record_segment(SegmentAnchor(first, last, link, check.head_hash, check.entries, path.name,
                                               check.file_sha256, check.seal.sealed_at))
        except LogError as exc:
            report.ignored.append((path.name, str(exc)))
            continue
        report.recovered.append(path.name)


def rotate(store: AttestationStore, directory: Path, signer, trusted: Trusted, *, before: datetime,
           now: datetime, verdict_window: timedelta, lock: Path, segment_entries: int = DEFAULT_SEGMENT_ENTRIES,
           progress: Progress | None = None) -> RotationReport:
    """Move the registry's entries older than `before` (and than the verdict window) into segments."""
    if segment_entries < 1:
        raise ValueError("segment_entries must be at least 1")
    report = RotationReport(before=min(before, now - verdict_window))
    try:
        if not directory.is_dir():
            directory.mkdir(parents=True)
            fsync_path(directory.parent)            # the new directory's entry is durable too
    except OSError as exc:
        raise LogError(f"{directory}: cannot create the segment directory: {exc.strerror}") from None
    with rotation_lock(lock):
        recover(store, directory, trusted, report)
        report.summaries = len(store.flush_refused(now))
        last = store.last_seq_before(report.before)
        start, link = _next_start(store)
        if last is not None:
            span = store.log_span()
            if span[0] != start:
                raise LogError(f"the registry's log starts at entry {span[0]}, but the last segment ends at entry "
                               f"{start - 1}: run 'devid attest verify-log'; nothing was rotated")
            total, done = last - start + 1, 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                if progress is not None and (done % 1000 == 0 or done == total):
                    progress(done, total)
            while start <= last:
                end = min(last, start + segment_entries - 1)
                pending = write_segment(store, directory, start, end, link, signer, now, step)
                commit_segment(store, pending)
                report.segments.append(pending.anchor)
                start, link = end + 1, pending.anchor.head_hash
    report.kept = store.log_span()
    return report


__all__ = ["DEFAULT_SEGMENT_ENTRIES", "LOCK_FILE", "PendingSegment", "RotationReport", "SEGMENT_DIR",
           "commit_segment", "is_segment_file", "recover", "rotate", "rotation_lock", "temporary_files",
           "write_segment"]
