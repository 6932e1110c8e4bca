"""Rotation of the attestation log into sealed segments, and verification across them: the chain
continues, tampering with a segment, its anchor or its order is found, archived segments are
reported, a crash between the file and the transaction is recovered, and verdicts that
enrollment can still take never leave the registry."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import serialization

from devid.attestation.errors import LogError
from devid.attestation.log import GENESIS, KIND_SUMMARY, LogEntry, canonical_json, verify_chain
from devid.attestation.log_budget import LogBudget
from devid.attestation.segments import check_segment, parse_segment_name
from devid.attestation.service import AttestationService
from devid.gateway.cli.attest import _trusted
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.log_rotation import LOCK_FILE, SEGMENT_DIR, rotate, rotation_lock, write_segment
from devid.gateway.store.log_verify import ARCHIVED, PENDING, VERIFIED, verify_log

from .attest_util import POLICY, Clock, SimDevice
from .conftest import tool

pytestmark = pytest.mark.engines

JUNK = b"\xd2\x84garbage"
START = datetime(2026, 10, 1, tzinfo=timezone.utc)


class Log:
    """A registry with 30 entries, one an hour, from three devices, and what rotation needs."""

    def __init__(self, data) -> None:
        self.data = data
        self.registry = data.open_registry()
        self.store = AttestationStore(self.registry)
        self.clock = Clock(START)
        self.svc = AttestationService(POLICY, self.store, self.store, clock=self.clock,
                                      log_budget=LogBudget(refused_per_window=3))
        self.devices = [SimDevice(serial=f"TS{i}") for i in range(3)]
        self.dir = data.path / SEGMENT_DIR
        self.trusted = _trusted(data, self.store)
        for i in range(30):
            self.evaluate(self.devices[i % 3], good=i % 4 != 0)
            self.clock.advance(3600)

    def evaluate(self, dev, good=True):
        if not good:
            return self.svc.evaluate(JUNK, dev.identity)
        nonce = self.svc.issue_nonce(dev.serial, dev.fingerprint).value
        return self.svc.evaluate(dev.token(nonce, iat=int(self.clock().timestamp())), dev.identity)

    def rotate(self, before, **kw):
        return rotate(self.store, kw.pop("directory", self.dir), self.data.issuer("gateway"), self.trusted,
                      before=before, now=self.clock(), verdict_window=POLICY.verdict_window,
                      lock=self.data.path / LOCK_FILE, segment_entries=kw.pop("segment_entries", 10), **kw)

    def verify(self, **kw):
        return verify_log(self.store, kw.pop("directories", [self.dir]), self.trusted, **kw)

    def files(self):
        return sorted(p for p in self.dir.iterdir() if parse_segment_name(p.name))

    def sql(self, statement, *params):
        with self.registry.transaction() as db:
            db.execute(statement, params)


@pytest.fixture
def log(data):
    lg = Log(data)
    yield lg
    lg.registry.close()


def messages(report):
    return [m for _, m in report.problems]


def test_rotate_then_verify_and_the_chain_continues(log):
    before_head = verify_chain(log.store.iter_log())
    report = log.rotate(START + timedelta(hours=25))             # entries 1..25 are older
    assert [(a.first_seq, a.last_seq) for a in report.segments] == [(1, 10), (11, 20), (21, 25)]
    assert [p.name for p in log.files()] == ["attestation-log-000000000001-000000000010.jsonl",
                                             "attestation-log-000000000011-000000000020.jsonl",
                                             "attestation-log-000000000021-000000000025.jsonl"]
    assert report.kept == (26, 30, 5) and [e.seq for e in log.store.iter_log()] == [26, 27, 28, 29, 30]
    anchors = log.store.segments()
    assert anchors[0].prev_hash == GENESIS and anchors[1].prev_hash == anchors[0].head_hash
    assert log.store.entry(26).prev_hash == anchors[-1].head_hash
    # each file: JSON lines of the entries (evidence included), then the seal
    lines = log.files()[0].read_bytes().splitlines()
    assert len(lines) == 11
    first = LogEntry.from_json(json.loads(lines[0]))
    assert first.seq == 1 and first.compute_hash() == first.hash and first.evidence
    seal = json.loads(lines[-1])["seal"]
    assert (seal["first_seq"], seal["last_seq"], seal["entries"], seal["head_hash"]) == \
        (1, 10, 10, anchors[0].head_hash.hex())

    result = log.verify(head=(30, before_head.head_hash.hex()))
    assert result.ok, result.problems
    assert [s.status for s in result.segments] == [VERIFIED] * 3
    assert result.entries == 30 and result.registry_entries == 5 and result.head_seq == 30
    assert result.head_hash == before_head.head_hash
    assert log.verify(head=(7, log.store.segments()[0].head_hash.hex())).problems   # entry 7 is not the head 10's
    # appends go on; a second rotation takes everything outside the verdict window
    log.evaluate(log.devices[0])
    log.clock.advance(3600)
    second = log.rotate(log.clock() + timedelta(days=1))
    assert [(a.first_seq, a.last_seq) for a in second.segments] == [(26, 31)] and second.kept is None
    # with the registry empty, the next entry links to the last segment's head
    entry = log.evaluate(log.devices[1]).entry
    assert entry.seq == 32 and entry.prev_hash == log.store.segments()[-1].head_hash
    result = log.verify()
    assert result.ok and result.entries == 32 and result.head_seq == 32


def test_verdicts_enrollment_can_still_take_are_never_rotated(log):
    dev = log.devices[2]
    verdict = log.evaluate(dev).entry                            # acceptable, unused, inside the window
    log.clock.advance(POLICY.verdict_window.total_seconds() - 10)
    later = log.evaluate(log.devices[0], good=False).entry
    report = log.rotate(log.clock() + timedelta(days=365))       # --before far ahead: the window still wins
    assert report.segments[-1].last_seq == verdict.seq - 1
    assert [e.seq for e in log.store.iter_log()] == [verdict.seq, later.seq]
    assert log.svc.take_verdict(dev.serial).seq == verdict.seq
    assert log.verify().ok


def test_rotation_writes_pending_summaries_first(log):
    dev = log.devices[1]
    for _ in range(10):
        assert log.evaluate(dev, good=False) is not None
    assert log.store.refused_tallies()[dev.serial].suppressed == 7
    report = log.rotate(log.clock() + timedelta(days=1))
    assert report.summaries == 1
    kept = list(log.store.iter_log())
    assert kept[-1].kind == KIND_SUMMARY and kept[-1].summary.count == 7
    assert log.store.refused_tallies()[dev.serial].suppressed == 0
    assert log.verify().ok


def test_an_edited_summary_entry_is_detected(log):
    for _ in range(5):
        log.evaluate(log.devices[0], good=False)
    [summary] = log.store.flush_refused(log.clock())
    assert summary.summary.count == 2 and not summary.acceptable
    for field, value in (("acceptable", True), ("count", 1), ("reason_counts", {"nonce-unknown": 2})):
        d = summary.as_json()
        d[field] = value
        edited = LogEntry.from_json(d)
        assert edited.compute_hash() != summary.hash, field
    log.sql("UPDATE attestation_log SET acceptable = 1 WHERE seq = ?", summary.seq)
    assert messages(log.verify()) == [f"entry {summary.seq} was modified: its hash does not match its content"]


@pytest.mark.parametrize("attack", ["edit-line", "reorder-lines", "truncate-file", "delete-anchor", "edit-anchor",
                                    "edit-seal", "foreign-seal"])
def test_tampering_with_segments_is_detected(log, attack, tmp_path):
    log.rotate(START + timedelta(hours=25))
    anchors = log.store.segments()
    middle = log.files()[1]
    lines = middle.read_bytes().splitlines(keepends=True)
    if attack == "edit-line":
        d = json.loads(lines[3])
        assert d["acceptable"] is True
        d["tier"], d["acceptable"] = "contraindicated", False          # "refused", says the intruder
        lines[3] = canonical_json(d) + b"\n"
        middle.write_bytes(b"".join(lines))
    elif attack == "reorder-lines":
        lines[2], lines[3] = lines[3], lines[2]
        middle.write_bytes(b"".join(lines))
    elif attack == "truncate-file":
        middle.write_bytes(b"".join(lines[:-3]))
    elif attack == "delete-anchor":
        log.sql("DELETE FROM attestation_log_segments WHERE first_seq = ?", anchors[1].first_seq)
    elif attack == "edit-anchor":
        log.sql("UPDATE attestation_log_segments SET head_hash = ? WHERE first_seq = ?", b"\x01" * 32,
                anchors[1].first_seq)
    elif attack == "edit-seal":
        doc = json.loads(lines[-1])
        doc["seal"]["sealed_at"] = "2020-01-01T00:00:00.000000Z"
        lines[-1] = canonical_json(doc) + b"\n"
        middle.write_bytes(b"".join(lines))
    elif attack == "foreign-seal":
        # re-sealed with another certificate and key, everything else consistent
        from cryptography.hazmat.primitives.asymmetric import ec
        from devid.attestation.segments import SegmentWriter
        other = ec.generate_private_key(ec.SECP256R1())
        cert = log.data.cert("root").public_bytes(serialization.Encoding.DER)
        with open(middle, "wb") as f:
            w = SegmentWriter(f, anchors[1].first_seq, anchors[1].prev_hash)
            for line in lines[:-1]:
                w.add(LogEntry.from_json(json.loads(line)))
            w.seal("2026-10-02T00:00:00.000000Z", cert, other)
    result = log.verify()
    assert not result.ok
    text = " | ".join(messages(result))
    expected = {
        "edit-line": ["file changed after it was sealed", "entry 14 was modified",
                      "the seal's lines_sha256"],
        "reorder-lines": ["file changed after it was sealed", "does not link", "out of order"],
        "truncate-file": ["file changed after it was sealed", "the last line is not a valid seal"],
        "delete-anchor": ["entries 11..20 are in no recorded segment",
                          "attestation-log-000000000011-000000000020.jsonl: a segment file the registry has no "
                          "anchor row for"],
        "edit-anchor": ["the seal does not describe the range", "does not link to the segment before it"],
        "edit-seal": ["file changed after it was sealed", "the seal's signature does not verify"],
        "foreign-seal": ["file changed after it was sealed", "not one of the gateway's"],
    }[attack]
    for needle in expected:
        assert needle in text, text
    # the other segments and the registry still verify on their own
    assert [s.status for s in result.segments if s.file != middle.name] == [VERIFIED] * 2


def test_archived_segment_is_reported_and_continuity_still_checked(log, tmp_path):
    log.rotate(START + timedelta(hours=25))
    archive = tmp_path / "archive"
    archive.mkdir()
    middle = log.files()[1]
    middle.rename(archive / middle.name)
    result = log.verify()
    assert result.ok and [s.status for s in result.segments] == [VERIFIED, ARCHIVED, VERIFIED]
    assert result.entries == 20                     # 10 + 5 in the present segments, 5 in the registry
    strict = log.verify(require_present=True)
    assert messages(strict) == ["attestation-log-000000000011-000000000020.jsonl (entries 11..20) is not present"]
    # the archive elsewhere, searched too
    both = log.verify(directories=[log.dir, archive])
    assert both.ok and [s.status for s in both.segments] == [VERIFIED] * 3 and both.entries == 30
    # an archived file is still checked against its anchor where it is found
    (archive / middle.name).write_bytes((archive / middle.name).read_bytes().replace(b'"TS1"', b'"TS9"', 1))
    assert "file changed after it was sealed" in " ".join(messages(log.verify(directories=[log.dir, archive])))
    # and a head inside an archived segment is reported as not checkable, not as truncation
    head = log.verify(head=(15, "00" * 32))
    assert head.ok and any("archived (not present): not checked" in n for n in head.notes)


def test_crash_between_file_and_transaction_is_recovered(log):
    # step 1 only: the sealed file is durable, the registry still holds its entries
    log.dir.mkdir()
    pending = write_segment(log.store, log.dir, 1, 12, GENESIS, log.data.issuer("gateway"), log.clock())
    assert pending.path.exists() and log.store.segments() == [] and log.store.log_span() == (1, 30, 30)
    result = log.verify()
    assert result.ok and [(s.file, s.status) for s in result.segments] == [(pending.path.name, PENDING)]
    assert "stopped before recording it" in result.notes[0]
    # a rotation that crashed while writing leaves a temporary file
    tmp = log.dir / ".attestation-log-000000000013-000000000020.jsonl.tmp"
    tmp.write_bytes(b'{"seq": 13')
    assert any("stopped while writing" in n for n in log.verify().notes)
    report = log.rotate(START + timedelta(hours=25))
    assert report.recovered == [pending.path.name] and report.removed_temporary == [tmp.name]
    assert [(a.first_seq, a.last_seq) for a in report.segments] == [(13, 22), (23, 25)]
    assert log.store.segments()[0].file_sha256 == pending.anchor.file_sha256
    assert not tmp.exists()
    result = log.verify()
    assert result.ok and result.entries == 30 and not result.notes


def test_a_file_that_does_not_match_the_registry_is_not_recorded(log):
    log.dir.mkdir()
    pending = write_segment(log.store, log.dir, 1, 12, GENESIS, log.data.issuer("gateway"), log.clock())
    log.sql("UPDATE attestation_log SET reasons = '[]' WHERE seq = 5")       # the registry changed since
    result = log.verify()
    assert not result.ok and "entry 5 was modified" in " ".join(messages(result))
    with pytest.raises(LogError, match="entry 5 does not continue the chain"):
        log.rotate(START + timedelta(hours=25))
    assert log.store.segments() == [] and pending.path.exists() and log.store.log_span() == (1, 30, 30)


def test_rotation_refuses_a_tampered_registry(log):
    log.sql("UPDATE attestation_log SET tier = 'affirming', acceptable = 1 WHERE seq = 9")
    with pytest.raises(LogError, match="entry 9 does not continue the chain"):
        log.rotate(START + timedelta(hours=25))
    assert log.store.segments() == [] and log.files() == [] and list(log.dir.iterdir()) == []
    assert log.store.log_span() == (1, 30, 30)


def test_one_rotation_at_a_time(log):
    with rotation_lock(log.data.path / LOCK_FILE):
        with pytest.raises(LogError, match="another 'devid attest log rotate' is running"):
            log.rotate(START + timedelta(hours=25))
    assert log.rotate(START + timedelta(hours=25)).segments


def test_seal_verifies_off_host_with_openssl(log, tmp_path):
    """What docs/attestation.md tells an auditor to do with an archived segment and the gateway
    certificate, with nothing but openssl and a few lines of Python."""
    log.rotate(START + timedelta(hours=25))
    segment = log.files()[0]
    *entry_lines, seal_line = segment.read_bytes().splitlines(keepends=True)
    doc = json.loads(seal_line)
    (tmp_path / "seal.bin").write_bytes(json.dumps(doc["seal"], sort_keys=True, separators=(",", ":")).encode())
    (tmp_path / "seal.sig").write_bytes(base64.b64decode(doc["signature"]))
    (tmp_path / "gateway.pem").write_bytes(log.data.cert_pem("gateway"))
    openssl = tool("openssl")
    pub = subprocess.run([openssl, "x509", "-in", tmp_path / "gateway.pem", "-pubkey", "-noout"],
                         capture_output=True, check=True).stdout
    (tmp_path / "gateway.pub").write_bytes(pub)
    ok = subprocess.run([openssl, "dgst", "-sha256", "-verify", tmp_path / "gateway.pub", "-signature",
                         tmp_path / "seal.sig", tmp_path / "seal.bin"], capture_output=True)
    assert ok.returncode == 0 and b"Verified OK" in ok.stdout
    lines_hash = subprocess.run(["sha256sum"], input=b"".join(entry_lines), capture_output=True, check=True)
    assert lines_hash.stdout.split()[0].decode() == doc["seal"]["lines_sha256"]
    # the seal's certificate is the gateway's
    assert base64.b64decode(doc["seal"]["certificate"]) == log.data.cert("gateway").public_bytes(
        serialization.Encoding.DER)
    # and a changed seal does not verify
    (tmp_path / "seal.bin").write_bytes((tmp_path / "seal.bin").read_bytes().replace(b'"entries":10', b'"entries":9'))
    bad = subprocess.run([openssl, "dgst", "-sha256", "-verify", tmp_path / "gateway.pub", "-signature",
                          tmp_path / "seal.sig", tmp_path / "seal.bin"], capture_output=True)
    assert bad.returncode != 0


def test_flood_then_rotate_then_verify(log):
    """Junk evidence from one device: the budget bounds what reaches the log, rotation seals it."""
    dev = log.devices[0]
    for _ in range(500):
        log.evaluate(dev, good=False)
        log.clock.advance(0.5)
    assert log.store.log_span() == (1, 33, 33)                  # 30 + the 3 of the budget
    log.clock.advance(7200)
    report = log.rotate(log.clock() + timedelta(days=1), segment_entries=1000)
    assert report.summaries == 1 and [(a.first_seq, a.last_seq) for a in report.segments] == [(1, 33)]
    [summary] = list(log.store.iter_log())
    assert summary.seq == 34 and summary.summary.count == 497 and summary.prev_hash == report.segments[0].head_hash
    with open(log.files()[0], "rb") as f:
        check = check_segment(f, "x", trusted=log.trusted)
    assert check.ok and check.entries == 33
    assert log.verify().ok
