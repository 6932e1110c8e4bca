"""Issue 12, what an outside device saw (items 1-6), against the real gateway over real DTLS on
loopback: stale or forged evidence never revokes, /sen and /sren answer 281 without Accept,
/whoami honours Accept, the link-format `ct` values, Max-Age 0 on the nonce, a SHA-1 CSR refused
by name. (The libcoap view of 2-5 is in test_interop.py.)"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7

from devid.ca.keys import plain_key
from devid.ca.store import DeviceState
from devid.gateway.coap.transport import DTLSRemote
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import enroll

from .conftest import make_csr, run_devid, tool
from .conftest import one_line_error
from .gateway_helpers import FW, problem, request, run_with_gateway, token_for

OP = dict(cert_name="op-chain.pem", key_name="op-key.pem")
SEN, SREN = "/.well-known/est/sen", "/.well-known/est/sren"
BAD_FW = {"fw_digest": b"\x01" * 32}         # a digest no reference value has: firmware-unknown


class WallClock:
    """The gateway's clock: real time plus an offset the test moves on (OpenSSL checks validity
    on the real clock)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset


def registry_rows(gw, serial: str):
    """Everything the registry holds about a device: its row and its certificates' rows."""
    return gw.registry.get_device(serial), gw.registry.certificates_for_device(serial)


async def wait_until(predicate, what: str, timeout: float = 15.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def store_operational(directory: Path, key, cert: x509.Certificate, operational_ca: x509.Certificate) -> None:
    """The device's operational identity files, as `devid enroll` writes them."""
    (directory / "op-key.pem").write_bytes(plain_key(key))
    os.chmod(directory / "op-key.pem", 0o600)
    (directory / "op-chain.pem").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                                      for c in (cert, operational_ca)))


# -- item 1: only fresh, authentic evidence may change a device's state ----------------------------

def test_stale_or_forged_contraindicated_evidence_never_revokes_fresh_does(world):
    """A meter (`revoke_on_contraindicated = true`), enrolled: evidence naming an unknown firmware
    digest with a replayed, an expired or an unknown nonce, or signed with another key, is a
    contraindicated verdict that revokes nothing; the device stays enrolled, its registry rows
    unchanged, its operational identity still served. The same finding in fresh evidence revokes."""
    data, out = world
    dev = out / "MT00000001"
    clock = WallClock()

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        before = registry_rows(gw, "MT00000001")
        assert before[0].state is DeviceState.ENROLLED
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            async def nonce() -> bytes:
                r = await request(ctx, f"{uri}/attest/nonce")
                assert r.code == codes.CONTENT, r
                return cbor2.loads(r.payload)["nonce"]

            async def verdict(token: bytes) -> dict:
                r = await request(ctx, f"{uri}/attest/evidence", codes.POST, payload=token, content_format=60)
                assert r.code == codes.CHANGED, r
                return cbor2.loads(r.payload)

            def refused(answer: dict, *expected: str) -> None:
                assert answer["verdict"] == "contraindicated" and answer["acceptable"] is False, answer
                assert answer["revoked"] is False, answer
                assert set(expected) <= {r["code"] for r in answer["reasons"]}, answer
                assert registry_rows(gw, "MT00000001") == before

            # replayed: the nonce was used by good evidence a moment ago
            used = await nonce()
            assert (await verdict(token_for(dev, used)))["verdict"] == "affirming"
            refused(await verdict(token_for(dev, used, **BAD_FW)), "nonce-replayed", "firmware-unknown")
            # expired: the nonce's 60 s are over by the gateway's clock
            old = await nonce()
            clock.offset += timedelta(seconds=61)
            refused(await verdict(token_for(dev, old, **BAD_FW)), "nonce-expired", "firmware-unknown")
            # unknown: never issued by this gateway
            refused(await verdict(token_for(dev, os.urandom(16), **BAD_FW)), "nonce-unknown", "firmware-unknown")
            # forged: signed with another key (and the nonce is not burnt by it)
            kept = await nonce()
            forged = token_for(dev, kept, signer=ec.generate_private_key(ec.SECP256R1()), **BAD_FW)
            refused(await verdict(forged), "signature-invalid")
            # still enrolled: the operational identity gets its configuration on a new session
            op, _ = await device_context(dev, "127.0.0.1", **OP)
            try:
                assert (await request(op, f"{uri}/config")).code == codes.CONTENT
            finally:
                await op.shutdown()
            # fresh and authentic: the same finding revokes the device, and its session ends
            answer = await verdict(token_for(dev, kept, **BAD_FW))
            assert answer["verdict"] == "contraindicated" and answer["revoked"] is True, answer
            assert {r["code"] for r in answer["reasons"]} == {"firmware-unknown"}
            assert gw.registry.get_device("MT00000001").state is DeviceState.REVOKED

            async def refused_now() -> bool:
                try:
                    r = await asyncio.wait_for(ctx.request(aiocoap.Message(code=codes.GET,
                                                                           uri=f"{uri}/whoami")).response, 5)
                except Exception:        # the session is closed, and a new handshake is refused
                    return True
                return r.code != codes.CONTENT
            await wait_until(refused_now, "the revoked device's session to end")
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body, clock=clock)


# -- item 2: /sen and /sren answer 281 without Accept (RFC 9148 4.3) -------------------------------

def test_sen_and_sren_default_to_281_and_give_287_on_request(world):
    data, out = world
    dev = out / "LG00000001"           # attestation waived: /sen needs no evidence
    op_ca = data.cert("operational")

    def from_281(r, key) -> x509.Certificate:
        assert r.code == codes.CHANGED and r.opt.content_format == 281, r
        certs = pkcs7.load_der_pkcs7_certificates(r.payload)        # a SET: no order
        [mine] = [c for c in certs if c.public_key() == key.public_key()]
        assert [c for c in certs if c is not mine] == [op_ca]
        return mine

    def from_287(r, key) -> x509.Certificate:
        assert r.code == codes.CHANGED and r.opt.content_format == 287, r
        cert = x509.load_der_x509_certificate(r.payload)
        assert cert.public_key() == key.public_key()
        return cert

    async def post(ctx, uri, path, key, **kw):
        return await request(ctx, uri + path, codes.POST, payload=make_csr(key)[0], content_format=286, **kw)

    async def body(uri, gw):
        keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(4)]
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            from_281(await post(ctx, uri, SEN, keys[0]), keys[0])
            cert = from_287(await post(ctx, uri, SEN, keys[1], accept=287), keys[1])
        finally:
            await ctx.shutdown()
        store_operational(dev, keys[1], cert, op_ca)
        ctx, _ = await device_context(dev, "127.0.0.1", **OP)
        try:
            cert = from_281(await post(ctx, uri, SREN, keys[2]), keys[2])
        finally:
            await ctx.shutdown()
        store_operational(dev, keys[2], cert, op_ca)
        ctx, _ = await device_context(dev, "127.0.0.1", **OP)
        try:
            from_287(await post(ctx, uri, SREN, keys[3], accept=287), keys[3])
            # an Accept the resource does not offer: 4.06, problem details
            r = await post(ctx, uri, SREN, ec.generate_private_key(ec.SECP256R1()), accept=60)
            assert r.code == codes.NOT_ACCEPTABLE and problem(r)[-2] == "this resource offers content format 281 or 287 or 62"
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


# -- items 3, 4, 5: /whoami and Accept, link format, Max-Age on the nonce ---------------------------

def test_whoami_honours_accept_and_refuses_with_problem_details(world):
    data, out = world

    async def body(uri, gw):
        ctx, _ = await device_context(out / "TS00000001", "127.0.0.1")
        try:
            for accept in ({}, {"accept": 50}):
                r = await request(ctx, f"{uri}/whoami", **accept)
                assert r.code == codes.CONTENT and r.opt.content_format == 50, r
                assert b'"serial": "TS00000001"' in r.payload
            for fmt in (60, 40, 287):           # RFC 7252 5.10.4: a format it cannot give is 4.06
                r = await request(ctx, f"{uri}/whoami", accept=fmt)
                assert r.code == codes.NOT_ACCEPTABLE, r
                assert problem(r) == {-1: "not acceptable", -2: "this resource offers content format 50"}
        finally:
            await ctx.shutdown()
        # no device identity (a DTLS handshake always has one, so this asks the gateway's own
        # site directly): 4.01 as problem details, like every other refusal
        port = int(uri.rsplit(":", 1)[1])
        nobody = DTLSRemote(gw.coap.interface, ("127.0.0.1", 1), None, ("127.0.0.1", port))
        unauthenticated = aiocoap.Message.decode(b"\x40\x01\x12\x35\xb6whoami", remote=nobody)
        r = await _render(gw, unauthenticated)
        assert r.code == codes.UNAUTHORIZED and problem(r) == {-1: "device certificate required"}
    run_with_gateway(data, body)


async def _render(gw, request):
    try:
        return await gw.site.render(request)
    except aiocoap.error.RenderableError as exc:
        return exc.to_message()


def link_format(payload: bytes) -> dict[str, dict[str, str]]:
    """`</path>;a="b";c` entries of application/link-format, by path."""
    links = {}
    for entry in re.findall(r'<([^>]*)>((?:;[^,;]+)*)', payload.decode()):
        path, params = entry
        attrs = dict(re.fullmatch(r'([^=]+)(?:="?([^"]*)"?)?', p).groups("") for p in params.split(";")[1:])
        links[path] = attrs
    return links


def test_link_format_lists_what_each_resource_returns(world):
    data, out = world

    async def body(uri, gw):
        ctx, _ = await device_context(out / "TS00000001", "127.0.0.1")
        try:
            r = await request(ctx, f"{uri}/.well-known/core")
            assert r.code == codes.CONTENT and r.opt.content_format == 40
            links = link_format(r.payload)
        finally:
            await ctx.shutdown()
        assert {path: attrs.get("ct") for path, attrs in links.items() if path.startswith("/")} == {
            "/.well-known/core": "40",
            "/whoami": "50",
            "/.well-known/est/crts": "281 287",
            "/.well-known/est/sen": "281 287 62",         # what it returns, not 286 (RFC 7252 7.2.1)
            "/.well-known/est/sren": "281 287 62",
            "/attest/nonce": "60",
            "/attest/evidence": "60",
            "/config": "60 50",
            "/psk": "18",                                 # PSK devices (issue 18): a COSE_Sign1
        }
        assert links["/whoami"]["rt"] == "devid.whoami" and links["/.well-known/est/sen"]["rt"] == "ace.est.sen"
    run_with_gateway(data, body)


def test_nonce_answers_with_max_age_0(world):
    data, out = world

    async def body(uri, gw):
        ctx, _ = await device_context(out / "TS00000001", "127.0.0.1")
        try:
            first = await request(ctx, f"{uri}/attest/nonce")
            second = await request(ctx, f"{uri}/attest/nonce")
        finally:
            await ctx.shutdown()
        for r in (first, second):
            assert r.code == codes.CONTENT and r.opt.max_age == 0, r      # absent would mean 60 s
        assert cbor2.loads(first.payload)["nonce"] != cbor2.loads(second.payload)["nonce"]
    run_with_gateway(data, body)


# -- item 6: a CSR signed with a refused hash says so ----------------------------------------------

def openssl_csr(tmp_path: Path, digest: str) -> tuple[bytes, Path]:
    """A CSR for a new P-256 key signed with `digest`, by openssl (cryptography refuses to sign
    with SHA-1)."""
    key = tmp_path / f"{digest}-key.pem"
    key.write_bytes(plain_key(ec.generate_private_key(ec.SECP256R1())))
    csr = tmp_path / f"{digest}.der"
    proc = subprocess.run([tool("openssl"), "req", "-new", f"-{digest}", "-key", str(key), "-subj", "/CN=x",
                           "-outform", "DER", "-out", str(csr)], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return csr.read_bytes(), csr


@pytest.mark.parametrize("digest,name", [("sha1", "SHA-1"), ("sha224", "SHA-224")])
def test_csr_signed_with_a_refused_hash_is_refused_by_name(world, tmp_path, digest, name):
    data, out = world
    dev = out / "LG00000001"
    csr, _ = openssl_csr(tmp_path, digest)
    good, _ = openssl_csr(tmp_path, "sha256")

    async def body(uri, gw):
        before = registry_rows(gw, "LG00000001")
        ctx, _ = await device_context(dev, "127.0.0.1")
        try:
            r = await request(ctx, f"{uri}{SEN}", codes.POST, payload=csr, content_format=286)
            assert r.code == codes.BAD_REQUEST and problem(r)[-1] == "invalid CSR", r
            detail = problem(r)[-2]
            assert detail == f"CSR is signed with {name}, a hash the CA refuses (sign with SHA-256, SHA-384, SHA-512)"
            assert "does not verify" not in detail
            assert registry_rows(gw, "LG00000001") == before          # nothing issued
            r = await request(ctx, f"{uri}{SEN}", codes.POST, payload=good, content_format=286)
            assert r.code == codes.CHANGED, r
        finally:
            await ctx.shutdown()
    run_with_gateway(data, body)


def test_ca_sign_csr_refuses_a_sha1_csr_in_one_line(data, tmp_path):
    _, csr = openssl_csr(tmp_path, "sha1")
    proc = run_devid("ca", "sign-csr", "--profile", "operational", "--device", "SN00000001", "--csr", str(csr),
                     data_dir=data.path)
    one_line_error(proc, "SHA-1", "refuses")
