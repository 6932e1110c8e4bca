"""Per-device budgets (threat 19): the token buckets in memory, the cap on outstanding nonces in
both nonce stores, and a flood from one identity against the real gateway on loopback DTLS."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta

import aiocoap
import pytest
from aiocoap.numbers import codes

from devid.attestation.nonces import MemoryNonceStore, NonceService
from devid.attestation.errors import NonceUnknown
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.service.budgets import ACTIONS, Budgets, Rate, RateLimiter
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll
from devid.gateway.system.logs import fields_of

from .attest_util import Clock
from .conftest import make_csr
from .gateway_helpers import FW, problem, request, run_with_gateway

pytestmark = pytest.mark.engines


class Ticks:
    """A monotonic clock for the limiter, moved by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# -- the token buckets ----------------------------------------------------------------------------------

def test_bucket_allows_its_burst_then_one_per_interval():
    ticks = Ticks()
    limiter = RateLimiter(Budgets(nonce=Rate(3, 10.0)), ticks)
    assert [limiter.take("D1", "nonce") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("D1", "nonce") == pytest.approx(10.0)
    ticks.t += 4
    assert limiter.take("D1", "nonce") == pytest.approx(6.0)    # a refusal spends nothing
    ticks.t += 6
    assert limiter.take("D1", "nonce") == 0.0
    assert limiter.take("D1", "nonce") == pytest.approx(10.0)
    # other actions and other devices have buckets of their own
    assert limiter.take("D1", "evidence") == 0.0
    assert limiter.take("D2", "nonce") == 0.0
    # after a long quiet spell the bucket is full again, never fuller
    ticks.t += 3600
    assert [limiter.take("D1", "nonce") for _ in range(4)][-1] == pytest.approx(10.0)


def test_refusal_lines_are_bounded_per_device_and_in_all():
    ticks = Ticks()
    limiter = RateLimiter(Budgets(nonce=Rate(1, 60.0), refusal_log_interval=10.0), ticks, lines_per_second=1.0)
    limiter.take("D1", "nonce")
    due = []
    for _ in range(100):                      # 100 refusals within one second: one line
        assert limiter.take("D1", "nonce") > 0
        due.append(limiter.refused("D1"))
    assert due[0] == 1 and due[1:] == [None] * 99
    ticks.t += 10
    assert limiter.take("D1", "nonce") > 0
    assert limiter.refused("D1") == 100        # the 99 not reported yet, and this one
    # many devices refused at once: at most 5 s worth of lines (burst), the rest reported later
    lines = 0
    for i in range(50):
        limiter.take(f"X{i}", "nonce")
        limiter.take(f"X{i}", "nonce")
        lines += limiter.refused(f"X{i}") is not None
    assert 1 <= lines <= 6


def test_tracked_devices_are_bounded_and_idle_ones_go_first():
    ticks = Ticks()
    limiter = RateLimiter(Budgets(nonce=Rate(2, 60.0), renew=Rate(1, 86_400.0), tracked_devices=64), ticks)
    assert limiter.take("busy", "renew") == 0.0
    assert limiter.take("busy", "renew") > 0       # empty for a day
    for i in range(1000):                          # a device every 10 s, one request each
        ticks.t += 10
        limiter.take(f"D{i}", "nonce")
        assert len(limiter) <= 64
    # the devices whose buckets were full again made room; "busy", not seen since, kept its state
    assert limiter.evictions == 0
    assert limiter.take("busy", "renew") > 0
    # when no device is idle, the least recently seen go (not "busy", seen all along)
    for i in range(200):
        limiter.take(f"E{i}", "nonce")
        assert limiter.take("busy", "renew") > 0
        assert len(limiter) <= 64
    assert limiter.evictions > 0


def test_budgets_refuse_values_outside_their_range():
    assert Budgets().outstanding_nonces == 4 and set(ACTIONS) <= set(Budgets.field_names())
    for bad in (dict(outstanding_nonces=0), dict(certificates_per_window=0), dict(tracked_devices=1),
                dict(superseded_grace=timedelta(hours=2)), dict(superseded_grace=timedelta(seconds=-1)),
                dict(certificate_window=timedelta(0)), dict(refusal_log_interval=-1), dict(nonce=(10, 60))):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"budgets.{name}"):
            Budgets(**bad)
    for bad in (dict(burst=0, interval=1.0), dict(burst=1, interval=0.0), dict(burst=True, interval=1.0),
                dict(burst=1, interval=float("nan"))):
        with pytest.raises(ValueError):
            Rate(**bad)


# -- outstanding nonces ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_new_nonce_replaces_the_devices_oldest_unconsumed_one(kind, registry):
    store = MemoryNonceStore() if kind == "memory" else AttestationStore(registry)
    clock = Clock()
    svc = NonceService(store, clock=clock, max_outstanding=4)
    other = svc.issue("D2", "fp2")
    used = svc.issue("D1", "fp1")
    svc.consume(used.value, "D1", "fp1")        # consumed nonces do not count
    issued = []
    for _ in range(10):
        clock.advance(0.001)
        issued.append(svc.issue("D1", "fp1"))
    outstanding = (store.outstanding("D1") if kind == "memory"
                   else store.count_nonces("D1", outstanding=True))
    assert outstanding == 4
    for old in issued[:6]:
        with pytest.raises(NonceUnknown):
            svc.consume(old.value, "D1", "fp1")
    for new in issued[6:]:
        svc.consume(new.value, "D1", "fp1")
    svc.consume(other.value, "D2", "fp2")      # another device's nonce was not touched


@pytest.mark.sqlite_only       # SQLite's query plan
def test_the_nonce_cap_uses_its_index(registry):
    plan = registry._db.execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM attestation_nonces WHERE device_serial = ? AND consumed_at IS NULL "
        "ORDER BY issued_at DESC, rowid DESC LIMIT -1 OFFSET ?", ("D1", 4)).fetchall()
    text = " ".join(str(row[-1]) for row in plan)
    assert "attestation_nonces_outstanding" in text and "TEMP B-TREE" not in text, text


# -- a flood from one identity, on the real gateway ------------------------------------------------------



async def flood(ctx, uri: str, count: int, **kw) -> list:
    """`count` requests, all in flight at once (the client sends as fast as it can)."""
    async def one():
        return await asyncio.wait_for(ctx.request(aiocoap.Message(uri=uri, **kw)).response, 60)
    return await asyncio.gather(*(one() for _ in range(count)))


def test_a_flood_of_nonces_and_junk_evidence_from_one_identity(world, caplog):
    """300 nonce requests and 300 junk evidences from one factory identity, while another device
    enrolls: the registry holds at most 4 outstanding nonces of the flooder, the rest is 4.29
    with Max-Age and a problem body, refusals are logged a few lines at a time, and the other
    device enrolls end to end."""
    data, out = world
    flooder, good = out / "TS00000001", out / "TS00000002"
    budgets = Budgets()

    async def body(uri, gw):
        ctx, _ = await device_context(flooder, "127.0.0.1")
        try:
            # the session first (the client loses the first of requests sent during its handshake)
            assert (await request(ctx, f"{uri}/whoami")).code == codes.CONTENT
            started = time.monotonic()
            nonces, other = await asyncio.gather(flood(ctx, f"{uri}/attest/nonce", 300, code=codes.GET),
                                                 enroll(good, uri, FW))
            junk = await flood(ctx, f"{uri}/attest/evidence", 300, code=codes.POST, payload=b"\xa1\x01\x02",
                               content_format=60)
            elapsed = time.monotonic() - started
        finally:
            await ctx.shutdown()
        assert other.verdict == "affirming" and other.certificate is not None
        store = AttestationStore(gw.registry)
        assert store.count_nonces("TS00000001", outstanding=True) <= budgets.outstanding_nonces
        # the buckets: a burst of 10, then one a minute
        allowed = budgets.nonce.burst + int(elapsed // budgets.nonce.interval) + 1
        for answers, action in ((nonces, "nonce"), (junk, "evidence")):
            ok = [r for r in answers if r.code.is_successful()]
            limited = [r for r in answers if r.code == codes.TOO_MANY_REQUESTS]
            assert len(ok) + len(limited) == 300 and 1 <= len(ok) <= allowed, action
            for r in limited:
                assert 1 <= r.opt.max_age <= budgets.rate(action).interval
                assert problem(r) == {-1: "too many requests",
                                      -2: f"too many {action} requests from this device; retry in {r.opt.max_age} s"}
        # junk evidence past the budget was never parsed, so never logged
        assert len(store.log_entries(device_serial="TS00000001")) <= allowed
        return elapsed

    with caplog.at_level(logging.INFO, logger="devid.enrollment"):
        elapsed = run_with_gateway(data, body)
    lines = [fields_of(r) for r in caplog.records if r.name == "devid.enrollment"]
    limited = [line for line in lines if line["result"] == "rate-limited"]
    assert limited and all(line["serial"] == "TS00000001" and line["retry_after"] >= 1 for line in limited)
    # at most one line per device per 10 s, counting every refusal up to its line
    assert len(limited) <= 1 + elapsed // budgets.refusal_log_interval
    assert sum(line["refused"] for line in limited) <= 600
    assert not [line for line in lines if line["serial"] == "TS00000002" and line["result"] != "issued"
                and line["result"] not in ("affirming", "served")]


def test_factory_and_operational_identities_share_the_devices_budget(world):
    """Keyed by the device serial: /config spent with the factory identity of an enrolled device
    is spent for its operational identity too."""
    data, out = world
    dev = out / "TS00000003"
    budgets = Budgets(config=Rate(3, 3600.0))

    async def body(uri, gw):
        await enroll(dev, uri, FW, flow="classic")     # its GET /config is the first of 3
        factory, _ = await device_context(dev, "127.0.0.1")
        op, _ = await device_context(dev, "127.0.0.1", cert_name="op-chain.pem", key_name="op-key.pem")
        try:
            assert (await request(factory, f"{uri}/config")).code == codes.CONTENT
            assert (await request(op, f"{uri}/config")).code == codes.CONTENT
            r = await request(op, f"{uri}/config")
            assert r.code == codes.TOO_MANY_REQUESTS and 3000 < r.opt.max_age <= 3600
            r = await request(factory, f"{uri}/config")
            assert r.code == codes.TOO_MANY_REQUESTS
            # renewal has its own bucket, and a refused request costs the registry nothing
            before = gw.registry.certificates_for_device("TS00000003")
            r = await request(op, f"{uri}/.well-known/est/sren", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.CHANGED
            assert len(gw.registry.certificates_for_device("TS00000003")) == len(before) + 1
        finally:
            await factory.shutdown()
            await op.shutdown()

    run_with_gateway(data, body, budgets=budgets)
