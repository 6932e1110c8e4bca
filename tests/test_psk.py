"""PSK devices (issue 18) against `devid serve` as a real process, with real peers: aiocoap over
DTLSSocket (tinydtls, what constrained devices run) and libcoap's `coap-client-openssl -u -k`.

One gateway (module fixture) on one port serves X.509 and PSK devices; its log runs at DEBUG and
is read whole at the end: no PSK of any device appears in it. libcoap exits 0 when its handshake
fails, so its output is what is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiocoap
import cbor2
import pytest
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.ca.revocation import revoke_device
from devid.gateway.app.datadir import DataDir
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.client import device_context
from devid.gateway.device.identity import DeviceIdentity, device_csr, load_bundle, new_p256_key
from devid.gateway.device.psk import Psk, gateway_check, psk_context, read_operational_psk, read_psk
from devid.gateway.device.protocol import CT_CBOR, CT_PKCS10
from devid.gateway.device.psk import CT_COSE_SIGN1

from .conftest import NOW, free_port, ok, one_line_error, run_devid, tool
from .gateway_helpers import FW, POLICY

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]
WRONG_KEY = b"AAAAAAAAAAAAAAAA"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    base = tmp_path_factory.mktemp("psk")
    data = DataDir(base / "data")
    data.init(NOW)
    (data.path / POLICY_FILE).write_text(POLICY)
    out = base / "factory"
    proc = run_devid("provision", "--count", "5", "--device-type", "temperature-sensor", "--psk", "--out", out,
                     "--workers", "1", "--json", data_dir=data.path)
    provisioned = json.loads(ok(proc))
    ok(run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--serial-prefix", "XS",
                 "--out", out, "--workers", "1", data_dir=data.path))
    # a device type whose policy waives attestation (gateway_helpers.POLICY), in a folder of its own
    ok(run_devid("provision", "--count", "1", "--device-type", "legacy-sensor", "--serial-prefix", "LS", "--psk",
                 "--out", base / "legacy", "--workers", "1", data_dir=data.path))
    port = free_port()
    log = base / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data.path)
    served = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                               "--workers", "1", "--log-level", "DEBUG"], stdout=subprocess.PIPE,
                              stderr=open(log, "wb"), env=env, cwd=ROOT)
    line = served.stdout.readline().decode()
    assert "listening on" in line, line + log.read_text()
    world = {"data": data, "out": out, "legacy": base / "legacy", "port": port, "base": f"coaps://127.0.0.1:{port}", "log": log,
             "proc": served, "provisioned": provisioned, "keys": set()}
    yield world
    served.terminate()
    served.wait(30)


def bundle(gw, n: int) -> Path:
    return gw["out"] / f"SN0000000{n}"


def events(gw, since: int = 0) -> list[dict]:
    text = gw["log"].read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()[since:]]


def lines(gw) -> int:
    text = gw["log"].read_text()
    return text[:text.rfind("\n") + 1].count("\n")


def wait_event(gw, since: int, predicate, timeout: float = 20.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for ev in events(gw, since):
            if predicate(ev):
                return ev
        time.sleep(0.05)
    raise AssertionError(f"no such log event; log tail: {gw['log'].read_text()[-3000:]}")


def handshake(result: str, **fields):
    def match(ev: dict) -> bool:
        return (ev.get("event") == "handshake" and ev.get("result") == result
                and all(str(v) in str(ev.get(k)) for k, v in fields.items()))
    return match


def libcoap(gw, psk: Psk, path: str = "/whoami") -> str:
    """coap-client-openssl with a PSK; its whole output (it exits 0 even when the handshake fails)."""
    gw["keys"].add(psk.key)
    proc = subprocess.run([tool("coap-client-openssl"), "-v", "6", "-m", "get", "-u", psk.identity.decode(),
                           "-k", psk.key.decode(), "-B", "5", f"{gw['base']}{path}"], capture_output=True, timeout=30)
    return (proc.stdout + proc.stderr).decode()


async def tinydtls_get(gw, psk: Psk, path: str = "/whoami", timeout: float = 10.0):
    """GET over aiocoap + DTLSSocket with a PSK: the response, or the exception."""
    gw["keys"].add(psk.key)
    ctx = await psk_context(psk, gw["base"])
    try:
        return await asyncio.wait_for(ctx.request(aiocoap.Message(code=aiocoap.GET, uri=gw["base"] + path)).response,
                                      timeout)
    except Exception as exc:
        return exc
    finally:
        await ctx.shutdown()


def test_provision_psk_writes_private_files_and_prints_no_key(gw):
    for n in range(1, 5):
        psk = read_psk(bundle(gw, n))
        gw["keys"].add(psk.key)
        assert psk.identity == f"SN0000000{n}".encode()
        # 16 characters of the base64url alphabet: 96 bits, printable for libcoap, 16 bytes for tinydtls
        assert len(psk.key) == 16 and set(psk.key.decode()) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for name in ("psk-identity.txt", "psk-key.txt"):
            assert stat.S_IMODE((bundle(gw, n) / name).stat().st_mode) == 0o600
    assert len({read_psk(bundle(gw, n)).key for n in range(1, 5)}) == 4
    assert gw["provisioned"]["psk"] is True
    assert not any(k.decode() in json.dumps(gw["provisioned"]) for k in gw["keys"])
    # without --psk: no PSK files; the secret is kept sealed, never in clear
    assert not (gw["out"] / "XS00000001" / "psk-key.txt").exists()
    secret = gw["data"].path / "ca" / "psk.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert gw["data"].psk_secret() not in secret.read_bytes()


def test_provision_psk_refuses_a_prefix_too_long_for_tinydtls(gw, tmp_path):
    proc = run_devid("provision", "--count", "1", "--device-type", "temperature-sensor", "--psk", "--serial-prefix",
                     "P" * 22, "--out", tmp_path / "f", data_dir=gw["data"].path)
    one_line_error(proc, "too long", "32 bytes")


def test_libcoap_and_dtlssocket_get_whoami_with_a_factory_psk(gw):
    since = lines(gw)
    said = libcoap(gw, read_psk(bundle(gw, 1)))
    assert '"kind": "factory-psk"' in said and '"serial": "SN00000001"' in said, said[-2000:]
    ev = wait_event(gw, since, handshake("ok", serial="SN00000001"))
    assert ev["kind"] == "factory-psk" and ev["cipher"] == "PSK-AES128-CCM8"

    response = asyncio.run(tinydtls_get(gw, read_psk(bundle(gw, 2))))
    assert not isinstance(response, Exception), response
    assert response.code == aiocoap.CONTENT
    body = json.loads(response.payload)
    assert body["serial"] == "SN00000002" and body["kind"] == "factory-psk"
    assert body["device_type"] == "temperature-sensor"


def test_wrong_key_and_unknown_identity_are_refused_with_their_alerts(gw):
    since = lines(gw)
    said = libcoap(gw, Psk(b"SN00000001", WRONG_KEY))
    assert "alert decrypt error" in said and "factory-psk" not in said, said[-2000:]
    wait_event(gw, since, handshake("refused", reason="wrong key for PSK identity 'SN00000001'"))

    since = lines(gw)
    said = libcoap(gw, Psk(b"SN99999999", WRONG_KEY))
    # an unknown identity looks like a wrong key (RFC 4279 section 2): no alert tells who exists
    assert "alert decrypt error" in said and "unknown psk identity" not in said, said[-2000:]
    wait_event(gw, since, handshake("refused", reason="PSK identity 'SN99999999' refused"))

    # tinydtls hears the alert too: it fails at once instead of waiting out its timeout
    response = asyncio.run(tinydtls_get(gw, Psk(b"SN00000002", WRONG_KEY), timeout=20))
    assert isinstance(response, aiocoap.error.Error), response
    # a device provisioned without --psk: its bundle carries no PSK, so none is known to anyone
    said = libcoap(gw, Psk(b"XS00000001", WRONG_KEY))
    assert "alert decrypt error" in said


def test_x509_and_psk_devices_served_at_once_on_one_port(gw):
    async def both():
        ctx, _ = await device_context(gw["out"] / "XS00000001", "127.0.0.1")
        try:
            x509_get = ctx.request(aiocoap.Message(code=aiocoap.GET, uri=gw["base"] + "/whoami")).response
            return await asyncio.gather(asyncio.wait_for(x509_get, 20), tinydtls_get(gw, read_psk(bundle(gw, 3))))
        finally:
            await ctx.shutdown()
    x509_response, psk_response = asyncio.run(both())
    assert json.loads(x509_response.payload)["kind"] == "factory"
    assert json.loads(x509_response.payload)["serial"] == "XS00000001"
    assert json.loads(psk_response.payload)["kind"] == "factory-psk"


def test_psk_device_attests_enrolls_renews_and_uses_its_operational_psk(gw):
    device = bundle(gw, 3)
    proc = run_devid("simulate", "--psk", "--gateway", gw["base"], "--devices", gw["out"], "--limit", "3",
                     "--timeout", "20", "--json", *FIRMWARE)
    summary = json.loads(ok(proc))
    assert summary["enrolled"] == 3 and summary["flow"] == "psk", summary
    assert (device / "op-chain.pem").exists() and (device / "config.cbor").exists()
    op = read_psk(device, operational=True)
    gw["keys"].add(op.key)
    assert op.identity == b"op:SN00000003" and len(op.key) == 16
    for name in ("operational-psk-identity.txt", "operational-psk-key.txt"):
        assert stat.S_IMODE((device / name).stat().st_mode) == 0o600
    kinds = {ev.get("event"): ev for ev in events(gw) if ev.get("serial") == "SN00000003"}
    assert kinds["evidence"]["result"] == "affirming" and kinds["evidence"]["kind"] == "factory-psk"
    assert kinds["enroll"]["result"] == "issued"
    assert kinds["psk"]["result"] == "served" and kinds["psk"]["psk_identity"] == "op:SN00000003"
    # the configuration of the enrollment's answer was the one the signed /psk answer vouched for:
    # the device kept it and asked for none in a session of its operational PSK (device/psk.py _settle)
    assert "config" not in kinds

    said = libcoap(gw, op)
    assert '"kind": "operational-psk"' in said and '"serial": "SN00000003"' in said, said[-2000:]

    # the factory PSK of an enrolled device still connects (as a factory certificate does)
    assert '"kind": "factory-psk"' in libcoap(gw, read_psk(device))

    # renewal over the operational PSK rotates it: the old key stops working, the new one works
    # (with fresh evidence in the CSR of /sren: a PSK session proves the attestation key each time)
    ok(run_devid("simulate", "--psk", "--renew", "--gateway", gw["base"], "--devices", gw["out"], "--limit", "3",
                 "--timeout", "20", *FIRMWARE))
    new = read_psk(device, operational=True)
    gw["keys"].add(new.key)
    assert new.identity == op.identity and new.key != op.key
    assert "alert decrypt error" in libcoap(gw, op)
    response = asyncio.run(tinydtls_get(gw, new))
    assert json.loads(response.payload)["kind"] == "operational-psk"

    # /psk: only a PSK device, only once enrolled (authorization.RULES["psk"])
    said = libcoap(gw, read_psk(bundle(gw, 4)), "/psk")
    assert "c:4.03" in said and "wrong identity for this resource" in said, said[-2000:]


async def in_session(gw, psk: Psk, *requests: dict, timeout: float = 10.0) -> list[aiocoap.Message]:
    """The answers to `requests` (Message arguments, "path" relative to the gateway), one after
    the other, in ONE tinydtls session with `psk`."""
    gw["keys"].add(psk.key)
    ctx = await psk_context(psk, gw["base"])
    try:
        out = []
        for r in requests:
            r = dict(r)
            message = aiocoap.Message(uri=f"{gw['base']}/{r.pop('path')}", **r)
            out.append(await asyncio.wait_for(ctx.request(message).response, timeout))
        return out
    finally:
        await ctx.shutdown()


def _get(path: str, **kw) -> dict:
    return dict(code=aiocoap.GET, path=path, **kw)


def _post(path: str, payload: bytes, fmt: int) -> dict:
    return dict(code=aiocoap.POST, path=path, payload=payload, content_format=fmt)


def _csr(serial: str, evidence: bytes | None = None) -> bytes:
    return device_csr(new_p256_key(), serial, evidence)


def test_a_psk_alone_gets_no_certificate_and_no_operational_psk(gw):
    """Review finding 1: who holds only a device's PSK (a string in flash) gets nothing that needs
    the attestation key. SN00000003 is enrolled and renewed (the test above); its factory PSK and
    its current operational PSK are the attacker's, its factory key is not."""
    device, serial = bundle(gw, 3), "SN00000003"
    factory_psk, op_psk = read_psk(device), read_psk(device, operational=True)
    reg = gw["data"].open_registry()
    try:
        before = len(reg.certificates_for_device(serial))
    finally:
        reg.close()
    since = lines(gw)

    # the real device earns an acceptable verdict (classic /attest/evidence, its factory key) ...
    factory, _, factory_key, _ = load_bundle(device)
    identity = DeviceIdentity.of(factory, factory_key)

    async def real_device_attests():
        [nonce] = await in_session(gw, factory_psk, _get("attest/nonce", accept=CT_CBOR))
        token = identity.evidence(cbor2.loads(nonce.payload)["nonce"], FW, iat=int(time.time()))
        [verdict] = await in_session(gw, factory_psk, _post("attest/evidence", token, CT_CBOR))
        return verdict
    verdict = asyncio.run(real_device_attests())
    assert verdict.code == aiocoap.CHANGED and cbor2.loads(verdict.payload)["acceptable"] is True

    # ... and the attacker, with the factory PSK, cannot spend it on /sen with its own key, nor
    # read the operational PSK; with the operational PSK, neither /sren nor /psk
    sen, psk_factory = asyncio.run(in_session(gw, factory_psk, _post(".well-known/est/sen", _csr(serial), CT_PKCS10),
                                              _get("psk", accept=CT_COSE_SIGN1)))
    for answer in (sen, psk_factory):
        assert answer.code == aiocoap.FORBIDDEN, (answer.code, answer.payload)
    sren, psk_op = asyncio.run(in_session(gw, op_psk, _post(".well-known/est/sren", _csr(serial), CT_PKCS10),
                                          _get("psk", accept=CT_COSE_SIGN1)))
    for answer in (sren, psk_op):
        assert answer.code == aiocoap.FORBIDDEN, (answer.code, answer.payload)
    assert b"evidence" in sen.payload and b"evidence" in sren.payload
    assert b"session" in psk_factory.payload and b"session" in psk_op.payload
    refused = [ev for ev in events(gw, since) if ev.get("serial") == serial and ev.get("result") == "refused"]
    assert {ev["event"] for ev in refused} >= {"enroll", "renew", "psk"}, refused
    assert {ev["reason"] for ev in refused if ev["event"] == "psk"} == {"no certificate issued in this session"}

    # evidence the real device made for its own new key, put in the attacker's CSR for another
    # key, is refused too: the cnf claim binds it to the key it was made for
    async def replayed():
        [nonce] = await in_session(gw, op_psk, _get("attest/nonce", accept=CT_CBOR))
        token = identity.evidence(cbor2.loads(nonce.payload)["nonce"], FW, iat=int(time.time()),
                                  bound_key=new_p256_key().public_key())
        return (await in_session(gw, op_psk, _post(".well-known/est/sren", _csr(serial, token), CT_PKCS10)))[0]
    answer = asyncio.run(replayed())
    assert answer.code == aiocoap.FORBIDDEN, (answer.code, answer.payload)

    reg = gw["data"].open_registry()
    try:
        assert len(reg.certificates_for_device(serial)) == before      # nothing was issued
    finally:
        reg.close()
    # the device's own operational PSK still works (nothing rotated)
    response = asyncio.run(tinydtls_get(gw, op_psk))
    assert json.loads(response.payload)["kind"] == "operational-psk"


def test_with_attestation_waived_the_psk_is_the_only_proof(gw):
    """docs/enrollment.md#why-a-psk-proves-less-than-a-key: a device type whose policy waives
    attestation enrolls and renews on its PSK alone, no evidence in the CSR."""
    device = gw["legacy"] / "LS00000001"
    summary = json.loads(ok(run_devid("simulate", "--psk", "--gateway", gw["base"], "--devices", gw["legacy"],
                                      "--timeout", "20", "--json")))
    assert summary["enrolled"] == 1, summary
    op = read_psk(device, operational=True)
    ok(run_devid("simulate", "--psk", "--renew", "--gateway", gw["base"], "--devices", gw["legacy"], "--timeout", "20"))
    new = read_psk(device, operational=True)
    gw["keys"] |= {op.key, new.key}
    assert new.key != op.key
    assert json.loads(asyncio.run(tinydtls_get(gw, new)).payload)["kind"] == "operational-psk"
    issued = [ev for ev in events(gw) if ev.get("serial") == "LS00000001" and ev.get("result") == "issued"]
    assert [ev["event"] for ev in issued] == ["enroll", "renew"] and issued[0]["attestation"] == "waived"
    assert not any(ev.get("event") == "evidence" and ev.get("serial") == "LS00000001" for ev in events(gw))


def _issued(gw, serial: str) -> int:
    reg = gw["data"].open_registry()
    try:
        return len(reg.certificates_for_device(serial))
    finally:
        reg.close()


def _leaf(pkcs7_certs: bytes, key):
    """The certificate for `key` in a /sen answer (281: a certs-only PKCS#7, a SET: any order)."""
    [leaf] = [c for c in pkcs7.load_der_pkcs7_certificates(pkcs7_certs) if c.public_key() == key.public_key()]
    return leaf


async def _enroll_by_hand(gw, psk: Psk, identity: DeviceIdentity, path: str, key, *, bound: bool = True,
                          signer: DeviceIdentity | None = None, nonce_psk: Psk | None = None,
                          then_psk: bool = True) -> list[aiocoap.Message]:
    """In one session with `psk`: a server nonce (from a session with `nonce_psk` if given), then
    `path` (sen or sren) with a CSR for `key` carrying evidence for that nonce signed by `signer`
    (the device's factory identity by default), bound to `key` unless not `bound`; then GET /psk."""
    if nonce_psk is not None:
        [answer] = await in_session(gw, nonce_psk, _get("attest/nonce", accept=CT_CBOR))
        nonce = cbor2.loads(answer.payload)["nonce"]
    gw["keys"].add(psk.key)
    ctx = await psk_context(psk, gw["base"])
    try:
        async def ask(r: dict) -> aiocoap.Message:
            r = dict(r)
            message = aiocoap.Message(uri=f"{gw['base']}/{r.pop('path')}", **r)
            return await asyncio.wait_for(ctx.request(message).response, 10)
        if nonce_psk is None:
            nonce = cbor2.loads((await ask(_get("attest/nonce", accept=CT_CBOR))).payload)["nonce"]
        token = (signer or identity).evidence(nonce, FW, iat=int(time.time()),
                                              bound_key=key.public_key() if bound else None)
        out = [await ask(_post(f".well-known/est/{path}", device_csr(key, identity.serial, token), CT_PKCS10))]
        if then_psk:
            out.append(await ask(_get("psk", accept=CT_COSE_SIGN1)))
        return out
    finally:
        await ctx.shutdown()


def test_the_operational_psk_comes_sealed_to_the_certificate_key_in_an_answer_the_gateway_signed(gw, tmp_path):
    """Review 18b M1 and 18c M1: the PSK suite has no (EC)DHE, so whoever holds the factory PSK
    reads what a session carries, and the gateway's side of it proves only that it knows the PSK.
    So GET /psk answers with a COSE_Sign1 by the gateway's certified key, carrying the key sealed
    to the attested CSR key. Checked and opened here with cwt (an independent COSE implementation)
    as docs/enrollment.md says, and by the device's own reader."""
    import hashlib

    from cryptography.hazmat.primitives import serialization
    from cwt import COSE, COSEKey, DecodeError

    def pem(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    device = bundle(gw, 1)
    factory, _, factory_key, root = load_bundle(device)
    identity = DeviceIdentity.of(factory, factory_key)
    key = new_p256_key()
    sen, psk = asyncio.run(_enroll_by_hand(gw, read_psk(device), identity, "sen", key))
    assert sen.code == aiocoap.CHANGED, (sen.code, sen.payload)
    assert psk.code == aiocoap.CONTENT and psk.opt.max_age == 0, (psk.code, psk.payload)
    assert psk.opt.content_format == 18                       # application/cose; cose-type="cose-sign1"
    issued = _leaf(sen.payload, key)
    gateway_cert, op_ca = gw["data"].cert("gateway"), gw["data"].cert("operational")

    signed = cbor2.loads(psk.payload)
    assert signed.tag == 18 and signed.value[1][33] == [c.public_bytes(serialization.Encoding.DER)
                                                        for c in (gateway_cert, op_ca)]
    signer = COSEKey.from_pem(gateway_cert.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), alg="ES256")
    body = cbor2.loads(COSE.new().decode(psk.payload, signer))
    assert set(body) == {"identity", "certificate", "sealed_key", "config"}
    assert body["identity"] == "op:SN00000001"
    assert body["certificate"] == hashlib.sha256(issued.public_bytes(serialization.Encoding.DER)).digest()
    assert body["sealed_key"].tag == 96
    opened = COSE.new().decode(cbor2.dumps(body["sealed_key"]), COSEKey.from_pem(pem(key), alg="ECDH-ES+HKDF-256"),
                               context={"alg": "AES-CCM-16-64-128"})
    gw["keys"].add(opened)
    assert len(opened) == 16 and opened not in psk.payload
    # what a recorded session shows a PSK holder opens with no other key
    with pytest.raises(DecodeError):
        COSE.new().decode(cbor2.dumps(body["sealed_key"]), COSEKey.from_pem(pem(new_p256_key()), alg="ECDH-ES+HKDF-256"),
                          context={"alg": "AES-CCM-16-64-128"})
    # the device's reader: the same key, and the digest of the configuration the gateway serves
    op_psk, config_digest = read_operational_psk(psk.payload, key, serial="SN00000001", certificate=issued,
                                                 check_chain=gateway_check(root, "127.0.0.1", issued.issuer))
    assert op_psk == Psk(b"op:SN00000001", opened)
    # the key opened is the device's operational PSK: a handshake with it works, and GET /config
    # there serves the configuration whose digest the signed answer carries
    said = libcoap(gw, op_psk)
    assert '"kind": "operational-psk"' in said and '"serial": "SN00000001"' in said, said[-2000:]
    [config] = asyncio.run(in_session(gw, op_psk, _get("config", accept=CT_CBOR)))
    assert config.code == aiocoap.CONTENT and hashlib.sha256(config.payload).digest() == config_digest

    # a configuration the signed answer does not vouch for (a PSK holder's on the path) is not
    # kept: the device fetches it again in a session of its operational PSK (review 18d L3)
    from devid.gateway.device.flow import Config
    from devid.gateway.device.psk import _settle
    forged = {"mqtt": {"broker": "mqtts://attacker.example:8883"}}
    since = lines(gw)
    kept = asyncio.run(_settle(tmp_path, gw["base"], identity, op_psk, Config(forged, cbor2.dumps(forged)),
                               config_digest, 20))
    assert hashlib.sha256((tmp_path / "config.cbor").read_bytes()).digest() == config_digest
    assert kept.data != forged and b"attacker" not in (tmp_path / "config.json").read_bytes()
    wait_event(gw, since, lambda ev: ev.get("event") == "config" and ev.get("result") == "served"
               and ev.get("serial") == "SN00000001" and ev.get("kind") == "operational-psk")


def test_psk_sessions_take_only_evidence_of_the_attestation_key_for_this_device_and_key(gw):
    """Review 18b L6: in a PSK session /sen and /sren take evidence only when it is signed with the
    device's factory key, for a nonce issued to this device, bound (cnf) to the CSR's key."""
    device, serial = bundle(gw, 3), "SN00000003"
    factory, _, factory_key, _ = load_bundle(device)
    identity = DeviceIdentity.of(factory, factory_key)
    from cryptography import x509
    from devid.ca.keys import load_plain_key
    op_cert = x509.load_pem_x509_certificates((device / "op-chain.pem").read_bytes())[0]
    op_identity = DeviceIdentity.of(op_cert, load_plain_key(device / "op-key.pem"))
    factory_psk, op_psk = read_psk(device), read_psk(device, operational=True)
    before = _issued(gw, serial)
    since = lines(gw)
    cases = {
        "no cnf": (factory_psk, "sen", dict(bound=False)),
        "signed with the operational key": (op_psk, "sren", dict(signer=op_identity)),
        "a nonce of another device": (op_psk, "sren", dict(nonce_psk=read_psk(bundle(gw, 1)))),
    }
    for case, (psk, path, kw) in cases.items():
        [answer] = asyncio.run(_enroll_by_hand(gw, psk, identity, path, new_p256_key(), then_psk=False, **kw))
        assert answer.code in (aiocoap.BAD_REQUEST, aiocoap.FORBIDDEN), (case, answer.code, answer.payload)
    assert _issued(gw, serial) == before                # nothing was issued
    # each appraised and refused, for its own reason, in the attestation log's verdicts
    verdicts = [ev for ev in events(gw, since) if ev.get("serial") == serial and ev.get("event") == "evidence"]
    assert [ev["reasons"] for ev in verdicts] == [["key-not-bound"], ["signature-invalid"], ["nonce-wrong-device"]]
    assert not any(ev["acceptable"] for ev in verdicts), verdicts
    # the device's operational PSK still opens sessions (nothing rotated)
    assert json.loads(asyncio.run(tinydtls_get(gw, op_psk)).payload)["kind"] == "operational-psk"


def test_a_session_whose_certificate_another_session_replaced_gets_no_psk(gw):
    """Review 18b L6: session A renews; before A asks for its PSK, session B (the factory PSK)
    enrolls the device again; A's GET /psk is then refused: its certificate is not current."""
    device, serial = bundle(gw, 5), "SN00000005"
    factory, _, factory_key, _ = load_bundle(device)
    identity = DeviceIdentity.of(factory, factory_key)
    key = new_p256_key()
    sen, psk = asyncio.run(_enroll_by_hand(gw, read_psk(device), identity, "sen", key))
    assert sen.code == aiocoap.CHANGED and psk.code == aiocoap.CONTENT, (sen.payload, psk.payload)
    op_psk, _ = read_operational_psk(psk.payload, key, serial=serial,
                                     certificate=_leaf(sen.payload, key),
                                     check_chain=gateway_check(load_bundle(device)[3], "127.0.0.1",
                                                                gw["data"].cert("operational").subject))
    gw["keys"].add(op_psk.key)

    async def race():
        ctx = await psk_context(op_psk, gw["base"])
        try:
            async def ask(r: dict) -> aiocoap.Message:
                r = dict(r)
                return await asyncio.wait_for(ctx.request(
                    aiocoap.Message(uri=f"{gw['base']}/{r.pop('path')}", **r)).response, 10)
            nonce = cbor2.loads((await ask(_get("attest/nonce", accept=CT_CBOR))).payload)["nonce"]
            key = new_p256_key()
            token = identity.evidence(nonce, FW, iat=int(time.time()), bound_key=key.public_key())
            renewed = await ask(_post(".well-known/est/sren", device_csr(key, serial, token), CT_PKCS10))
            [sen] = await _enroll_by_hand(gw, read_psk(device), identity, "sen", new_p256_key(), then_psk=False)
            return renewed, sen, await ask(_get("psk", accept=CT_COSE_SIGN1))
        finally:
            await ctx.shutdown()

    since = lines(gw)
    renewed, sen, psk = asyncio.run(race())
    assert renewed.code == aiocoap.CHANGED and sen.code == aiocoap.CHANGED, (renewed.payload, sen.payload)
    assert psk.code == aiocoap.FORBIDDEN and b"no longer current" in psk.payload, (psk.code, psk.payload)
    wait_event(gw, since, lambda ev: ev.get("event") == "psk" and ev.get("serial") == serial
               and ev.get("reason") == "the certificate this session was issued is not current")


def _revoke(gw, serial: str) -> None:
    reg = gw["data"].open_registry()
    try:
        revoke_device(reg, serial, "keyCompromise", NOW)
    finally:
        reg.close()


def test_revoked_device_is_refused_at_the_next_handshake(gw):
    psk = read_psk(bundle(gw, 4))
    gw["keys"].add(psk.key)

    async def session_then_revoke():
        ctx = await psk_context(psk, gw["base"])
        try:
            response = await asyncio.wait_for(
                ctx.request(aiocoap.Message(code=aiocoap.GET, uri=gw["base"] + "/whoami")).response, 10)
            assert json.loads(response.payload)["serial"] == "SN00000004"
            since = lines(gw)
            _revoke(gw, "SN00000004")
            return since
        finally:
            await ctx.shutdown()

    since = asyncio.run(session_then_revoke())
    # a new handshake is refused (the sweep closing a live session: the next test)
    said = libcoap(gw, psk)
    assert "alert decrypt error" in said and "SN00000004" not in said.split("alert")[-1], said[-2000:]
    wait_event(gw, since, handshake("refused", reason="device SN00000004 or its factory certificate revoked"))


def test_revocation_sweep_closes_a_live_psk_session(gw):
    """An open PSK session of a device revoked meanwhile ends within the sweep interval."""
    psk = read_psk(bundle(gw, 2))

    async def run():
        ctx = await psk_context(psk, gw["base"])
        try:
            response = await asyncio.wait_for(
                ctx.request(aiocoap.Message(code=aiocoap.GET, uri=gw["base"] + "/whoami")).response, 10)
            assert json.loads(response.payload)["kind"] == "factory-psk"
            since = lines(gw)
            _revoke(gw, "SN00000002")
            ev = await asyncio.to_thread(wait_event, gw, since, lambda e: e.get("event") == "session-closed"
                                         and e.get("serial") == "SN00000002")
            return ev
        finally:
            await ctx.shutdown()

    assert asyncio.run(run())["reason"] == "certificate or device revoked"


def test_no_psk_in_any_log_line(gw):
    """Last: every key the tests used, right or wrong, factory or operational, is absent from the
    gateway's whole log (DEBUG included). On its own too: it makes a right and a wrong handshake."""
    libcoap(gw, read_psk(bundle(gw, 1)))
    libcoap(gw, Psk(b"SN00000001", b"0123456789abcdef"))
    # an operational PSK served (sealed) in this very test, and opened by the device
    ok(run_devid("simulate", "--psk", "--gateway", gw["base"], "--devices", gw["legacy"], "--timeout", "20"))
    assert any(ev.get("event") == "psk" and ev.get("result") == "served" for ev in events(gw))
    files = {f.read_bytes() for f in gw["out"].glob("*/*psk-key.txt")}    # every factory and operational key
    gw["keys"] |= files
    assert len(files) >= 4 and b"0123456789abcdef" in gw["keys"]
    text = gw["log"].read_text()
    for key in gw["keys"]:
        assert key.decode() not in text, key
