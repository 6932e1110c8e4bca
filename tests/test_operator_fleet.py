"""The operator's queries (gateway/store/fleet.py) on both registry engines, and `devid devices
list --expiring-within` on them; the listener's other doors in process: --metrics-open, and
HTTPS with operator client certificates (mTLS) where a device's certificate is the wrong kind."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import timedelta

import pytest

from devid.ca.store import DeviceState
from devid.gateway.operator.listener import HttpConfig
from devid.gateway.operator.tokens import TokenFile
from devid.gateway.store.fleet import Fleet

from .conftest import NOW, make_csr, ok, one_line_error, register_device, run_devid
from .gateway_helpers import run_with_gateway
from .operator_helpers import call, enroll_devices, make_fleet, start

pytestmark = pytest.mark.engines


def _fleet(ca):
    """Nine devices: D1..D6 enrolled with operational certificates issued 0, 10, ..., 50 days
    before NOW (90-day validity: expiring in 90, 80, ..., 40 days), D7..D9 only provisioned; D9 is a meter."""
    for i in range(1, 10):
        register_device(ca, f"D{i}", "meter" if i == 9 else "temperature-sensor")
    for i in range(1, 7):
        ca.issue_operational(make_csr()[0], f"D{i}", NOW - timedelta(days=10 * (i - 1)))


def test_fleet_queries_page_and_filter_on_both_engines(registry, ca):
    _fleet(ca)
    fleet = Fleet(registry)
    pages, after = [], None
    while True:
        page = fleet.devices(after=after, limit=4)
        pages.append([r.device.serial for r in page])
        if len(page) < 4:
            break
        after = page[-1].device.serial
    assert pages == [["D1", "D2", "D3", "D4"], ["D5", "D6", "D7", "D8"], ["D9"]]
    assert [r.device.serial for r in fleet.devices(state=DeviceState.MANUFACTURED, limit=10)] == ["D7", "D8", "D9"]
    assert [r.device.serial for r in fleet.devices(device_type="meter", limit=10)] == ["D9"]
    due = fleet.devices(expiring_before=NOW + timedelta(days=60), limit=10)
    assert [r.device.serial for r in due] == ["D4", "D5", "D6"]          # 60, 50, 40 days left
    assert due[0].expires is not None and due[0].expires <= NOW + timedelta(days=60)
    # certificates due, soonest first, in pages by (not_after, serial)
    got, after = [], None
    while True:
        page = fleet.certificates_due(NOW + timedelta(days=75), after=after, limit=2)
        got += [(c.certificate.device_serial, c.device_type) for c in page]
        if len(page) < 2:
            break
        after = (page[-1].certificate.not_after, page[-1].certificate.serial)
    assert got == [(f"D{i}", "temperature-sensor") for i in (6, 5, 4, 3)]
    o = fleet.overview(NOW, timedelta(days=45))
    assert o.devices == {"manufactured": 3, "enrolled": 6, "revoked": 0}
    assert o.certificates_due == 1 and o.certificates_overdue == 0
    assert fleet.overview(NOW + timedelta(days=85), timedelta(days=1)).certificates_overdue == 5
    assert fleet.device_types() == ["meter", "temperature-sensor"]


def test_devices_list_expiring_within_on_both_engines(data, registry, ca):
    _fleet(ca)
    # the CLI's clock is real time: NOW (the run's start) is within minutes of it
    doc = json.loads(ok(run_devid("devices", "list", "--expiring-within", "55d", "--json", data_dir=data.path)))
    assert [d["serial"] for d in doc["devices"]] == ["D5", "D6"]
    assert all(d["certificate_expires"] for d in doc["devices"])
    text = ok(run_devid("devices", "list", "--expiring-within", "65d", "--limit", "2", data_dir=data.path))
    assert "D4" in text and "D5" in text and "D6" not in text and "certificate expires" in text
    one_line_error(run_devid("devices", "list", "--expiring-within", "soon", data_dir=data.path), "--expiring-within")
    # beyond 3650 days: one error line, not an overflow's traceback
    one_line_error(run_devid("devices", "list", "--expiring-within", "999999w", data_dir=data.path), "3650 days")


def test_due_is_within_each_device_types_threshold_on_both_engines(data, registry, ca):
    """Without a window, "due" (the API's and the overview's, the expiring gauge) is within each
    device type's renewal threshold: the policy's, which OperatorService is given."""
    from devid.gateway.operator.service import OperatorService
    from devid.gateway.store.gauges import expiring_certificates
    _fleet(ca)
    ca.issue_operational(make_csr()[0], "D9", NOW - timedelta(days=50))       # the meter: 40 days left
    days = {"temperature-sensor": 45, "meter": 35}
    threshold = lambda t: timedelta(days=days.get(t, 30))       # noqa: E731
    fleet = Fleet(registry)
    assert [c.certificate.device_serial for c in fleet.certificates_due(now=NOW, threshold=threshold)] == ["D6"]
    assert fleet.overview(NOW, threshold).certificates_due == 1
    assert expiring_certificates(registry, NOW, threshold) == {"meter": 0, "temperature-sensor": 1}
    svc = OperatorService(registry, data.path, lambda: NOW, data.cert("gateway"), data.cert("operational"),
                          threshold=threshold)
    assert [c["device_type"] for c in svc.expiring(None).items] == ["temperature-sensor"]
    o = svc.overview()
    assert o["certificates_due"] == 1 and o["due_within_days"] is None
    assert len(svc.expiring("41d").items) == 2          # a window given: the same for every type
    days["meter"] = 41                                  # a reloaded policy counts at the next request
    assert sorted(c["device_type"] for c in svc.expiring(None).items) == ["meter", "temperature-sensor"]
    assert svc.overview()["certificates_due"] == 2
    assert expiring_certificates(registry, NOW, threshold) == {"meter": 1, "temperature-sensor": 1}


@pytest.mark.sqlite_only
def test_the_overview_and_the_gauge_read_indexes(registry, ca):
    """The queries on every overview page view and scrape range over an index (SQLite's plan)."""
    from devid.gateway.store.fleet import device_types
    from devid.gateway.store.gauges import expiring_certificates
    _fleet(ca)
    db = registry._db
    plan = lambda sql, *p: " ".join(r[-1] for r in db.execute("EXPLAIN QUERY PLAN " + sql, p).fetchall())  # noqa
    per_minute = plan("SELECT substr(issued_at, 1, 16), COUNT(*) FROM certificates WHERE profile = 'operational' "
                      "AND issued_at >= ? GROUP BY substr(issued_at, 1, 16)", "2026-01-01")
    assert "certificates_issued" in per_minute, per_minute
    seen = []
    db.set_trace_callback(seen.append)
    try:
        assert device_types(registry) == ["meter", "temperature-sensor"]
        expiring_certificates(registry, NOW, lambda t: timedelta(days=30))
    finally:
        db.set_trace_callback(None)
    # the device types: one probe of devices_type_serial per type, not a scan of it
    types = plan(seen[0])
    assert "devices_type_serial" in types and "SCAN devices" not in types, types
    # the expiring gauge: a range of certificates_expiry, each row's device looked up by serial
    gauge = [s for s in seen if "COUNT(*)" in s and "certificates c" in s]
    assert len(gauge) == 1, seen
    steps = plan(gauge[0])
    assert steps.startswith("SEARCH c USING INDEX certificates_expiry") and "SCAN" not in steps, steps


@pytest.mark.sqlite_only
def test_metrics_open_opens_only_metrics(data):
    async def body(uri, gw):
        url = gw.operator.url
        metrics, devices = await asyncio.gather(asyncio.to_thread(call, url + "/metrics"),
                                                asyncio.to_thread(call, url + "/api/v1/devices"))
        assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert devices.status == 401
    run_with_gateway(data, body, http=HttpConfig("127.0.0.1", 0, metrics_open=True))


@pytest.mark.sqlite_only
def test_operator_certificates_over_https(data, world, tmp_path):
    from devid.gateway.device.enroll import enroll
    from .gateway_helpers import FW
    data, out = world
    certs = tmp_path / "op"
    doc = json.loads(ok(run_devid("operator", "cert", "--out", certs, "--name", "alice", "--json",
                                  data_dir=data.path)))
    assert doc["subject"].startswith("CN=alice,OU=devid operator")
    assert (certs / "alice.key.pem").stat().st_mode & 0o077 == 0
    one_line_error(run_devid("operator", "cert", "--out", certs, "--name", "alice", data_dir=data.path), "exists")
    one_line_error(run_devid("operator", "cert", "--out", certs, "--name", "../x", data_dir=data.path), "--name")
    bundle = out / "TS00000001"

    def client(cert=None, key=None):
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.check_hostname = False          # the listener's names are the gateway's (gw.example.net, localhost)
        if cert:
            ctx.load_cert_chain(str(cert), str(key))
        return ctx

    async def body(uri, gw):
        url = gw.operator.url
        assert url.startswith("https://")
        await enroll(bundle, uri, FW)
        token = TokenFile(data.path).current()
        as_alice = client(certs / "alice.cert.pem", certs / "alice.key.pem")
        as_device = client(bundle / "op-chain.pem", bundle / "op-key.pem")
        go = asyncio.to_thread
        a = await go(call, url + "/api/v1/devices/TS00000001", context=as_alice)
        assert a.status == 200 and a.json["state"] == "enrolled"
        d = await go(call, url + "/api/v1/devices", context=as_device)
        assert d.status == 403 and d.json["type"].endswith("/wrong-credential"), d.body
        assert "operational" in d.json["detail"]
        n = await go(call, url + "/api/v1/devices", context=client())
        assert n.status == 401
        t = await go(call, url + "/api/v1/devices", context=client(), token=token)
        assert t.status == 200
        # a browser holding alice's certificate, on another site's page: its form POSTs (an empty
        # one, a text/plain one, one claiming JSON) carry a foreign Origin or Referer: refused
        rev = url + "/api/v1/devices/TS00000002/revoke"
        for headers, body, ctype in (({"Origin": "https://evil.example"}, b"", "application/x-www-form-urlencoded"),
                                     ({"Origin": "https://evil.example"}, b'{"reason": "x"}', "text/plain"),
                                     ({"Referer": "https://evil.example/a"}, {"reason": "keyCompromise"},
                                      "application/json"),
                                     ({"Origin": "null"}, {}, "application/json")):
            f = await go(call, rev, "POST", context=as_alice, headers=headers, body=body, content_type=ctype)
            assert f.status == 403 and f.json["type"].endswith("/csrf"), (headers, f.body)
        # with no Origin (not a browser's form), a write still needs the JSON type, body or none
        e = await go(call, rev, "POST", context=as_alice)
        assert e.status == 415 and e.json["type"].endswith("/unsupported-media-type"), e.body
        same = {"Origin": url}
        assert (await go(call, rev, "GET", context=as_alice)).status == 405
        assert (await go(call, url + "/api/v1/devices/TS00000002", context=as_alice)).json["state"] != "revoked"
        # a bearer token is never sent by a browser on its own: a foreign Origin does not matter
        nf = await go(call, url + "/api/v1/certificates/ABCDEF0123456789/revoke", "POST", context=client(),
                      token=token, body={}, headers={"Origin": "https://evil.example"})
        assert nf.status == 404, nf.body
        r = await go(call, rev, "POST", context=as_alice, headers=same, body={"reason": "cessationOfOperation"})
        assert r.status == 200 and r.json["device"]["state"] == "revoked"
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("devid.operator").addHandler(handler)
    logging.getLogger("devid.operator").setLevel(logging.INFO)
    try:
        run_with_gateway(data, body, http=HttpConfig("127.0.0.1", 0, tls=True))
    finally:
        logging.getLogger("devid.operator").removeHandler(handler)
    revokes = [r for r in records if r.getMessage() == "revoke"]
    # named by CN and serial (two operator certificates may share a CN)
    assert [(r.who, r.device, r.via) for r in revokes] == [(f"cert:alice/{doc['serial']}", "TS00000002", "api")]


@pytest.mark.sqlite_only
def test_with_workers_one_listener_sees_what_every_worker_did(tmp_path):
    data, factory = make_fleet(tmp_path, count=4)
    served = start(data, factory, tmp_path / "serve.log", workers=2)
    try:
        # four sessions from four source ports: the kernel spreads them over both workers
        enroll_devices(served, "TS00000001", "TS00000002", "TS00000003", "TS00000004")
        doc = call(served.url + "/api/v1/devices?state=enrolled", token=served.token).json
        assert [d["serial"] for d in doc["devices"]] == [f"TS0000000{i}" for i in range(1, 5)]
        assert call(served.url + "/api/v1/devices").status == 401
        # /metrics through the listener: every worker's counts summed (multiprocess mode), and the
        # registry's gauge from the shared registry
        from prometheus_client.parser import text_string_to_metric_families
        answer = call(served.url + "/metrics", token=served.token)
        assert answer.status == 200 and answer.content_type == "text/plain"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(answer.body.decode()) for s in family.samples}
        assert samples[("devid_enrollment_decisions_total", (("action", "enroll"), ("result", "issued")))] == 4
        assert samples[("devid_dtls_handshakes_total", (("result", "ok"),))] >= 4
        assert call(served.url + "/metrics").status == 401          # no --metrics-open: a credential
    finally:
        assert served.stop() == 0
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    # one listener, worker 0's: no other worker announced one
    assert "operator listening" not in served.rest and "stopped" in served.rest
