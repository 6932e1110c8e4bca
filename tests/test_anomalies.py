"""Anomaly signals (docs/operations.md#anomaly-signals): raised by the real gateway as devices are
refused, renew and fall from an affirming verdict, each as `devid_anomalies_total{kind}` and one
`anomaly` log line naming the device; the tracker's memory stays within its cap."""

from __future__ import annotations

import logging

import cbor2
import pytest
from aiocoap.numbers import codes

from devid.ca.revocation import revoke_device
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll, renew
from devid.gateway.service.anomalies import AnomalySettings, AnomalyTracker
from devid.gateway.system import metrics

from .conftest import NOW
from .gateway_helpers import FW, request, run_with_gateway, token_for


def anomaly_count(kind: str) -> float:
    return metrics.ANOMALIES.labels(kind)._value.get()


def anomalies(caplog) -> list[dict]:
    return [{"result": r.result, "serial": r.serial} for r in caplog.records if r.name == "devid.anomaly"]


def test_the_gateway_raises_each_signal_once_naming_the_device(world, caplog):
    data, out = world
    ts1, ts2, ts4 = out / "TS00000001", out / "TS00000002", out / "TS00000004"
    before = {kind: anomaly_count(kind) for kind in ("refusals", "renewal-storm", "verdict-drop")}
    settings = AnomalySettings(refusals=3, renewals=2)

    async def body(uri, gw):
        await enroll(ts1, uri, FW)                      # affirming (evidence in the CSR)
        await renew(ts1, uri)
        await renew(ts1, uri)                           # the second renewal within the window: a storm
        ctx, _ = await device_context(ts2, "127.0.0.1")
        try:
            for _ in range(5):                          # 4.03 each: refusals at the third, once
                r = await request(ctx, f"{uri}/config")
                assert r.code == codes.FORBIDDEN
        finally:
            await ctx.shutdown()
        revoke_device(gw.registry, "TS00000004", "keyCompromise", NOW)
        for _ in range(3):                              # refused handshakes name the revoked device
            with pytest.raises(Exception):
                ctx, _ = await device_context(ts4, "127.0.0.1", handshake_timeout=5)
                try:
                    await request(ctx, f"{uri}/whoami")
                finally:
                    await ctx.shutdown()
        # the factory identity of the enrolled device, with evidence of unknown firmware: the
        # verdict falls from affirming to contraindicated
        ctx, _ = await device_context(ts1, "127.0.0.1")
        try:
            nonce = cbor2.loads((await request(ctx, f"{uri}/attest/nonce")).payload)["nonce"]
            r = await request(ctx, f"{uri}/attest/evidence", codes.POST,
                              payload=token_for(ts1, nonce, fw_digest=b"\x02" * 32), content_format=60)
            assert cbor2.loads(r.payload)["verdict"] == "contraindicated"
        finally:
            await ctx.shutdown()

    with caplog.at_level(logging.INFO, logger="devid"):
        run_with_gateway(data, body, anomalies=settings)
    raised = anomalies(caplog)
    assert {"result": "renewal-storm", "serial": "TS00000001"} in raised
    assert {"result": "refusals", "serial": "TS00000002"} in raised
    assert {"result": "refusals", "serial": "TS00000004"} in raised
    assert {"result": "verdict-drop", "serial": "TS00000001"} in raised
    assert len(raised) == 4, raised                     # once per device and kind within the window
    assert anomaly_count("refusals") - before["refusals"] == 2
    assert anomaly_count("renewal-storm") - before["renewal-storm"] == 1
    assert anomaly_count("verdict-drop") - before["verdict-drop"] == 1
    drop = [r for r in caplog.records if r.name == "devid.anomaly" and r.result == "verdict-drop"][0]
    assert (drop.previous, drop.tier, drop.levelname) == ("affirming", "contraindicated", "WARNING")
    refused_hs = [r for r in caplog.records if r.name == "devid.dtls" and getattr(r, "result", None) == "refused"]
    assert refused_hs and all(r.serial == "TS00000004" for r in refused_hs)


def test_many_addresses_within_the_window(caplog):
    now = [0.0]
    tracker = AnomalyTracker(AnomalySettings(addresses=3, addresses_window=60.0), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="devid.anomaly"):
        tracker.seen("SN1", "192.0.2.1")
        tracker.seen("SN1", "192.0.2.1")            # the same address again: still one
        tracker.seen("SN1", "192.0.2.2")
        now[0] = 120.0                              # the first two fall out of the window
        tracker.seen("SN1", "192.0.2.3")
        tracker.seen("SN1", "192.0.2.4")
        assert anomalies(caplog) == []
        tracker.seen("SN1", "198.51.100.7")         # three within 60 s
        tracker.seen("SN1", "198.51.100.8")         # raised once per window
    assert anomalies(caplog) == [{"result": "many-addresses", "serial": "SN1"}]
    assert caplog.records[0].address == "198.51.100.7" and caplog.records[0].count == 3


def test_the_tracker_is_bounded_and_evicts_the_least_recent():
    """A flood of identities (stolen credentials, or many devices) keeps at most max_identities."""
    tracker = AnomalyTracker(AnomalySettings(refusals=1000, max_identities=50))
    evicted = metrics.ANOMALY_EVICTIONS._value.get()
    for i in range(2000):
        tracker.refused(f"SN{i:08d}", "handshake")
        for _ in range(3):
            tracker.refused("KEEP", "request")      # seen all the time: never the one dropped
    assert len(tracker) == 50
    assert "KEEP" in tracker._states and "SN00000000" not in tracker._states
    assert metrics.ANOMALY_EVICTIONS._value.get() - evicted == 2000 + 1 - 50
    # and each identity's own state is bounded by its thresholds
    state = tracker._states["KEEP"]
    assert len(state.refused) == 1000 and len(state.addresses) == 0
