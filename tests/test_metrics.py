"""Metrics (docs/operations.md#metrics): they move as the real gateway enrolls, refuses and renews
devices, read back through `exposition()` and prometheus-client's own parser; no label names a
device or an address."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import aiocoap
import pytest
from aiocoap.numbers import codes
from prometheus_client.parser import text_string_to_metric_families

from devid.ca.revocation import revoke_device
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll, renew
from devid.gateway.system import metrics

from .conftest import NOW
from .gateway_helpers import FW, run_with_gateway


def scrape() -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of one exposition."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def _get(directory, uri, path, op=False):
    names = {"cert_name": "op-chain.pem", "key_name": "op-key.pem"} if op else {}
    ctx, _ = await device_context(directory, "127.0.0.1", **names)
    try:
        return await asyncio.wait_for(ctx.request(aiocoap.Message(code=codes.GET, uri=uri + path)).response, 15)
    finally:
        await ctx.shutdown()


def test_metrics_follow_enrollments_refusals_and_renewals(world):
    data, out = world
    ts1, ts2, ts4, un1 = out / "TS00000001", out / "TS00000002", out / "TS00000004", out / "UN00000001"
    seen = {}

    async def body(uri, gw):
        gw.gauges.threshold = lambda device_type: timedelta(days=3650)    # every certificate is "due"
        seen["before"] = scrape()
        await enroll(ts1, uri, FW)                              # one-request flow: evidence in the CSR
        await renew(ts1, uri)
        answer = await _get(ts2, uri, "/config")                # not enrolled: 4.03
        assert answer.code == codes.FORBIDDEN
        answer = await _get(ts2, uri, "/attest/nonce")          # a server nonce, left outstanding
        assert answer.code == codes.CONTENT
        with pytest.raises(Exception):
            await enroll(un1, uri, FW)                          # its type is not in the policy: 4.03
        revoke_device(gw.registry, "TS00000004", "keyCompromise", NOW)
        with pytest.raises(Exception):
            await _get(ts4, uri, "/whoami")                     # handshake refused: revoked
        gw.gauges.invalidate()          # the count of certificates due is cached (store/gauges.py EXPIRING_TTL)
        seen["during"] = scrape()                               # the sessions of the flows are closed by now
    run_with_gateway(data, body)
    before, after = seen["before"], seen["during"]
    d = lambda name, **labels: delta(before, after, name, **labels)     # noqa: E731

    # DTLS: completed handshakes (enroll, renew, two GETs, the refused enrollment's) and the revoked one
    assert d("devid_dtls_handshakes_total", result="ok") >= 5
    assert d("devid_dtls_handshakes_total", result="refused") == 1
    assert d("devid_dtls_handshake_refusals_total", reason="revoked") == 1
    # CoAP: by resource and code
    # (a response in blocks is one request per block: the certificate and configuration take two)
    assert d("devid_coap_requests_total", resource="/.well-known/est/sen", code="2.04") >= 1
    assert d("devid_coap_requests_total", resource="/.well-known/est/sren", code="2.04") >= 1
    assert d("devid_coap_requests_total", resource="/config", code="4.03") == 1
    assert d("devid_coap_requests_total", resource="/attest/nonce", code="2.05") == 1
    assert d("devid_coap_request_duration_seconds_count", resource="/.well-known/est/sen") >= 2
    # the service: enrollments and renewals by result, verdicts by tier
    assert d("devid_enrollment_decisions_total", action="enroll", result="issued") == 1
    assert d("devid_enrollment_decisions_total", action="enroll", result="refused") == 1
    assert d("devid_enrollment_decisions_total", action="renew", result="issued") == 1
    assert d("devid_enrollment_decisions_total", action="config", result="refused") == 1
    assert d("devid_attestation_verdicts_total", tier="affirming") == 1
    assert d("devid_issuance_duration_seconds_count", action="enroll") == 1
    assert d("devid_issuance_duration_seconds_count", action="renew") == 1
    # registry transactions: the issuances at least, on this test's engine
    tx = sum(delta(before, after, "devid_registry_transaction_duration_seconds_count", engine=e, durable=v)
             for e in ("sqlite", "postgresql") for v in ("true", "false"))
    assert tx >= 2
    # gauges read from the registry at scrape time
    assert after[("devid_attestation_outstanding_nonces", ())] == 1
    assert after[("devid_certificates_expiring", (("device_type", "temperature-sensor"),))] == 1
    assert after[("devid_dtls_sessions", ())] == 0
    # bounded labels: no serial, address or fingerprint in any label value
    for name, labels in after:
        for key, value in labels:
            assert "TS0000" not in value and "127.0.0.1" not in value and len(value) < 64, (name, key, value)


def test_off_switch_makes_every_metric_a_no_op(monkeypatch):
    """DEVID_METRICS=off (the benchmark's baseline): the module's metrics count nothing."""
    import importlib
    import subprocess
    import sys
    code = ("from devid.gateway.system import metrics as m; m.REQUESTS.labels('/x', '2.05').inc(); "
            "print(m.ENABLED, b'devid_coap_requests_total{' in m.exposition()[0])")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**__import__("os").environ, "DEVID_METRICS": "off"})
    assert on.stdout.split() == ["True", "True"], on.stderr
    assert off.stdout.split() == ["False", "False"], off.stderr
    assert importlib.import_module("devid.gateway.system.metrics").ENABLED


def test_refusal_classes_are_a_fixed_set():
    labels = {metrics.refusal_class(text) for text in (
        "handshake timeout", "certificate of device LG00000002 is revoked", "peer did not return a certificate",
        "certificate refused by OpenSSL: self-signed certificate", "certificate unknown to the registry",
        "certificate path does not validate: the certificate expired on 2026-01-01", "anything new 12345")}
    assert labels == {"timeout", "revoked", "no-certificate", "unknown-ca", "unknown-certificate", "expired", "other"}
    assert metrics.resource_label(("no", "such", "path"), False) == "unknown"


def test_fixed_label_sets_exist_at_zero_from_the_start():
    """A fresh process (a subprocess: this one has counted already) exposes every anomaly kind,
    handshake result, refusal class, verdict tier and enrollment decision at 0 before anything
    happens, so an alert on increase() fires on the first event, not the second."""
    import subprocess
    import sys
    from devid.gateway.service.anomalies import KINDS
    code = ("import devid.gateway.service.anomalies\n"
            "from devid.gateway.system.metrics import exposition\n"
            "import sys; sys.stdout.write(exposition()[0].decode())\n")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PROMETHEUS_MULTIPROC_DIR", "DEVID_METRICS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env, timeout=120)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out.stdout.decode()) for s in f.samples}
    expected = [("devid_anomalies_total", (("kind", k),)) for k in KINDS]
    expected += [("devid_dtls_handshakes_total", (("result", r),)) for r in ("ok", "refused")]
    expected += [("devid_dtls_handshake_refusals_total", (("reason", r),))
                 for r in {label for _, label in metrics.REFUSAL_CLASSES} | {"other"}]
    expected += [("devid_attestation_verdicts_total", (("tier", t),)) for t in ("affirming", "warning", "contraindicated")]
    expected += [("devid_enrollment_decisions_total", (("action", a), ("result", r)))
                 for a, results in metrics.DECISION_RESULTS.items() for r in results]
    assert ("devid_enrollment_decisions_total", (("action", "renew"), ("result", "issued"))) in expected
    missing = [key for key in expected if samples.get(key) != 0.0]
    assert not missing, missing
