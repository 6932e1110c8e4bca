"""Sealed segments of the attestation log: the file format, how one is written, how one is checked.

A segment file holds a contiguous run of log entries moved out of the registry (`devid attest
log rotate`), one canonical JSON object per line (`LogEntry.as_json`: every field, the evidence
in hex, the entry's hash and the previous one's, so every hash can be recomputed), then one
seal line:

    {"seal": {"v": 1, "first_seq": a, "last_seq": b, "entries": n,
              "prev_hash": hex (the link of entry a), "head_hash": hex (the hash of entry b),
              "lines_sha256": hex (SHA-256 of the n entry lines, newlines included),
              "sealed_at": time, "algorithm": "ecdsa-with-SHA256",
              "certificate": base64 of the signing certificate (DER)},
     "signature": base64 of the DER ECDSA signature over canonical_json(seal)}

The chain runs on from one segment to the next: the first entry of a segment links to the last
entry (the head) of the one before. A segment is named by its range,
attestation-log-<first seq, 12 digits>-<last seq, 12 digits>.jsonl, so names sort in order.

This module does no file-system work: `SegmentWriter` writes to a binary stream it is given, and
`check_segment` reads lines. Which certificates may seal is the caller's choice (`trusted`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import LogError
from .log import LogEntry, canonical_json, verify_chain

SEAL_VERSION = 1
_NAME = re.compile(r"^attestation-log-(\d{12})-(\d{12})\.jsonl$")
_ALGORITHMS = {"ecdsa-with-SHA256": hashes.SHA256, "ecdsa-with-SHA384": hashes.SHA384}


def segment_name(first_seq: int, last_seq: int) -> str:
    return f"attestation-log-{first_seq:012d}-{last_seq:012d}.jsonl"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    m = _NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class SegmentAnchor:
    """What the registry keeps of a segment once its entries are gone (its anchor row)."""

    first_seq: int
    last_seq: int
    prev_hash: bytes
    head_hash: bytes
    entries: int
    file_name: str
    file_sha256: str            # of the whole file, seal line included
    sealed_at: str


@dataclass(frozen=True)
class Seal:
    first_seq: int
    last_seq: int
    entries: int
    prev_hash: str
    head_hash: str
    lines_sha256: str
    sealed_at: str
    algorithm: str
    certificate: bytes          # DER

    def as_json(self) -> dict[str, Any]:
        return {"v": SEAL_VERSION, "first_seq": self.first_seq, "last_seq": self.last_seq, "entries": self.entries,
                "prev_hash": self.prev_hash, "head_hash": self.head_hash, "lines_sha256": self.lines_sha256,
                "sealed_at": self.sealed_at, "algorithm": self.algorithm,
                "certificate": base64.b64encode(self.certificate).decode()}

    def signed_bytes(self) -> bytes:
        return canonical_json(self.as_json())

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Seal":
        if d.get("v") != SEAL_VERSION:
            raise ValueError(f"seal version {d.get('v')!r} is not {SEAL_VERSION}")
        ints = [d[k] for k in ("first_seq", "last_seq", "entries")]
        texts = [d[k] for k in ("prev_hash", "head_hash", "lines_sha256", "sealed_at", "algorithm")]
        if not all(isinstance(i, int) for i in ints) or not all(isinstance(t, str) for t in texts):
            raise TypeError("a seal field has the wrong type")
        return cls(*ints, *texts, base64.b64decode(d["certificate"], validate=True))


class SegmentWriter:
    """Writes entries (checking that each continues the chain) and then the seal to `out`."""

    def __init__(self, out: BinaryIO, first_seq: int, prev_hash: bytes) -> None:
        self.out = out
        self.first_seq, self.prev_hash = first_seq, prev_hash
        self._expected, self._prev = first_seq, prev_hash
        self._lines = hashlib.sha256()
        self._file = hashlib.sha256()
        self.entries = 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self._file.update(data)

    def add(self, e: LogEntry) -> None:
        if e.seq != self._expected or e.prev_hash != self._prev or e.compute_hash() != e.hash:
            raise LogError(f"entry {e.seq} does not continue the chain at entry {self._expected} (modified, "
                           "removed or reordered): run 'devid attest verify-log'; nothing was rotated")
        line = canonical_json(e.as_json()) + b"\n"
        self._lines.update(line)
        self._write(line)
        self._expected, self._prev = e.seq + 1, e.hash
        self.entries += 1

    def seal(self, sealed_at: str, certificate: bytes, key: ec.EllipticCurvePrivateKey) -> Seal:
        if not self.entries:
            raise LogError("an empty segment cannot be sealed")
        algorithm = "ecdsa-with-SHA384" if key.curve.key_size > 256 else "ecdsa-with-SHA256"
        s = Seal(self.first_seq, self._expected - 1, self.entries, self.prev_hash.hex(), self._prev.hex(),
                 self._lines.hexdigest(), sealed_at, algorithm, certificate)
        signature = key.sign(s.signed_bytes(), ec.ECDSA(_ALGORITHMS[algorithm]()))
        self._write(canonical_json({"seal": s.as_json(), "signature": base64.b64encode(signature).decode()})
                    + b"\n")
        return s

    @property
    def file_sha256(self) -> str:
        return self._file.hexdigest()


@dataclass
class SegmentCheck:
    """What `check_segment` found in one file."""

    entries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    prev_hash: bytes | None = None
    head_hash: bytes | None = None
    seal: Seal | None = None
    file_sha256: str = ""
    hashes: dict[int, bytes] = field(default_factory=dict)     # of the entries asked for (`want`)
    problems: list[tuple[int | None, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_segment(lines: Iterable[bytes], name: str, *, trusted: Callable[[bytes], ec.EllipticCurvePublicKey | None],
                  start: tuple[int, bytes] | None = None, want: Iterable[int] = (),
                  progress: Callable[[int], None] | None = None) -> SegmentCheck:
    """Check one segment file from its lines: every entry's hash and link (from `start`, the
    (seq, link) an anchor row expects, else from the file's own first entry), the seal against
    what the entries are, and the seal's signature by a certificate `trusted` accepts (it
    returns the certificate's public key, or None)."""
    report = SegmentCheck()
    file_hash, lines_hash = hashlib.sha256(), hashlib.sha256()
    held: list[bytes] = []                      # one line of look-ahead: the last line is the seal
    wanted = set(want)

    def entries() -> Iterator[LogEntry]:
        for n, line in enumerate(_lines_but_last(lines, held, file_hash), 1):
            lines_hash.update(line)
            try:
                e = LogEntry.from_json(json.loads(line))
            except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
                report.problems.append((None, f"{name}: line {n} is not a log entry"))
                continue
            if e.seq in wanted:
                report.hashes[e.seq] = e.hash
            if progress is not None:
                progress(1)
            yield e

    stream = entries()
    first = next(stream, None)
    if first is not None:
        report.first_seq, report.prev_hash = first.seq, first.prev_hash
        start_seq, start_hash = start if start is not None else (first.seq, first.prev_hash)
        chained = verify_chain(chain([first], stream), start_seq=start_seq, start_hash=start_hash)
        report.entries, report.last_seq, report.head_hash = chained.entries, chained.head_seq, chained.head_hash
        report.problems.extend((s, f"{name}: {m}") for s, m in chained.problems)
        for _ in stream:                        # after too many problems: read on, for the file's digest
            pass
    report.file_sha256 = file_hash.hexdigest()
    if not held:
        report.problems.append((None, f"{name}: empty file, no seal"))
        return report
    try:
        doc = json.loads(held[0])
        report.seal = Seal.from_json(doc["seal"])
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        report.problems.append((None, f"{name}: the last line is not a valid seal (file truncated or edited?)"))
        return report
    _check_seal(report, report.seal, signature, lines_hash.hexdigest(), name, trusted)
    return report


def _lines_but_last(lines: Iterable[bytes], held: list[bytes], file_hash) -> Iterator[bytes]:
    for line in lines:
        file_hash.update(line)
        if held:
            yield held.pop()
        held.append(line)


def _check_seal(report: SegmentCheck, seal: Seal, signature: bytes, lines_sha256: str, name: str,
                trusted: Callable[[bytes], ec.EllipticCurvePublicKey | None]) -> None:
    found = {"first_seq": report.first_seq, "last_seq": report.last_seq, "entries": report.entries,
             "prev_hash": report.prev_hash.hex() if report.prev_hash is not None else None,
             "head_hash": report.head_hash.hex() if report.head_hash is not None else None,
             "lines_sha256": lines_sha256}
    for key, value in found.items():
        if getattr(seal, key) != value:
            report.problems.append((None, f"{name}: the seal's {key} is {getattr(seal, key)}, the entries give "
                                          f"{value} (entries or seal changed)"))
    hash_cls = _ALGORITHMS.get(seal.algorithm)
    key = trusted(seal.certificate)
    if hash_cls is None:
        report.problems.append((None, f"{name}: unknown seal algorithm {seal.algorithm!r}"))
    elif key is None:
        report.problems.append((None, f"{name}: sealed with a certificate that is not one of the gateway's "
                                      f"(SHA-256 {hashlib.sha256(seal.certificate).hexdigest()})"))
    else:
        try:
            key.verify(signature, seal.signed_bytes(), ec.ECDSA(hash_cls()))
        except InvalidSignature:
            report.problems.append((None, f"{name}: the seal's signature does not verify with the gateway "
                                          "certificate (seal changed)"))


__all__ = ["Seal", "SegmentAnchor", "SegmentCheck", "SegmentWriter", "check_segment", "parse_segment_name",
           "segment_name"]
