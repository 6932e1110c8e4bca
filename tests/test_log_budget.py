"""The refused-evidence budget: a flood of junk evidence from one device leaves a bounded log, a
constant-size tally, and chained summary entries with the right counts; across processes; and
over real DTLS the evidence answer still says the verdict (log_seq null when only counted)."""

from __future__ import annotations

import multiprocessing
from collections import Counter
from datetime import timedelta

import cbor2
import pytest
from aiocoap.numbers import codes

from devid.attestation.evidence import fw_digest_of
from devid.attestation.log import KIND_SUMMARY, MemoryLogStore, format_time, verify_chain
from devid.attestation.log_budget import LogBudget
from devid.attestation.nonces import MemoryNonceStore
from devid.attestation.policy import Tier
from devid.attestation.service import AttestationService
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.device.client import device_context
from devid.gateway.store.engines import open_registry
from devid.gateway.store.registry import SQLiteRegistry

from .attest_util import IMAGE_OLD, POLICY, Clock, SimDevice
from .gateway_helpers import request, run_with_gateway, token_for

pytestmark = pytest.mark.engines

JUNK = b"\xd2\x84garbage"


@pytest.fixture(params=["sqlite", "memory"])
def stores(request, location):
    if request.param == "memory":
        yield MemoryNonceStore(), MemoryLogStore()
        return
    reg = open_registry(location, create=True)
    store = AttestationStore(reg)
    yield store, store
    reg.close()


def service(stores, clock, **budget) -> AttestationService:
    return AttestationService(POLICY, stores[0], stores[1], clock=clock, log_budget=LogBudget(**budget))


def good(svc, dev):
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    return svc.evaluate(dev.token(nonce), dev.identity)


def tally_rows(log_store) -> int:
    if isinstance(log_store, AttestationStore):
        with log_store.registry.reading() as db:
            return db.execute("SELECT COUNT(*) FROM attestation_refused").fetchone()[0]
    return len(log_store.tallies)


def test_flood_of_junk_evidence_is_bounded_and_summarised(stores):
    clock = Clock()
    svc = service(stores, clock, refused_per_window=50, window=timedelta(hours=1))
    log = stores[1]
    dev = SimDevice()
    suppressed = []
    for i in range(2000):
        # junk CBOR and well-signed evidence with a nonce the gateway never issued, in turn
        token = JUNK if i % 2 else dev.token(i.to_bytes(16, "big"))
        ev = svc.evaluate(token, dev.identity)
        assert ev.appraisal.verdict.tier is Tier.CONTRAINDICATED and not ev.appraisal.verdict.acceptable
        if ev.entry is None:
            assert ev.log_seq is None
            suppressed.append(ev.appraisal)
        else:
            assert ev.log_seq == ev.entry.seq == i + 1
        clock.advance(0.01)
    assert len(suppressed) == 1950
    assert len(list(log.iter_log())) == 50 and tally_rows(log) == 1
    tally = log.refused_tallies()[dev.serial]
    assert tally.suppressed == 1950 and tally.logged == 50

    # the device's next entry (here an acceptable verdict) comes right after the summary
    ok = good(svc, dev)
    entries = list(log.iter_log())
    assert [e.seq for e in entries] == list(range(1, 53)) and ok.entry.seq == 52 and ok.entry.acceptable
    summary = entries[50]
    assert summary.kind == KIND_SUMMARY and summary.device_serial == dev.serial and not summary.acceptable
    assert summary.summary.count == 1950
    assert summary.summary.first == format_time(suppressed[0].time)
    assert summary.summary.last == format_time(suppressed[-1].time)
    want = Counter(code for a in suppressed for code in set(a.verdict.codes))
    assert summary.summary.counts() == dict(want) and set(want) == {"cbor-malformed", "nonce-unknown"}
    assert summary.tier is Tier.CONTRAINDICATED and summary.prev_hash == entries[49].hash
    report = verify_chain(entries)
    assert report.ok and report.head_seq == 52
    # the tally is still one row, with nothing pending; the verdict serves one enrollment
    assert tally_rows(log) == 1 and log.refused_tallies()[dev.serial].suppressed == 0
    assert svc.take_verdict(dev.serial).seq == 52
    assert svc.take_verdict(dev.serial) is None


def test_acceptable_and_revoking_verdicts_are_always_logged(stores):
    clock = Clock()
    svc = service(stores, clock, refused_per_window=1)
    dev = SimDevice()
    assert svc.evaluate(JUNK, dev.identity).entry.seq == 1
    assert svc.evaluate(JUNK, dev.identity).entry is None           # over budget: counted
    assert good(svc, dev).entry.seq == 3                            # after the summary (2)
    assert good(svc, dev).entry.seq == 4
    assert svc.evaluate(JUNK, dev.identity).entry is None           # the window's one refused entry is used
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    ev = svc.evaluate(dev.token(nonce, fw_digest=fw_digest_of(IMAGE_OLD)), dev.identity)
    assert ev.appraisal.verdict.revoke and ev.entry.revoke and ev.entry.seq == 6
    assert [e.kind for e in stores[1].iter_log()] == ["appraisal", KIND_SUMMARY, "appraisal", "appraisal",
                                                      KIND_SUMMARY, "appraisal"]
    assert verify_chain(stores[1].iter_log()).ok


def test_window_reopens_with_a_summary_first(stores):
    clock = Clock()
    svc = service(stores, clock, refused_per_window=3, window=timedelta(seconds=60))
    dev = SimDevice()
    results = []
    for _ in range(5):
        results.append(svc.evaluate(JUNK, dev.identity).entry)
        clock.advance(1)
    assert [e is not None for e in results] == [True, True, True, False, False]
    clock.advance(60)
    ev = svc.evaluate(JUNK, dev.identity)
    entries = list(stores[1].iter_log())
    assert ev.entry.seq == 5 and entries[3].kind == KIND_SUMMARY and entries[3].summary.count == 2
    assert stores[1].refused_tallies()[dev.serial].logged == 1      # a new window, opened by this one
    assert [svc.evaluate(JUNK, dev.identity).entry is not None for _ in range(3)] == [True, True, False]
    assert verify_chain(stores[1].iter_log()).ok


def test_counted_refusal_after_an_acceptable_verdict_makes_it_unusable(stores):
    """take_verdict wants the device's latest verdict: a refused one that was only counted
    still is the latest, as it would be if it had been logged."""
    clock = Clock()
    svc = service(stores, clock, refused_per_window=1)
    dev = SimDevice()
    svc.evaluate(JUNK, dev.identity)
    good(svc, dev)
    assert svc.evaluate(JUNK, dev.identity).entry is None
    assert svc.take_verdict(dev.serial) is None
    good(svc, dev)                                                   # summary, then a fresh verdict
    assert svc.take_verdict(dev.serial) is not None


def test_flush_writes_pending_summaries_and_forgets_closed_windows(stores):
    clock = Clock()
    svc = service(stores, clock, refused_per_window=2, window=timedelta(minutes=10))
    a, b = SimDevice(serial="A1"), SimDevice(serial="B1")
    for dev, n in ((a, 7), (b, 2)):
        for _ in range(n):
            svc.evaluate(JUNK, dev.identity)
    log = stores[1]
    out = log.flush_refused(clock())
    assert [(s.device_serial, s.summary.count) for s in out] == [("A1", 5)]
    assert tally_rows(log) == 2 and log.flush_refused(clock()) == []
    clock.advance(601)
    assert log.flush_refused(clock()) == [] and tally_rows(log) == 0
    assert verify_chain(log.iter_log()).ok and len(list(log.iter_log())) == 5


def test_budget_values_are_checked():
    for bad in ({"refused_per_window": 0}, {"window": timedelta(0)}, {"refused_per_window": 1.5}):
        with pytest.raises(ValueError):
            LogBudget(**bad)


def _flood(path, count, q):
    reg = open_registry(path, create=True)
    try:
        store = AttestationStore(reg)
        svc = AttestationService(POLICY, store, store, clock=Clock(), log_budget=LogBudget(refused_per_window=20))
        dev = SimDevice(serial="FLOOD1")
        q.put(sum(svc.evaluate(JUNK, dev.identity).entry is None for _ in range(count)))
    finally:
        reg.close()


def test_flood_from_several_worker_processes_shares_one_budget(location):
    path = location
    open_registry(path, create=True).close()
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_flood, args=(path, 150, q)) for _ in range(3)]
    for p in procs:
        p.start()
    assert sum(q.get(timeout=120) for _ in procs) == 430
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reg = open_registry(path, create=True)
    store = AttestationStore(reg)
    assert len(list(store.iter_log())) == 20 and store.refused_tallies()["FLOOD1"].suppressed == 430
    [summary] = store.flush_refused(Clock()())
    assert summary.summary.count == 430 and summary.summary.counts() == {"cbor-malformed": 430}
    assert verify_chain(store.iter_log()).ok
    reg.close()


def test_evidence_answer_over_dtls_says_the_verdict_when_only_counted(world):  # noqa: F811
    data, out = world
    dev = out / "TS00000001"

    async def body(uri, gw):
        gw.attestation.log_budget = LogBudget(refused_per_window=2)
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            answers = []
            for _ in range(4):
                r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=JUNK, content_format=60)
                assert r.code == codes.CHANGED
                answers.append(cbor2.loads(r.payload))
            assert {a["verdict"] for a in answers} == {"contraindicated"}
            assert all(a["acceptable"] is False and a["reasons"][0]["code"] == "cbor-malformed" for a in answers)
            assert [a["log_seq"] for a in answers] == [1, 2, None, None]
            nonce = cbor2.loads((await request(ctx, f"{uri}/attest/nonce")).payload)["nonce"]
            r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token_for(dev, nonce),
                              content_format=60)
            answer = cbor2.loads(r.payload)
            assert answer["verdict"] == "affirming" and answer["log_seq"] == 4      # after the summary (3)
            store = AttestationStore(gw.registry)
            assert store.entry(3).summary.count == 2
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)
