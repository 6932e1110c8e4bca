"""Certificate lifecycle (threat 21): current -> superseded -> refused (after an optional grace),
the cap on operational certificates per device and window, and `devid revoke --certificate`.
On the real gateway over loopback DTLS, the real CLI as a subprocess, real SQLite across processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca.authority import CertificateAuthority
from devid.ca.identity import format_serial
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.service.budgets import Budgets, Rate
from devid.gateway.device.client import device_context
from devid.gateway.device.enroll import EnrollFailed, enroll, fetch_config, renew

from .conftest import NOW, make_csr, register_device, run_devid, sql
from .dtls_helpers import RawSession, client_context_for
from .conftest import ok, one_line_error
from .gateway_helpers import FW, POLICY, problem, request, run_with_gateway

pytestmark = pytest.mark.engines

OP = dict(cert_name="op-chain.pem", key_name="op-key.pem")
SREN = ".well-known/est/sren"


class WallClock:
    """The gateway's clock: real time plus an offset the test moves on (OpenSSL checks validity
    on the real clock, so the certificates a test connects with are issued at real time)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.offset




def op_serial(bundle: Path) -> int:
    return x509.load_pem_x509_certificate((bundle / "op-cert.pem").read_bytes()).serial_number


def statuses(gw, serial: str) -> dict[int, CertStatus]:
    return {c.serial: c.status for c in gw.registry.certificates_for_device(serial)}


async def sren(ctx, uri):
    return await request(ctx, f"{uri}/{SREN}", codes.POST, payload=make_csr()[0], content_format=286)


# -- superseded certificates ---------------------------------------------------------------------------

def test_a_superseded_certificate_cannot_renew_read_config_or_connect(world, tmp_path):
    data, out = world
    dev, old = out / "TS00000001", tmp_path / "old"

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        shutil.copytree(dev, old)                  # the device's first operational identity (A)
        a = op_serial(dev)
        ctx_a, _ = await device_context(old, "127.0.0.1", **OP)
        factory, _ = await device_context(dev, "127.0.0.1")
        try:
            assert (await request(ctx_a, f"{uri}/config")).code == codes.CONTENT
            b = (await renew(dev, uri)).serial_number
            assert statuses(gw, "TS00000001")[a] is CertStatus.SUPERSEDED
            assert statuses(gw, "TS00000001")[b] is CertStatus.CURRENT
            # A's live session: no renewal, no configuration (this once answered 2.04 and 2.05)
            for r in (await sren(ctx_a, uri), await request(ctx_a, f"{uri}/config")):
                assert r.code == codes.FORBIDDEN and problem(r)[-1] == "certificate superseded"
            assert len(statuses(gw, "TS00000001")) == 3     # factory, A, B: nothing was issued
            # ... which the revocation sweep leaves open for the CoAP exchange lifetime (a lost /sren
            # answer is served again from the deduplication cache; next test)
            (session,) = [s for s in gw.engine.sessions.values() if s.identity.certificate_serial == a]
            assert gw.authenticator.revoked([session.identity]) == []
            assert gw.authenticator.ended([session.identity]) == []
            # A cannot open a new session at all
            failed = gw.engine.stats.failed
            with pytest.raises(EnrollFailed):
                await fetch_config(old, uri, timeout=5)
            assert gw.engine.stats.failed == failed + 1
            # B, the device's current identity, works; so does its factory identity (never superseded)
            assert (await fetch_config(dev, uri))["device"] == "TS00000001"
            assert (await request(factory, f"{uri}/config")).code == codes.CONTENT
        finally:
            await ctx_a.shutdown()
            await factory.shutdown()
    run_with_gateway(data, body)


def test_a_superseded_certificates_session_ends_after_the_exchange_lifetime(world, tmp_path):
    """A session of a superseded certificate (a stolen key's, say) must not live on: it would keep
    spending its device's request budgets (keyed by device) and lock the device out of /config
    and /sren. The sweep ends it once the CoAP exchange lifetime (247 s) since the supersession
    has passed."""
    data, out = world
    dev, old = out / "TS00000003", tmp_path / "old"
    clock = WallClock()

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        shutil.copytree(dev, old)
        a = op_serial(dev)
        ctx_a, _ = await device_context(old, "127.0.0.1", **OP)
        try:
            assert (await request(ctx_a, f"{uri}/config")).code == codes.CONTENT
            await renew(dev, uri)
            (session,) = [s for s in gw.engine.sessions.values() if s.identity.certificate_serial == a]
            assert gw.authenticator.ended([session.identity]) == []
            clock.offset = timedelta(seconds=248)
            assert gw.authenticator.ended([session.identity]) == [(session.identity, "certificate superseded")]
            deadline = time.monotonic() + 10
            while any(s.identity is not None and s.identity.certificate_serial == a for s in gw.engine.sessions.values()):
                assert time.monotonic() < deadline, "the sweep did not end the superseded certificate's session"
                await asyncio.sleep(0.05)
            # the device's current identity is served, with its budgets intact
            assert (await fetch_config(dev, uri))["device"] == "TS00000003"
        finally:
            await ctx_a.shutdown()
    run_with_gateway(data, body, clock=clock)


def test_a_lost_sren_answer_comes_again_from_the_coap_deduplication_cache(world):
    """Why no grace period is needed: a device that did not get its /sren answer retransmits the
    same CON in the same session and gets the same certificate, although the certificate that
    session authenticated with is superseded by then."""
    data, out = world
    dev = out / "TS00000002"

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        port = int(uri.rsplit(":", 1)[1])
        chain = x509.load_pem_x509_certificates((dev / "op-chain.pem").read_bytes())
        key = serialization.load_pem_private_key((dev / "op-key.pem").read_bytes(), None)
        root = x509.load_pem_x509_certificate((dev / "ca.pem").read_bytes())
        async with RawSession(client_context_for(chain[0], chain[1:], key, root), port) as s:
            await s.handshake()
            m = aiocoap.Message(code=codes.POST, uri_path=[".well-known", "est", "sren"], content_format=286,
                                payload=make_csr()[0])
            m.mtype, m.mid, m.token = aiocoap.CON, 0x2001, b"\x07"
            wire = m.encode()
            await s.exchange(wire)
            await s.exchange(wire)          # the retransmission
        received = s.received
        first, again = (aiocoap.Message.decode(x) for x in received)
        assert first.code == again.code == codes.CHANGED and first.payload == again.payload
        assert statuses(gw, "TS00000002")[chain[0].serial_number] is CertStatus.SUPERSEDED
        assert len(statuses(gw, "TS00000002")) == 3          # factory, old, new: issued once
    run_with_gateway(data, body)


def test_grace_period_for_superseded_certificates(world, tmp_path):
    """With a grace of 10 minutes a superseded certificate renews and reads /config for 10
    minutes after the issuance that superseded it, and is refused after."""
    data, out = world
    dev, old = out / "TS00000003", tmp_path / "old"
    clock = WallClock()

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        shutil.copytree(dev, old)                              # A
        await renew(dev, uri)                                  # B supersedes A now (t0)
        clock.offset = timedelta(minutes=5)
        ctx_a, _ = await device_context(old, "127.0.0.1", **OP)
        try:
            assert (await request(ctx_a, f"{uri}/config")).code == codes.CONTENT
            r = await sren(ctx_a, uri)                         # C supersedes B at t0 + 5 min
            assert r.code == codes.CHANGED
            clock.offset = timedelta(minutes=11)
            for r in (await request(ctx_a, f"{uri}/config"), await sren(ctx_a, uri)):
                assert r.code == codes.FORBIDDEN and problem(r)[-1] == "certificate superseded"
        finally:
            await ctx_a.shutdown()
        with pytest.raises(EnrollFailed):
            await fetch_config(old, uri, timeout=5)            # A's grace is over: no handshake
        assert (await fetch_config(dev, uri))["device"] == "TS00000003"   # B's lasts till t0 + 15 min
        clock.offset = timedelta(minutes=16)
        with pytest.raises(EnrollFailed):
            await fetch_config(dev, uri, timeout=5)
    run_with_gateway(data, body, clock=clock, budgets=Budgets(superseded_grace=timedelta(minutes=10)))


# -- certificates per device and window ---------------------------------------------------------------

def test_operational_certificates_per_device_are_capped_across_restarts(world):
    data, out = world
    waived, attested = out / "LG00000001", out / "TS00000004"
    budgets = Budgets(certificates_per_window=3, renew=Rate(100, 1.0), enroll=Rate(100, 1.0))

    async def first(uri, gw):
        await enroll(waived, uri, None)
        await renew(waived, uri)
        await enroll(waived, uri, None)                       # three in the window
        with pytest.raises(EnrollFailed, match="4.29 Too Many Requests too many certificates"):
            await enroll(waived, uri, None)
        ctx, _ = await device_context(waived, "127.0.0.1", **OP)
        try:
            r = await sren(ctx, uri)
        finally:
            await ctx.shutdown()
        assert r.code == codes.TOO_MANY_REQUESTS and problem(r)[-1] == "too many certificates"
        assert 86_400 - 120 <= r.opt.max_age <= 86_400
        # a refused /sen does not use up the device's verdict
        for _ in range(3):
            await enroll(attested, uri, FW)
        with pytest.raises(EnrollFailed, match="too many certificates"):
            await enroll(attested, uri, FW)
        uses = sql(gw.registry, "SELECT COUNT(*) FROM attestation_verdict_uses")[0][0]
        assert uses == 3

    async def after_restart(uri, gw):
        with pytest.raises(EnrollFailed, match="too many certificates"):
            await renew(waived, uri)
        ops = [c for c in gw.registry.certificates_for_device("LG00000001") if c.profile == "operational"]
        assert len(ops) == 3

    run_with_gateway(data, first, budgets=budgets)
    run_with_gateway(data, after_restart, budgets=budgets)


def _worker(path: str, action: str, who: dict, limit: int, barrier, q) -> None:
    """One gateway worker's enrollment service on the shared registry, racing the others."""
    from devid.attestation.policy import parse_policy
    from devid.attestation.service import AttestationService
    from devid.gateway.store.attestation_store import AttestationStore
    from devid.gateway.app.datadir import DataDir
    from devid.gateway.service.enrollment import EnrollmentError, EnrollmentService
    from devid.gateway.service.identity import PeerIdentity
    data = DataDir(Path(path))
    reg = data.open_registry()
    try:
        store = AttestationStore(reg)
        policy = parse_policy((data.path / "attestation-policy.toml").read_text(), "test")
        now = lambda: datetime.now(timezone.utc)        # noqa: E731
        svc = EnrollmentService(data.authority(reg), AttestationService(policy, store, store, clock=now), policy,
                                None, now, atomic=reg.device_transaction,
                                budgets=Budgets(certificates_per_window=limit))
        key = serialization.load_pem_public_key(who.pop("public_key"))
        identity = PeerIdentity(public_key=key, **who)
        barrier.wait(30)
        try:
            getattr(svc, action)(identity, make_csr()[0])
            q.put("issued")
        except EnrollmentError as exc:
            q.put(exc.code)
    finally:
        reg.close()


def _race(data, action: str, who: dict, limit: int, workers: int = 6) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier, q = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(data.path), action, dict(who), limit, barrier, q))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return results


def _identity(serial: str, device_type: str, kind: str, record) -> dict:
    cert = x509.load_der_x509_certificate(record.der)
    return dict(serial=serial, device_type=device_type, kind=kind, fingerprint=record.fingerprint,
                certificate_serial=record.serial,
                public_key=cert.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))


def test_racing_workers_keep_the_lifecycle_and_the_cap(data, ca, registry):
    """Six processes on one registry file: renewals with one certificate leave one winner (the
    others find it superseded inside their issuance transaction); enrollments beyond the cap are
    refused exactly beyond it."""
    _, factory = register_device(ca, "LG1", "legacy-sensor")
    (data.path / "attestation-policy.toml").write_text(POLICY)
    results = _race(data, "enroll", _identity("LG1", "legacy-sensor", "factory", factory.record), limit=3)
    assert results == ["issued"] * 3 + ["too-many-certificates"] * 3
    current = [c for c in registry.certificates_for_device("LG1")
               if c.profile == "operational" and c.status is CertStatus.CURRENT]
    assert len(current) == 1
    results = _race(data, "renew", _identity("LG1", "legacy-sensor", "operational", current[0]), limit=100)
    assert results == ["certificate-superseded"] * 5 + ["issued"]
    ops = [c for c in registry.certificates_for_device("LG1") if c.profile == "operational"]
    assert len(ops) == 4 and sum(c.status is CertStatus.CURRENT for c in ops) == 1


def test_racing_first_enrollments_with_reenroll_false_issue_once(data, ca, registry):
    """reenroll = false holds across workers: the device state is checked again under the
    registry's write lock, so of first enrollments racing on six processes one is issued."""
    _, factory = register_device(ca, "ST1", "strict-legacy")
    (data.path / "attestation-policy.toml").write_text(
        POLICY + '\n[device_types.strict-legacy]\nattestation = "waived"\nreenroll = false\n')
    results = _race(data, "enroll", _identity("ST1", "strict-legacy", "factory", factory.record), limit=100)
    assert results == ["issued"] + ["reenrollment-refused"] * 5
    assert len([c for c in registry.certificates_for_device("ST1") if c.profile == "operational"]) == 1


# -- devid revoke --certificate --------------------------------------------------------------------------

def _colons(fingerprint: str) -> str:
    """As `openssl x509 -fingerprint -sha256` prints it."""
    return ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2)).upper()


def test_revoke_one_certificate_from_the_command_line(data, ca, registry):
    register_device(ca, "SN1")
    a = ca.issue_operational(make_csr()[0], "SN1", NOW)
    b = ca.issue_operational(make_csr()[0], "SN1", NOW)
    ddir = data.path
    text = ok(run_devid("revoke", "--certificate", format(a.cert.serial_number, "x"), "--reason", "keyCompromise",
                        data_dir=ddir))
    # printed as openssl prints it (upper-case, an even number of digits), whatever the spelling given
    assert f"certificate {format_serial(a.cert.serial_number)} (operational, device SN1) revoked (keyCompromise)" in text
    assert "device SN1 stays enrolled" in text
    records = {c.serial: c for c in registry.certificates_for_device("SN1")}
    assert records[a.cert.serial_number].status is CertStatus.REVOKED
    assert records[a.cert.serial_number].revocation_reason == "keyCompromise"
    assert records[b.cert.serial_number].status is CertStatus.CURRENT
    assert registry.get_device("SN1").state is DeviceState.ENROLLED
    # by fingerprint, as openssl prints it: already revoked, nothing changes
    text = ok(run_devid("revoke", "--certificate", _colons(a.record.fingerprint), data_dir=ddir))
    assert "was already revoked" in text and "(keyCompromise)" in text
    for spelled in (f"sha256:{_colons(a.record.fingerprint)}", f"SHA256:{a.record.fingerprint}",
                    f"sha256 Fingerprint={_colons(a.record.fingerprint)}"):
        assert "was already revoked" in ok(run_devid("revoke", "--certificate", spelled, data_dir=ddir))
    # the CRL lists it, and only it
    ok(run_devid("crl", "--ca", "operational", data_dir=ddir))
    crl = x509.load_pem_x509_crl((ddir / "crl" / "operational.crl.pem").read_bytes())
    assert [e.serial_number for e in crl] == [a.cert.serial_number]
    # the other certificate still verifies, the revoked one does not
    (ddir / "b.pem").write_bytes(b.pem)
    (ddir / "a.pem").write_bytes(a.pem)
    ok(run_devid("ca", "verify", ddir / "b.pem", "--profile", "operational", data_dir=ddir))
    one_line_error(run_devid("ca", "verify", ddir / "a.pem", "--profile", "operational", data_dir=ddir), "revoked")


def test_revoke_certificate_errors_are_one_line(data, ca, registry):
    register_device(ca, "SN1")
    register_device(ca, "SN2")
    # two certificates whose serials share their first 15 hex digits (the CA's randomness is ours here)
    shared = os.urandom(8)
    twin_ca = CertificateAuthority(ca._issuers, ca.profiles, ca.settings, registry,
                                   rand_bytes=lambda n: bytes([shared[0] | 0x80]) + shared[1:] + os.urandom(n - 8))
    x = twin_ca.issue_operational(make_csr()[0], "SN1", NOW)
    y = twin_ca.issue_operational(make_csr()[0], "SN2", NOW)
    prefix = format(x.cert.serial_number, "x")[:12]
    assert format(y.cert.serial_number, "x").startswith(prefix)
    ddir = data.path
    one_line_error(run_devid("revoke", "--certificate", prefix, data_dir=ddir), "matches 2 certificates",
                   f"{format_serial(x.cert.serial_number)} (operational, SN1)", "give more digits")
    one_line_error(run_devid("revoke", "--certificate", "ab" * 16, data_dir=ddir), "no certificate")
    one_line_error(run_devid("revoke", "--certificate", "abc", data_dir=ddir), "no certificate",
                   "at least 8 hex digits")
    one_line_error(run_devid("revoke", "--certificate", "SN1", data_dir=ddir), "neither a certificate serial")
    gateway = data.cert("gateway").serial_number
    one_line_error(run_devid("revoke", "--certificate", format(gateway, "x"), data_dir=ddir),
                   "gateway certificate, not a device's")
    one_line_error(run_devid("revoke", "--certificate", format(x.cert.serial_number, "x"), "--reason", "bored",
                             data_dir=ddir), "invalid choice")
    for args in (("revoke",), ("revoke", "SN1", "--certificate", prefix)):
        proc = one_line_error(run_devid(*args, data_dir=ddir))
        assert "see 'devid revoke --help'" in proc
    # a unique prefix of a fingerprint is enough; nothing else was touched by the errors above
    assert {c.status for c in registry.certificates_for_device("SN1")} == {CertStatus.CURRENT}
    ok(run_devid("revoke", "--certificate", y.record.fingerprint[:16], data_dir=ddir))
    assert registry.get_certificate(y.cert.serial_number).status is CertStatus.REVOKED
    assert registry.get_certificate(x.cert.serial_number).status is CertStatus.CURRENT


def test_revoking_one_certificate_closes_its_sessions_only(world):
    data, out = world
    dev = out / "TS00000002"

    async def body(uri, gw):
        await enroll(dev, uri, FW)
        op, _ = await device_context(dev, "127.0.0.1", **OP)
        factory, _ = await device_context(dev, "127.0.0.1")
        try:
            assert (await request(op, f"{uri}/config")).code == codes.CONTENT
            assert (await request(factory, f"{uri}/config")).code == codes.CONTENT
            serial = op_serial(dev)
            proc = await asyncio.to_thread(run_devid, "revoke", "--certificate", format(serial, "x"),
                                           data_dir=data.path)
            assert proc.returncode == 0, proc.stderr

            def kinds():
                return sorted(s.identity.kind for s in gw.engine.sessions.values() if s.identity is not None)
            deadline = time.monotonic() + 10
            while kinds() != ["factory"] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert kinds() == ["factory"], "the revoked certificate's session is still open"
            # the device is not revoked: its factory session goes on, and it enrolls again
            assert (await request(factory, f"{uri}/config")).code == codes.CONTENT
            assert gw.registry.get_device("TS00000002").state is DeviceState.ENROLLED
        finally:
            await op.shutdown()
            await factory.shutdown()
        with pytest.raises(EnrollFailed):
            await fetch_config(dev, uri, timeout=5)            # its next handshake is refused
        result = await enroll(dev, uri, FW)
        assert statuses(gw, "TS00000002")[result.certificate.serial_number] is CertStatus.CURRENT
        assert statuses(gw, "TS00000002")[serial] is CertStatus.REVOKED
    run_with_gateway(data, body)


def test_the_crl_lists_a_superseded_certificate_until_it_expires(data, ca, registry):
    """A renewal supersedes the previous operational certificate: the operational CA's CRL lists it
    with reasonCode superseded and the time it was superseded (the next one's issue time), and
    not the current one; once it has expired it drops off."""
    from devid.ca.revocation import build_crl
    register_device(ca, "SN1")
    a = ca.issue_operational(make_csr()[0], "SN1", NOW)
    b = ca.issue_operational(make_csr()[0], "SN1", NOW + timedelta(minutes=5))
    info = build_crl(data.issuer("operational"), registry, NOW + timedelta(minutes=6))
    entries = {e.serial_number: e for e in info.crl}
    assert list(entries) == [a.cert.serial_number] and info.entries == 1
    entry = entries[a.cert.serial_number]
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.superseded
    assert entry.revocation_date_utc == NOW + timedelta(minutes=5)         # when b was issued
    assert b.cert.serial_number not in entries
    after = build_crl(data.issuer("operational"), registry, a.cert.not_valid_after_utc + timedelta(seconds=1))
    assert [e.serial_number for e in after.crl] == []
