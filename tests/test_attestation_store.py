"""Nonces and the attestation log on SQLite: the schema migration, compare-and-swap consumption
and serialised appends across processes, and a tampered log caught by verify_chain."""

from __future__ import annotations

import multiprocessing
import sqlite3
from datetime import timedelta

import pytest

from devid.attestation.errors import NonceExpired, NonceReplayed, NonceUnknown, NonceWrongDevice
from devid.attestation.log import GENESIS, verify_chain
from devid.attestation.nonces import ConsumeResult, MemoryNonceStore, NonceRecord, NonceService
from devid.attestation.policy import Tier
from devid.attestation.service import AttestationService
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.engines import open_registry
from devid.gateway.store.registry import SQLiteRegistry
from devid.gateway.store.schema import MIGRATIONS, SCHEMA_VERSION

from .attest_util import POLICY, Clock, SimDevice
from .attest_util import NOW

pytestmark = pytest.mark.engines


@pytest.fixture
def store(location):
    reg = open_registry(location, create=True)
    yield AttestationStore(reg)
    reg.close()


def sqlite_service(store, clock=None) -> AttestationService:
    return AttestationService(POLICY, store, store, clock=clock or Clock())


@pytest.mark.sqlite_only
def test_migration_from_version_1_keeps_data(tmp_path):
    path = tmp_path / "old.sqlite3"
    con = sqlite3.connect(path)
    con.executescript(";".join(MIGRATIONS[1]) + "; PRAGMA user_version = 1;")
    con.execute("INSERT INTO serial_sequences VALUES ('SN', 42)")
    con.commit()
    con.close()
    reg = SQLiteRegistry(path, create=True)
    assert reg.schema_version == SCHEMA_VERSION      # 1 -> 2 (attestation) -> 3 (certificates rebuilt)
    assert reg.reserve_serial_block("SN", 1) == 42
    s = AttestationStore(reg)
    assert s.log_entries() == [] and s.count_nonces() == 0
    reg.close()


# -- nonces -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_nonce_service_outcomes(kind, store):
    st = store if kind == "sqlite" else MemoryNonceStore()
    clock = Clock()
    svc = NonceService(st, clock=clock)
    n = svc.issue("D1", "fp1")
    assert len(n.value) == 16 and n.expires_at == NOW + timedelta(seconds=60)
    with pytest.raises(NonceWrongDevice):
        svc.consume(n.value, "D2", "fp1")
    with pytest.raises(NonceWrongDevice):
        svc.consume(n.value, "D1", "fp-other")
    svc.consume(n.value, "D1", "fp1")
    with pytest.raises(NonceReplayed):
        svc.consume(n.value, "D1", "fp1")
    with pytest.raises(NonceUnknown):
        svc.consume(b"q" * 16, "D1", "fp1")
    m = svc.issue("D1", "fp1", session=b"s1")
    with pytest.raises(NonceWrongDevice, match="session"):
        svc.consume(m.value, "D1", "fp1", session=b"s2")
    with pytest.raises(NonceWrongDevice, match="session"):
        svc.consume(m.value, "D1", "fp1", session=None)
    clock.advance(60)
    with pytest.raises(NonceExpired):
        svc.consume(m.value, "D1", "fp1", session=b"s1")
    # long after expiry, old nonces are purged when new ones are issued
    clock.advance(3601)
    svc.issue("D1", "fp1")
    with pytest.raises(NonceUnknown):
        svc.consume(n.value, "D1", "fp1")


def test_nonce_randomness_is_injected_and_collisions_retried(store):
    draws = iter([b"a" * 16, b"a" * 16, b"b" * 16])
    svc = NonceService(store, clock=Clock(), rand_bytes=lambda n: next(draws))
    assert svc.issue("D1", "fp").value == b"a" * 16
    assert svc.issue("D1", "fp").value == b"b" * 16          # the repeated draw was refused, redrawn
    with pytest.raises(ValueError):
        NonceService(store, clock=Clock(), size=8)
    with pytest.raises(RuntimeError):
        NonceService(store, clock=Clock(), rand_bytes=lambda n: b"a" * n).issue("D1", "fp")


def _consume(db_path, value, q):
    reg = open_registry(db_path, create=True)
    try:
        q.put(AttestationStore(reg).consume_nonce(value, "D1", "fp", None, NOW).value)
    finally:
        reg.close()


def test_exactly_one_process_consumes_a_nonce(location):
    path = location
    reg = open_registry(path, create=True)
    store = AttestationStore(reg)
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        value = bytes([round_]) * 16
        assert store.put_nonce(NonceRecord(value, "D1", "fp", NOW, NOW + timedelta(seconds=60)), purge_before=NOW)
        q = ctx.Queue()
        procs = [ctx.Process(target=_consume, args=(path, value, q)) for _ in range(6)]
        for p in procs:
            p.start()
        results = sorted(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        assert results.count(ConsumeResult.OK.value) == 1, results
        assert results.count(ConsumeResult.REPLAYED.value) == 5, results
    reg.close()


# -- the log ------------------------------------------------------------------------------------------

def _append(db_path, count, serial, q):
    reg = open_registry(db_path, create=True)
    try:
        svc = AttestationService(POLICY, AttestationStore(reg), AttestationStore(reg), clock=Clock())
        dev = SimDevice(serial=serial)
        for _ in range(count):
            nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
            svc.evaluate(dev.token(nonce), dev.identity)
        q.put(count)
    finally:
        reg.close()


def test_concurrent_appends_from_processes_keep_one_valid_chain(location):
    path = location
    open_registry(path, create=True).close()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_append, args=(path, 25, f"P{i}", q)) for i in range(4)]
    for p in procs:
        p.start()
    assert sum(q.get(timeout=120) for _ in procs) == 100
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reg = open_registry(path, create=True)
    store = AttestationStore(reg)
    entries = list(store.iter_log())
    assert [e.seq for e in entries] == list(range(1, 101))
    assert {e.device_serial for e in entries} == {"P0", "P1", "P2", "P3"}
    assert all(e.tier is Tier.AFFIRMING for e in entries)
    report = verify_chain(entries)
    assert report.ok and report.entries == 100 and report.head_hash == entries[-1].hash
    reg.close()


@pytest.fixture
def filled(store):
    svc = sqlite_service(store)
    dev = SimDevice()
    for i in range(5):
        nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
        svc.evaluate(dev.token(nonce, secure_boot=(i != 2)), dev.identity)
    assert verify_chain(store.iter_log()).ok
    return store


def _sql(store, statement, *params):
    with store.registry.transaction() as db:
        db.execute(statement, params)


def _problems(store):
    return [m for _, m in verify_chain(store.iter_log()).problems]


def test_edited_entry_is_detected(filled):
    _sql(filled, "UPDATE attestation_log SET tier = 'affirming', acceptable = 1 WHERE seq = 3")
    assert _problems(filled) == ["entry 3 was modified: its hash does not match its content"]


def test_edited_evidence_or_claims_is_detected(filled):
    _sql(filled, "UPDATE attestation_log SET evidence = ? WHERE seq = 2", b"\x00")
    _sql(filled, "UPDATE attestation_log SET claims = replace(claims, '\"bootcount\": 12', '\"bootcount\": 13') "
                 "WHERE seq = 4")
    assert [s for s, _ in verify_chain(filled.iter_log()).problems] == [2, 4]


def test_rehashed_edit_breaks_the_next_link(filled):
    """An attacker who edits an entry and recomputes its hash still breaks the link to it."""
    e = filled.entry(3)
    from devid.attestation.log import LogEntry
    forged = LogEntry(**{**e.__dict__, "tier": Tier.AFFIRMING, "acceptable": True, "hash": b""})
    _sql(filled, "UPDATE attestation_log SET tier = 'affirming', acceptable = 1, hash = ? WHERE seq = 3",
         forged.compute_hash())
    assert _problems(filled) == ["entry 4 does not link to the entry before it "
                                 "(an entry was removed, inserted or reordered)"]


def test_removed_entry_is_detected(filled):
    _sql(filled, "DELETE FROM attestation_log WHERE seq = 2")
    problems = _problems(filled)
    assert problems[0] == "entry 2 missing (removed?)" and "entry 3 does not link" in problems[1]


def test_reordered_entries_are_detected(filled):
    _sql(filled, "UPDATE attestation_log SET seq = -1 WHERE seq = 2")
    _sql(filled, "UPDATE attestation_log SET seq = 2 WHERE seq = 4")
    _sql(filled, "UPDATE attestation_log SET seq = 4 WHERE seq = -1")
    assert {s for s, _ in verify_chain(filled.iter_log()).problems} == {2, 3, 4, 5}


def test_truncated_tail_needs_the_recorded_head(filled):
    head = verify_chain(filled.iter_log())
    _sql(filled, "DELETE FROM attestation_log WHERE seq = 5")
    after = verify_chain(filled.iter_log())
    assert after.ok and after.head_seq == 4           # a shorter chain is still a valid chain...
    assert filled.entry(head.head_seq) is None        # ...which the recorded head reveals


def test_log_queries(filled):
    assert [e.seq for e in filled.log_entries()] == [1, 2, 3, 4, 5]
    assert [e.seq for e in filled.log_entries(limit=2)] == [4, 5]
    assert [e.seq for e in filled.log_entries(tier=Tier.CONTRAINDICATED)] == [3]
    assert filled.log_entries(device_serial="nobody") == []
    assert len(filled.log_entries(since=NOW)) == 5 and filled.log_entries(since=NOW + timedelta(seconds=1)) == []
    assert filled.entry(1).prev_hash == GENESIS
    assert filled.entry(99) is None


def test_take_verdict_on_sqlite_is_single_use(store):
    clock = Clock()
    svc = sqlite_service(store, clock)
    dev = SimDevice()
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    seq = svc.evaluate(dev.token(nonce), dev.identity).entry.seq
    assert svc.take_verdict(dev.serial).seq == seq
    assert svc.take_verdict(dev.serial) is None
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    svc.evaluate(dev.token(nonce, dbgstat=0), dev.identity)
    assert svc.take_verdict(dev.serial) is None
