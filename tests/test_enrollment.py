"""Zero-touch enrollment end to end over loopback DTLS: the device flow, every authorization rule,
and threats 1-7 of shared/design/threats.md."""

from __future__ import annotations

import asyncio
import json
import socket

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.ca.revocation import revoke_device
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import EnrollFailed, Firmware, enroll, fetch_config, renew
from devid.gateway.app.server import POLICY_FILE

from .conftest import NOW, free_port, make_csr

from .gateway_helpers import FW, IMAGE, problem, request, run_with_gateway, token_for

pytestmark = pytest.mark.engines


# -- the whole life cycle ---------------------------------------------------------------------------

def test_provision_serve_enroll_config_renew_revoke_refused(world):
    data, out = world
    dev = out / "TS00000001"

    async def body(uri, gw):
        steps = []
        result = await enroll(dev, uri, FW, report=lambda s, t: steps.append(s))
        assert steps == ["nonce", "evidence", "enroll", "config"] and result.verdict == "affirming"
        op = x509.load_pem_x509_certificate((dev / "op-cert.pem").read_bytes())
        chain = x509.load_pem_x509_certificates((dev / "op-chain.pem").read_bytes())
        assert chain[0] == op and chain[1] == data.cert("operational")
        assert oct((dev / "op-key.pem").stat().st_mode & 0o777) == "0o600"
        config = cbor2.loads((dev / "config.cbor").read_bytes())
        assert config["device"] == "TS00000001" and config["endpoints"]["gateway"].startswith("coaps://")
        assert config["trust_anchors"][0] == data.cert("root").public_bytes(serialization.Encoding.DER)
        assert (dev / "config.json").exists()
        renewed = await renew(dev, uri)
        assert renewed.serial_number != op.serial_number
        certs = {c.serial: c.status for c in gw.registry.certificates_for_device("TS00000001")}
        assert certs[op.serial_number] is CertStatus.SUPERSEDED and certs[renewed.serial_number] is CertStatus.CURRENT
        assert await fetch_config(dev, uri)            # the renewed identity works
        revoke_device(gw.registry, "TS00000001", "keyCompromise", NOW)
        with pytest.raises(EnrollFailed) as refused:
            await renew(dev, uri, timeout=5)
        assert refused.value.step == "connect"
        entries = AttestationStore(gw.registry).log_entries(device_serial="TS00000001")
        assert [e.tier.value for e in entries] == ["affirming"]
    run_with_gateway(data, body)
    assert data.open_registry().get_device("TS00000001").state is DeviceState.REVOKED


def test_the_enroll_command_end_to_end(world):
    """`devid enroll` as a field engineer runs it, against `devid serve` as a separate process."""
    import os
    import subprocess
    import sys
    data, out = world
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    serve = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert "listening" in serve.stdout.readline().decode()
        image = out / "fw.bin"
        image.write_bytes(IMAGE)
        base = ["--gateway", f"coaps://127.0.0.1:{port}", "--device", str(out / "TS00000002")]
        cmd = [sys.executable, "-m", "devid.gateway.cli", "enroll", *base, "--firmware", str(image),
               "--firmware-name", FW.name, "--firmware-version", FW.version]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "[1/4] nonce" in proc.stdout and "[4/4] config" in proc.stdout and "OK: device TS00000002" in proc.stdout
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)    # safe to rerun
        assert again.returncode == 0, again.stderr
        wrong = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "enroll", *base, "--firmware-digest",
                                "ab" * 32, "--firmware-name", FW.name, "--firmware-version", FW.version],
                               capture_output=True, text=True, timeout=60, env=env)
        assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
        assert wrong.stderr.count("\n") == 1 and "evidence" in wrong.stderr and "firmware-unknown" in wrong.stderr
        renew_proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "renew", *base[:2], "--device",
                                     str(out / "TS00000002")], capture_output=True, text=True, timeout=60, env=env)
        assert renew_proc.returncode == 0 and "OK: renewed" in renew_proc.stdout, renew_proc.stderr
    finally:
        serve.terminate()
        serve.wait(15)


# -- authorization rules -------------------------------------------------------------------------------

def test_factory_identity_rules(world):
    data, out = world
    dev = out / "TS00000003"

    async def body(uri, gw):
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            # /sen without a verdict: refused
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.FORBIDDEN and problem(r)[-1] == "attestation required"
            # factory identities may not use /sren, nor /config before the device is enrolled
            for path, code in (("/.well-known/est/sren", codes.POST), ("/config", codes.GET)):
                r = await request(ctx, uri + path, code, payload=make_csr()[0] if code == codes.POST else b"",
                                  **({"content_format": 286} if code == codes.POST else {}))
                assert r.code == codes.FORBIDDEN and problem(r)[-1] == "wrong identity for this resource"
            # an acceptable verdict allows exactly one enrollment
            nonce = cbor2.loads((await request(ctx, f"{uri}/attest/nonce")).payload)["nonce"]
            r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token_for(dev, nonce),
                              content_format=60)
            assert r.code == codes.CHANGED and cbor2.loads(r.payload)["verdict"] == "affirming"
            # a bad CSR is refused before the verdict is used: it stays available
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=b"\x30\x03\x02\x01\x00",
                              content_format=286)
            assert r.code == codes.BAD_REQUEST and problem(r)[-1] == "invalid CSR"
            assert "Rust" not in problem(r).get(-2, "") and "ParseError" not in problem(r).get(-2, "")
            key = ec.generate_private_key(ec.SECP256R1())
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr(key)[0],
                              content_format=286)
            # no Accept: 281 (RFC 9148 4.3), the new certificate and the operational CA, in any order
            assert r.code == codes.CHANGED and r.opt.content_format == 281
            certs = pkcs7.load_der_pkcs7_certificates(r.payload)
            [cert] = [c for c in certs if c.public_key() == key.public_key()]
            assert [c for c in certs if c is not cert] == [data.cert("operational")]
            # enrolled now: the same session (factory identity) gets the configuration, not /sren
            r = await request(ctx, f"{uri}/config", accept=50)
            assert r.code == codes.CONTENT and b'"device": "TS00000003"' in r.payload
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.FORBIDDEN and problem(r)[-1] == "wrong identity for this resource"
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=286)
            assert r.code == codes.FORBIDDEN and problem(r)[-1] == "attestation required"
            # wrong content formats and Accept values
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                              content_format=60)
            assert r.code == codes.UNSUPPORTED_CONTENT_FORMAT
            r = await request(ctx, f"{uri}/.well-known/est/crts", accept=60)
            assert r.code == codes.NOT_ACCEPTABLE
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


@pytest.mark.sqlite_only       # injects the failure with an SQLite trigger
def test_failed_issuance_does_not_use_up_the_verdict(world):
    """The verdict is taken and the certificate recorded in one transaction: when recording fails
    (an injected failure), the verdict stays available for the next /sen."""
    data, out = world
    dev = out / "TS00000002"

    async def body(uri, gw):
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            nonce = cbor2.loads((await request(ctx, f"{uri}/attest/nonce")).payload)["nonce"]
            r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token_for(dev, nonce),
                              content_format=60)
            assert cbor2.loads(r.payload)["acceptable"] is True
            gw.registry._db.execute(
                "CREATE TEMP TRIGGER inject BEFORE INSERT ON certificates WHEN NEW.device_serial = 'TS00000002' "
                "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0], content_format=286)
            assert r.code == codes.INTERNAL_SERVER_ERROR and r.payload == b""
            assert gw.registry.get_device("TS00000002").state is DeviceState.MANUFACTURED
            gw.registry._db.execute("DROP TRIGGER inject")
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0], content_format=286)
            assert r.code == codes.CHANGED
            assert gw.registry.get_device("TS00000002").state is DeviceState.ENROLLED
            # and that verdict is now used
            r = await request(ctx, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0], content_format=286)
            assert r.code == codes.FORBIDDEN and problem(r)[-1] == "attestation required"
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


def test_operational_identity_rules(world):
    data, out = world
    dev = out / "TS00000004"

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        ctx, _ = await device_context(dev, "127.0.0.1", cert_name="op-chain.pem", key_name="op-key.pem")
        try:
            for path, code in (("/attest/nonce", codes.GET), ("/.well-known/est/sen", codes.POST)):
                r = await request(ctx, uri + path, code, payload=make_csr()[0] if code == codes.POST else b"",
                                  **({"content_format": 286} if code == codes.POST else {}))
                assert r.code == codes.FORBIDDEN and problem(r)[-1] == "wrong identity for this resource"
            r = await request(ctx, f"{uri}/config", accept=50)
            assert r.code == codes.CONTENT and b'"device": "TS00000004"' in r.payload
            # threat 4: a CSR whose signature does not verify, a key the profile refuses
            bad = make_csr(subject="original-subject")[0].replace(b"original-subject", b"origami1-subject")
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, payload=bad, content_format=286)
            assert r.code == codes.BAD_REQUEST and problem(r)[-1] == "invalid CSR"
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, content_format=286,
                              payload=make_csr(ec.generate_private_key(ec.SECP384R1()))[0])
            assert r.code == codes.BAD_REQUEST and problem(r)[-1] == "key not allowed"
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, payload=b"\x30\x00", content_format=286)
            assert r.code == codes.BAD_REQUEST
            # threat 13: a body over the cap is refused with 4.13 and Size1, Block1 or not
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, payload=b"\x30" * 9000,
                              content_format=286)
            assert r.code == codes.REQUEST_ENTITY_TOO_LARGE and r.opt.size1 == 4096
            # /sren: the CA fills in this device's identity, whatever the CSR asks
            evil = [(x509.BasicConstraints(ca=True, path_length=None), True),
                    (x509.SubjectAlternativeName([x509.DNSName("evil.example"),
                                                  x509.UniformResourceIdentifier("urn:dev:os:12345-TS00000001")]),
                     False)]
            r = await request(ctx, f"{uri}/.well-known/est/sren", codes.POST, accept=281,
                              payload=make_csr(subject="device-TS00000001", extensions=evil)[0], content_format=286)
            assert r.code == codes.CHANGED and r.opt.content_format == 281
            certs = pkcs7.load_der_pkcs7_certificates(r.payload)     # a SET: no order
            assert len(certs) == 2 and data.cert("operational") in certs
            (leaf,) = [c for c in certs if c != data.cert("operational")]
            assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert san.get_values_for_type(x509.DNSName) == []
            assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:dev:os:12345-TS00000004"]
            # threat 21: the certificate of this session is superseded now: no second renewal, no
            # configuration (test_lifecycle.py has the rest)
            for path, code in (("/.well-known/est/sren", codes.POST), ("/config", codes.GET)):
                r = await request(ctx, uri + path, code, payload=make_csr()[0] if code == codes.POST else b"",
                                  **({"content_format": 286} if code == codes.POST else {}))
                assert r.code == codes.FORBIDDEN and problem(r)[-1] == "certificate superseded"
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


def test_policy_waiver_reenrollment_and_unknown_types(world):
    data, out = world

    async def body(uri, gw):
        # waived: enrolls on its certificate alone
        result = await enroll(out / "LG00000001", uri, None)
        assert result.verdict is None
        # re-enrollment allowed by default: the earlier operational certificate is superseded
        first = await enroll(out / "TS00000001", uri, FW)
        second = await enroll(out / "TS00000001", uri, FW)
        statuses = {c.serial: c.status for c in gw.registry.certificates_for_device("TS00000001")}
        assert statuses[first.certificate.serial_number] is CertStatus.SUPERSEDED
        assert statuses[second.certificate.serial_number] is CertStatus.CURRENT
        # reenroll = false
        await enroll(out / "ST00000001", uri, FW)
        with pytest.raises(EnrollFailed, match="re-enrollment not allowed"):
            await enroll(out / "ST00000001", uri, FW)
        # a device type the policy does not know cannot even get a good verdict (classic flow), nor
        # is its evidence looked at when it comes in the CSR (one-request flow)
        with pytest.raises(EnrollFailed) as unknown:
            await enroll(out / "UN00000001", uri, FW, flow="classic")
        assert unknown.value.step == "evidence" and "device-type-unknown" in unknown.value.reason
        with pytest.raises(EnrollFailed, match="device type not enrolled") as unknown:
            await enroll(out / "UN00000001", uri, FW)
        assert unknown.value.step == "enroll"
        with pytest.raises(EnrollFailed, match="device type not enrolled"):
            await enroll(out / "UN00000001", uri, None)
    run_with_gateway(data, body)


def test_contraindicated_verdict_revokes_when_policy_says_so(world):
    data, out = world

    async def body(uri, gw):
        with pytest.raises(EnrollFailed, match="contraindicated"):
            await enroll(out / "MT00000001", uri, Firmware("sha-256", b"\x01" * 32, "sensor-fw", "3.1.0"))
        assert gw.registry.get_device("MT00000001").state is DeviceState.REVOKED
        # a temperature-sensor with the same finding is refused but not revoked (policy default)
        with pytest.raises(EnrollFailed, match="contraindicated"):
            await enroll(out / "TS00000002", uri, FW, secure_boot=False)
        assert gw.registry.get_device("TS00000002").state is DeviceState.MANUFACTURED
    run_with_gateway(data, body)


# -- threats 1-3 ---------------------------------------------------------------------------------------

def test_nonce_replay_staleness_other_device_bad_signature(world):
    data, out = world
    a, b = out / "TS00000001", out / "TS00000002"

    async def body(uri, gw):
        ca_, _ = await device_context(a, "127.0.0.1")
        cb, _ = await device_context(b, "127.0.0.1")
        try:
            async def verdict(ctx, token):
                r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token, content_format=60)
                assert r.code == codes.CHANGED
                body = cbor2.loads(r.payload)
                return body["verdict"], [x["code"] for x in body["reasons"]]

            nonce = cbor2.loads((await request(ca_, f"{uri}/attest/nonce")).payload)["nonce"]
            assert len(nonce) >= 16
            token = token_for(a, nonce)
            assert await verdict(ca_, token) == ("affirming", [])
            tier, codes_ = await verdict(ca_, token)                       # replay, new message ID
            assert tier == "contraindicated" and "nonce-replayed" in codes_
            # a nonce issued to device A, used by device B
            nonce_a = cbor2.loads((await request(ca_, f"{uri}/attest/nonce")).payload)["nonce"]
            tier, codes_ = await verdict(cb, token_for(b, nonce_a))
            assert tier == "contraindicated" and any(c.startswith("nonce-") for c in codes_)
            # unknown firmware, bad signature
            n = cbor2.loads((await request(cb, f"{uri}/attest/nonce")).payload)["nonce"]
            tier, codes_ = await verdict(cb, token_for(b, n, fw_digest=b"\x02" * 32))
            assert tier == "contraindicated" and "firmware-unknown" in codes_
            n = cbor2.loads((await request(cb, f"{uri}/attest/nonce")).payload)["nonce"]
            tier, codes_ = await verdict(cb, token_for(b, n, signer=ec.generate_private_key(ec.SECP256R1())))
            assert tier == "contraindicated"
            # none of these allows an enrollment; all were logged
            r = await request(cb, f"{uri}/.well-known/est/sen", codes.POST, payload=make_csr()[0], content_format=286)
            assert r.code == codes.FORBIDDEN
            assert len(AttestationStore(gw.registry).log_entries()) == 5
        finally:
            await ca_.shutdown()
            await cb.shutdown()
    run_with_gateway(data, body)


def test_duplicate_coap_message_gets_the_cached_response(world):
    """Threat 1, same message ID: the CoAP duplicate is answered from the exchange cache, the
    evidence is evaluated (and logged) once."""
    from .dtls_helpers import RawSession, client_context_from_bundle
    data, out = world
    dev = out / "TS00000003"

    async def body(uri, gw):
        port = int(uri.rsplit(":", 1)[1])

        def con(mid, token, **kw):
            m = aiocoap.Message(**kw)
            m.mtype, m.mid, m.token = aiocoap.CON, mid, token
            return m.encode()
        async with RawSession(client_context_from_bundle(dev), port) as s:
            await s.handshake()
            await s.exchange(con(0x1001, b"\x01", code=codes.GET, uri_path=["attest", "nonce"]))
            nonce = cbor2.loads(aiocoap.Message.decode(s.received[0]).payload)["nonce"]
            wire = con(0x1002, b"\x02", code=codes.POST, uri_path=["attest", "evidence"], content_format=60,
                       payload=token_for(dev, nonce))
            await s.exchange(wire)
            await s.exchange(wire)          # the same message ID again
        received = s.received
        first, second = (aiocoap.Message.decode(m) for m in received[1:3])
        assert first.code == second.code == codes.CHANGED and first.payload == second.payload
        assert cbor2.loads(first.payload)["verdict"] == "affirming"
        assert len(AttestationStore(gw.registry).log_entries(device_serial="TS00000003")) == 1
    run_with_gateway(data, body)


def test_est_crts_and_well_known_core(world):
    data, out = world

    async def body(uri, gw):
        ctx, _ = await device_context(out / "TS00000001", "127.0.0.1")
        try:
            r = await request(ctx, f"{uri}/.well-known/est/crts")
            assert r.code == codes.CONTENT and r.opt.content_format == 281
            got = pkcs7.load_der_pkcs7_certificates(r.payload)
            assert len(got) == 2 and set(got) == {data.cert("root"), data.cert("operational")}
            r = await request(ctx, f"{uri}/.well-known/est/crts", accept=287)
            assert x509.load_der_x509_certificate(r.payload) == data.cert("root")
            wkc = (await request(ctx, f"{uri}/.well-known/core")).payload.decode()
            for rt in ("ace.est.crts", "ace.est.sen", "ace.est.sren", "devid.attest.nonce",
                       "devid.attest.evidence", "devid.config"):
                assert f'rt="{rt}"' in wkc, wkc
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


def test_libcoap_client_gets_crts_and_enrolls_with_a_der_csr(world, tmp_path):
    """A device built on libcoap, not on our code: coap-client-openssl fetches /crts and enrolls
    through /sen with a DER CSR (content format 286), for a device type whose policy waives
    attestation."""
    import subprocess
    from .conftest import tool
    data, out = world
    dev = out / "LG00000001"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = tmp_path / "op.csr"
    csr.write_bytes(make_csr(key)[0])

    async def body(uri, gw):
        auth = ["-c", str(dev / "chain.pem"), "-j", str(dev / "key.pem"), "-R", str(dev / "ca.pem")]
        crts = tmp_path / "crts.p7"
        proc = await asyncio.create_subprocess_exec(
            tool("coap-client-openssl"), "-m", "get", *auth, "-o", str(crts), "-B", "10",
            f"{uri}/.well-known/est/crts", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        await proc.communicate()
        got = pkcs7.load_der_pkcs7_certificates(crts.read_bytes())
        assert set(got) == {data.cert("root"), data.cert("operational")}
        cert_file = tmp_path / "op.der"
        proc = await asyncio.create_subprocess_exec(
            tool("coap-client-openssl"), "-m", "post", *auth, "-t", "286", "-A", "287", "-f", str(csr),
            "-o", str(cert_file), "-B", "10", f"{uri}/.well-known/est/sen",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
        cert = x509.load_der_x509_certificate(cert_file.read_bytes())
        assert cert.public_key() == key.public_key(), err
        assert cert.issuer == data.cert("operational").subject
        assert gw.registry.get_device("LG00000001").state is DeviceState.ENROLLED
    run_with_gateway(data, body)


def test_serve_with_two_workers_shares_the_registry(world, tmp_path):
    """`devid serve --workers 2`: both processes on one port, state only in the registry. Devices
    enroll through `devid simulate`; attestation (nonce, verdict) and issuance may land on
    different workers when a device reconnects, and the registry carries it over."""
    import os
    import signal
    import subprocess
    import sys
    data, out = world
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                              "--workers", "2"], stdout=subprocess.PIPE, stderr=open(log, "wb"), env=env)
    try:
        first = serve.stdout.readline().decode()
        assert "listening" in first and "2 workers" in first, first + log.read_text()
        sub = tmp_path / "ts"
        sub.mkdir()
        for b in sorted(out.glob("TS*")):
            b.rename(sub / b.name)
            (sub / b.name / "firmware.json").write_text(
                f'{{"name": "{FW.name}", "version": "{FW.version}", "digest": "sha-256:{FW.digest.hex()}"}}')
        proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "simulate", "--gateway",
                               f"coaps://127.0.0.1:{port}", "--devices", str(sub), "--concurrency", "4", "--json"],
                              capture_output=True, text=True, timeout=120, env=env)
        summary = json.loads(proc.stdout)
        assert proc.returncode == 0 and summary["enrolled"] == 4 and summary["errors"] == 0, proc.stdout + proc.stderr
        # a nonce issued on one connection, evidence and enrollment on fresh connections (new
        # source ports, so possibly other workers): the registry carries the state across
        async def split_flow():
            dev = out / "MT00000001"
            uri = f"coaps://127.0.0.1:{port}"

            async def on_new_connection(path, code=codes.GET, **kw):
                ctx, _ = await device_context(dev, "127.0.0.1")     # a new source port each time
                try:
                    return await request(ctx, uri + path, code, **kw)
                finally:
                    await ctx.shutdown()
            nonce = cbor2.loads((await on_new_connection("/attest/nonce")).payload)["nonce"]
            r = await on_new_connection("/attest/evidence", codes.POST, payload=token_for(dev, nonce),
                                        content_format=60)
            assert cbor2.loads(r.payload)["verdict"] == "affirming"
            r = await on_new_connection("/.well-known/est/sen", codes.POST, payload=make_csr()[0],
                                        content_format=286)
            assert r.code == codes.CHANGED
        asyncio.run(split_flow())
        serve.send_signal(signal.SIGTERM)
        rest = serve.stdout.read().decode()
        assert serve.wait(30) == 0 and "stopped" in rest
        text = log.read_text()
        served = {(obj.get("worker"), obj["logger"]) for obj in map(json.loads, text.splitlines())}
        assert {(0, "devid.dtls"), (1, "devid.dtls")} <= served, "only one worker served"
        assert "Traceback" not in text
    finally:
        if serve.poll() is None:
            serve.kill()


def test_concurrent_renewals_leave_exactly_one_current_certificate(world):
    """Threats 16 and 21: renewals of one device racing on separate DTLS sessions with the same
    certificate are serialised by the registry; the first supersedes that certificate, so the
    others are refused, and exactly one operational certificate is current."""
    data, out = world
    dev = out / "TS00000004"

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        contexts = [(await device_context(dev, "127.0.0.1", cert_name="op-chain.pem", key_name="op-key.pem"))[0]
                    for _ in range(4)]
        try:
            # the four sessions first (a handshake after the race would be refused: superseded), then the race
            assert all(r.code == codes.CONTENT for r in await asyncio.gather(*(request(c, f"{uri}/whoami")
                                                                               for c in contexts)))
            responses = await asyncio.gather(*(
                request(c, f"{uri}/.well-known/est/sren", codes.POST, payload=make_csr()[0], content_format=286)
                for c in contexts))
        finally:
            for c in contexts:
                await c.shutdown()
        assert sorted(r.code for r in responses) == [codes.CHANGED] + [codes.FORBIDDEN] * 3
        assert all(problem(r)[-1] == "certificate superseded" for r in responses if r.code == codes.FORBIDDEN)
        ops = [c for c in gw.registry.certificates_for_device("TS00000004") if c.profile == "operational"]
        assert len(ops) == 2
        assert sum(c.status is CertStatus.CURRENT for c in ops) == 1
        assert sum(c.status is CertStatus.SUPERSEDED for c in ops) == 1
    run_with_gateway(data, body)


def test_serve_refuses_a_port_that_is_in_use(world):
    import os
    import subprocess
    import sys
    data, _ = world
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        for workers in ("1", "2"):
            proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                   "--workers", workers], capture_output=True, text=True, timeout=60, env=env)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert "in use" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


def test_serve_with_workers_exits_cleanly_when_workers_fail(world):
    """A bad policy makes every worker fail at start-up: one error line, exit 1, no hang."""
    import os
    import subprocess
    import sys
    data, _ = world
    (data.path / POLICY_FILE).write_text("version = 1\n[device_types.x]\nattestation = 'sometimes'\n")
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    proc = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{free_port()}",
                           "--workers", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("devid: error:")]
    assert len(errors) == 1 and "attestation" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
