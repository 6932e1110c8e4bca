"""The lean load generator (benchmarks/loadgen.py) against the real gateway on loopback, and
`devid bench --client lean` as a subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from aiocoap import Message
from aiocoap.numbers import codes
from aiocoap.optiontypes import BlockOption
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from devid.ca.store import CertStatus, DeviceState
from devid.gateway.device.enroll import renew
from devid.gateway.device.identity import Firmware
from devid.gateway.device.protocol import CT_PKIX_CERT, SEN
from devid.gateway.factory.provisioning import provision
from devid.gateway.app.server import POLICY_FILE, Gateway, GatewayConfig

from .conftest import NOW, free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_common  # noqa: E402
import loadgen  # noqa: E402
import loadgen_coap  # noqa: E402

FW = bench_common.bench_firmware()
BAD_FW = Firmware("sha-256", hashlib.sha256(b"tampered firmware").digest(), FW.name, FW.version)


@pytest.fixture
def fleet(data, ca, tmp_path):
    (data.path / POLICY_FILE).write_text(bench_common.bench_policy())
    out = tmp_path / "factory"
    provision(ca, count=6, device_type=bench_common.DEVICE_TYPE, out=out, serial_prefix="LG", now=lambda: NOW,
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"))
    return data, sorted(out.iterdir())


def with_gateway(data, body):
    async def main():
        port = free_port()
        gw = Gateway(data, GatewayConfig(listen=[("127.0.0.1", port)]))
        await gw.start()
        try:
            return await body(loadgen.Target.parse(f"coaps://127.0.0.1:{port}"), gw)
        finally:
            await gw.stop()
    return asyncio.run(main())


def _serial(cert: x509.Certificate) -> str:
    return cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value


def _validates(cert: x509.Certificate, data) -> None:
    verifier = PolicyBuilder().store(Store([data.cert("root")])).time(datetime.now(timezone.utc)) \
        .build_client_verifier()
    verifier.verify(cert, [data.cert("operational")])
    cert.verify_directly_issued_by(data.cert("operational"))


def test_enrolls_every_device_and_reports_a_refused_one(fleet):
    data, bundles = fleet
    devices, bad = loadgen.load_devices(bundles)
    assert not bad and len(devices) == 6
    tampered = devices[2].serial

    async def body(target, gw):
        trust = loadgen.Trust(devices[0].root, target.host)
        report = await loadgen.run(target, devices, trust, concurrency=4,
                                   firmware=lambda d: BAD_FW if d.serial == tampered else FW, timeout=15)
        return report, gw.registry

    report, registry = with_gateway(data, body)
    # the tampered device fails at the evidence step, with the verdict; the others enroll
    assert list(report.failures) == [tampered]
    assert report.failures[tampered].startswith("evidence: verdict "), report.failures
    assert "firmware" in report.failures[tampered]
    assert sorted(o.serial for o in report.outcomes) == sorted(d.serial for d in devices if d.serial != tampered)
    reg = data.open_registry()
    try:
        for o in report.outcomes:
            # the one-request flow (the default): no nonce request, the verdict in the /sen answer
            assert set(o.steps) == {"connect", "evidence", "enroll", "config"}
            assert _serial(o.cert) == o.serial and o.cert.public_key() == o.key.public_key()
            _validates(o.cert, data)
            assert reg.get_device(o.serial).state is DeviceState.ENROLLED
            current = [c for c in reg.certificates_for_device(o.serial)
                       if c.profile == "operational" and c.status is CertStatus.CURRENT]
            assert [c.serial for c in current] == [o.cert.serial_number]
        assert reg.get_device(tampered).state is DeviceState.MANUFACTURED
    finally:
        reg.close()
    summary = report.summary()
    assert summary["done"] == 5 and summary["errors"] == 1 and summary["client_cpu_ms_per_op"] > 0
    assert set(summary["step_latency_ms"]) == {"connect", "evidence", "enroll", "config"}


def test_renew_with_the_saved_operational_identities(fleet):
    data, bundles = fleet
    bundles = bundles[:3]

    async def body(target, gw):
        devices, _ = loadgen.load_devices(bundles)
        trust = loadgen.Trust(devices[0].root, target.host)
        enrolled = await loadgen.run(target, devices, trust, firmware=FW, timeout=15)
        assert not enrolled.failures
        loadgen.save_operational(devices, enrolled)
        ops, bad = loadgen.load_devices(bundles, operational=True)
        assert not bad
        renewed = await loadgen.run(target, ops, loadgen.Trust(ops[0].root, target.host, full_chain=True),
                                    renew=True, timeout=15)
        loadgen.save_operational(ops, renewed)
        # the field engineer's script renews from what the load generator saved
        again = await renew(bundles[0], target.uri, timeout=15)
        return enrolled, renewed, again

    enrolled, renewed, again = with_gateway(data, body)
    assert not renewed.failures and len(renewed.outcomes) == 3
    first = {o.serial: o.cert for o in enrolled.outcomes}
    reg = data.open_registry()
    try:
        for o in renewed.outcomes:
            assert set(o.steps) == {"connect", "renew"}
            assert o.cert.serial_number != first[o.serial].serial_number
            assert _serial(o.cert) == o.serial and o.cert.public_key() == o.key.public_key()
            _validates(o.cert, data)
            statuses = {c.serial: c.status for c in reg.certificates_for_device(o.serial)}
            assert statuses[first[o.serial].serial_number] is CertStatus.SUPERSEDED
            expected = again.serial_number if o.serial == _serial(again) else o.cert.serial_number
            assert statuses[expected] is CertStatus.CURRENT
    finally:
        reg.close()


def test_a_device_the_gateway_refuses_fails_at_connect(fleet):
    data, bundles = fleet
    from devid.ca.revocation import revoke_device
    devices, _ = loadgen.load_devices(bundles[:2])
    reg = data.open_registry()
    revoke_device(reg, devices[1].serial, "keyCompromise", datetime.now(timezone.utc))
    reg.close()

    async def body(target, gw):
        return await loadgen.run(target, devices, loadgen.Trust(devices[0].root, target.host), firmware=FW,
                                 timeout=15)

    report = with_gateway(data, body)
    assert [o.serial for o in report.outcomes] == [devices[0].serial]
    assert report.failures[devices[1].serial].startswith("connect: "), report.failures


def test_coap_codec_against_aiocoap():
    opts = [*SEN[CT_PKIX_CERT].options, loadgen_coap.block2_option(2, 6)]
    raw = loadgen_coap.encode_message(loadgen_coap.CON, loadgen_coap.POST, 0x1234, b"\x00\x07",
                                      loadgen_coap.encode_options(opts), b"csr")
    m = Message.decode(raw)
    assert (m.mtype.value, m.code, m.mid, m.token) == (0, codes.POST, 0x1234, b"\x00\x07")
    assert m.opt.uri_path == (".well-known", "est", "sen")
    assert (m.opt.content_format, m.opt.accept) == (286, 287)
    assert (m.opt.block2.block_number, m.opt.block2.size_exponent) == (2, 6) and m.payload == b"csr"

    # a response with a long option (delta and length extensions) and Block2
    reply = Message(code=codes.CONTENT, payload=b"x" * 1024, content_format=60, etag=b"e" * 8,
                    location_path=["a" * 300])
    reply.mtype, reply.mid, reply.token = loadgen_coap.ACK, 7, b"\x01\x02"
    reply.opt.block2 = BlockOption.BlockwiseTuple(0, True, 6)
    r = loadgen_coap.decode_message(reply.encode())
    assert (r.mtype, r.code, r.mid, r.token, r.content_format) == (loadgen_coap.ACK, loadgen_coap.CONTENT, 7,
                                                                    b"\x01\x02", 60)
    assert (r.block2 >> 4, r.block2 >> 3 & 1, r.block2 & 7) == (0, 1, 6) and r.payload == b"x" * 1024
    assert r.code_text == "2.05"
    for bad in (b"", b"\x80\x45\x00\x01", b"\x49\x45\x00\x01", b"\x40\x45\x00\x01\xff"):
        with pytest.raises(ValueError):
            loadgen_coap.decode_message(bad)


def test_devid_bench_with_the_lean_client(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "bench", "--devices", "20", "--no-baselines",
                           "--client", "lean", "--renew"],
                          capture_output=True, timeout=300, cwd=ROOT,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("DEVID_")},
                               "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    summary = json.loads(proc.stdout)
    for mode in ("enroll", "renew"):
        run = summary[mode]
        assert run["client"] == "lean" and run["done"] == 20 and run["errors"] == 0
        assert run["client_cpu_ms_per_op"] > 0 and run["server_cpu_ms_per_op"] > 0
    # the one-request flow (the default): no nonce step
    assert set(summary["enroll"]["step_latency_ms"]) == {"connect", "evidence", "enroll", "config"}
    assert summary["enroll"]["step_latency_ms"]["connect"]["p95"] > 0
