"""Several gateway hosts on one PostgreSQL registry (issue 14, item 3 and its tests): real `devid
serve` processes with their own data directories on one real PostgreSQL cluster, the real CLI,
real devices over DTLS on loopback.

- host A is made with `devid init --registry URL`, B and C with `devid init --join URL --ca-from`
  (a copy of A's DATA/ca): no CA is created, a wrong CA or a registry without one is refused;
- a device enrolls through A, renews through B, is revoked through C, and then A and B refuse it;
  enrollments through A and B at the same time append to one hash chain, which verifies on
  every host;
- a nonce issued by A is single-use on B (and on A), even when both are sent at once;
- revoking on A ends the device's open DTLS session on B within B's revocation sweep;
- kill -9 of a gateway during `devid simulate` leaves no violated invariant, and the devices it
  failed enroll afterwards;
- the registry's password never reaches a log line, a JSON document or a file of a data
  directory, even when the database goes away under a running gateway (devices get 5.03
  "storage unavailable" with Max-Age, the log one line, and all works again when it returns).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes
from cryptography import x509

from devid.ca.identity import fingerprint
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.client import device_context
from devid.gateway.store.engines import open_registry

from . import serve_helpers as H
from .conftest import ok, one_line_error, run_devid, sql
from .postgres_helpers import PostgresCluster

FW = H.FW
FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]
DEVICE_TYPE = H.bench_common.DEVICE_TYPE
CA_ROWS = "SELECT serial, fingerprint FROM certificates WHERE device_serial IS NULL ORDER BY serial"


def wait_for(condition, what: str, seconds: float = 60.0):
    """Poll `condition` until it returns something true (which is returned), within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.05)


async def await_for(condition, what: str, seconds: float = 60.0):
    deadline = time.monotonic() + seconds
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        await asyncio.sleep(0.05)


def log_events(log: Path, event: str | None = None) -> list[dict]:
    """The gateway's log lines (one JSON object each), complete lines only (it may be writing)."""
    text = log.read_text()
    lines = [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.startswith("{")]
    return [line for line in lines if event is None or line.get("event") == event]


def registry_rows(url: str, statement: str, params=()):
    reg = open_registry(url)
    try:
        return sql(reg, statement, params)
    finally:
        reg.close()


def provision(data: Path, out: Path, prefix: str, count: int) -> list[Path]:
    ok(run_devid("provision", "--count", count, "--device-type", DEVICE_TYPE, "--out", out,
                 "--serial-prefix", prefix, "--quiet", data_dir=data))
    return sorted(p for p in out.iterdir() if p.name.startswith(prefix))


def subset(bundles: list[Path], into: Path) -> Path:
    """A directory of copies of these bundles (`devid simulate --devices` takes a directory)."""
    into.mkdir()
    for b in bundles:
        shutil.copytree(b, into / b.name)
    return into


def assert_invariants(url: str, bundle_dirs: list[Path]) -> dict:
    """What must hold after any crash (what `devid registry check` checks, in SQL until it lands):
    no certificate serial or fingerprint twice, at most one current operational certificate per
    device, every enrolled device holds one, every certificate a device holds is the registry's
    for that device, and the attestation log's sequence has no gap."""
    reg = open_registry(url)
    try:
        assert sql(reg, "SELECT serial FROM certificates GROUP BY serial HAVING COUNT(*) > 1") == []
        assert sql(reg, "SELECT fingerprint FROM certificates GROUP BY fingerprint HAVING COUNT(*) > 1") == []
        assert sql(reg, "SELECT device_serial FROM certificates WHERE profile = 'operational' AND status = 'current' "
                        "GROUP BY device_serial HAVING COUNT(*) > 1") == []
        assert sql(reg, "SELECT serial FROM devices d WHERE state = 'enrolled' AND NOT EXISTS (SELECT 1 FROM "
                        "certificates c WHERE c.device_serial = d.serial AND c.profile = 'operational' "
                        "AND c.status = 'current')") == []
        held = 0
        for directory in bundle_dirs:
            for bundle in directory.iterdir():
                cert_file = bundle / "op-cert.pem"
                if cert_file.exists():
                    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
                    record = reg.get_certificate(cert.serial_number)
                    assert record is not None, f"{bundle.name} holds {cert.serial_number:x}, not in the registry"
                    assert record.fingerprint == fingerprint(cert) and record.device_serial == bundle.name
                    held += 1
        seqs = [r[0] for r in sql(reg, "SELECT seq FROM attestation_log ORDER BY seq")]
        assert seqs == list(range(1, len(seqs) + 1)), "the attestation log's sequence has a gap"
        return {"held": held, "log_entries": len(seqs)}
    finally:
        reg.close()


def verify_log_everywhere(*hosts: Path) -> list[dict]:
    reports = []
    for host in hosts:
        report = json.loads(ok(run_devid("attest", "verify-log", "--json", data_dir=host)))
        assert report["ok"] is True and report["problems"] == [], report
        reports.append(report)
    assert len({(r["head_seq"], r["head_hash"]) for r in reports}) == 1, reports     # one chain, seen alike
    return reports


# -- three hosts of one registry ---------------------------------------------------------------------

@dataclass
class Hosts:
    url: str
    a: Path
    b: Path
    c: Path
    ca_copy: Path
    init_json: dict
    join_json: dict
    factory: Path
    tmp: Path


@pytest.fixture(scope="module")
def hosts(postgres, tmp_path_factory) -> Hosts:
    """Host A made with `devid init --registry`, hosts B and C joined to it from a copy of A's
    CA directory; each with the policy that accepts the bench firmware."""
    tmp = tmp_path_factory.mktemp("hosts")
    url = postgres.new_schema("hosts")
    a, b, c = tmp / "host-a", tmp / "host-b", tmp / "host-c"
    init_json = json.loads(ok(run_devid("init", "--registry", url, "--json", data_dir=a)))
    ca_copy = tmp / "ca-of-a"                 # what an operator copies to the other hosts
    shutil.copytree(a / "ca", ca_copy)
    join_json = json.loads(ok(run_devid("init", "--join", url, "--ca-from", ca_copy, "--json", data_dir=b)))
    text = ok(run_devid("init", "--join", url, "--ca-from", ca_copy, data_dir=c))
    assert text.startswith(f"joined {url} in {c}: no CA created"), text
    for host in (a, b, c):
        (host / POLICY_FILE).write_text(H.bench_common.bench_policy())
    return Hosts(url, a, b, c, ca_copy, init_json, join_json, tmp / "factory", tmp)


@pytest.fixture(scope="module")
def gateways(hosts):
    """`devid serve` on hosts A and B for the module (each checked for a clean stop at its end)."""
    served = []
    try:
        for host in (hosts.a, hosts.b):
            served.append(H.serve(host, hosts.tmp / f"{host.name}.log"))
        yield served
    finally:
        for s in served:
            assert s.stop() == 0
            assert "Traceback" not in s.log.read_text()


def test_hosts_join_the_registry_without_making_a_ca(hosts, postgres, tmp_path):
    url = hosts.url
    assert hosts.init_json["ok"] is True and hosts.init_json["registry"] == url
    assert hosts.join_json["ok"] is True and hosts.join_json["joined"] is True
    assert hosts.join_json["registry"] == url and Path(hosts.join_json["data"]) == hosts.b
    # B holds A's CA, certificate for certificate, and the registry holds that CA's rows only
    for name, cert in hosts.init_json["certificates"].items():
        assert hosts.join_json["certificates"][name] == cert, name
        for host in (hosts.b, hosts.c):
            assert (host / "ca" / f"{name}.cert.pem").read_bytes() == (hosts.a / "ca" / f"{name}.cert.pem").read_bytes()
            assert stat.S_IMODE((host / "ca" / f"{name}.key.pem").stat().st_mode) == 0o600
    fps = {c["sha256_fingerprint"] for c in hosts.init_json["certificates"].values()}
    rows = registry_rows(url, CA_ROWS)
    assert {fp for _, fp in rows} == fps and len(rows) == 4
    assert registry_rows(url, "SELECT value FROM deployment WHERE key = 'root_fingerprint'") == \
        [(hosts.init_json["certificates"]["root"]["sha256_fingerprint"],)]
    # devid.toml on B names the registry and no password; the first host's settings came along
    doc = tomllib.loads((hosts.b / "devid.toml").read_text())
    assert doc["registry"] == {"url": url}
    assert tomllib.loads((hosts.a / "devid.toml").read_text())["organization"] == doc["organization"]
    assert stat.S_IMODE((hosts.b / "ca").stat().st_mode) == 0o700

    # another CA's files: one line, nothing left behind, nothing added to the registry
    other = tmp_path / "other"
    ok(run_devid("init", data_dir=other))                  # a CA of its own, on SQLite
    stray = tmp_path / "host-d"
    proc = run_devid("init", "--join", url, "--ca-from", other / "ca", data_dir=stray)
    one_line_error(proc, "is not the root of this registry's CA")
    assert not stray.exists()
    # the right root, but another CA's manufacturing certificate and key (a mixed-up copy)
    mixed = tmp_path / "mixed"
    shutil.copytree(hosts.ca_copy, mixed)
    for name in ("manufacturing.cert.pem", "manufacturing.key.pem"):
        shutil.copy2(other / "ca" / name, mixed / name)
    one_line_error(run_devid("init", "--join", url, "--ca-from", mixed, data_dir=stray),
                   "manufacturing.cert.pem is not recorded in the registry")
    assert not stray.exists()
    # a data directory that is already a host is never overwritten
    one_line_error(run_devid("init", "--join", url, "--ca-from", hosts.ca_copy, data_dir=hosts.c),
                   "a CA already exists")
    assert registry_rows(url, CA_ROWS) == rows

    # a registry without a CA: an empty database, and a registry whose schema exists but that no
    # `devid init` made (e.g. one an older devid created): both refused, nothing left behind
    empty = postgres.new_schema("empty")
    one_line_error(run_devid("init", "--join", empty, "--ca-from", hosts.ca_copy, data_dir=stray),
                   "the registry is empty")
    assert not stray.exists()
    open_registry(empty, create=True).close()
    one_line_error(run_devid("init", "--join", empty, "--ca-from", hosts.ca_copy, data_dir=stray),
                   "holds no devid CA", "devid init --registry URL")
    assert not stray.exists()
    assert registry_rows(empty, "SELECT COUNT(*) FROM certificates") == [(0,)]
    # libpq's several-servers form (the first refuses, the second is the registry) is a URL devid takes
    port = url.split("@127.0.0.1:", 1)[1].split("/", 1)[0]
    several = (f"postgresql://devid@/devid_test?host=127.0.0.1,127.0.0.1&port=1,{port}"
               f"&target_session_attrs=read-write&{url.split('?', 1)[1]}")
    shown = json.loads(ok(run_devid("devices", "list", "--registry", several, "--json", data_dir=hosts.c)))
    assert shown["ok"] is True
    # and a second `devid init --registry` on the shared registry makes no second CA
    proc = run_devid("init", "--registry", url, data_dir=tmp_path / "second")
    one_line_error(proc, "already holds a CA", "devid init --join")
    assert not (tmp_path / "second").exists()
    assert registry_rows(url, CA_ROWS) == rows


def test_enroll_on_a_renew_on_b_revoke_on_c(hosts, gateways):
    a, b = gateways
    [bundle] = provision(hosts.a, hosts.factory, "EN", 1)
    serial = bundle.name
    ok(run_devid("enroll", "--gateway", a.uri, "--device", bundle, *FIRMWARE))
    first = x509.load_pem_x509_certificate((bundle / "op-cert.pem").read_bytes())
    out = ok(run_devid("renew", "--gateway", b.uri, "--device", bundle))
    second = x509.load_pem_x509_certificate((bundle / "op-cert.pem").read_bytes())
    assert second.serial_number != first.serial_number and "renewed" in out
    # A issued the first, B the second: both in the one registry, the first superseded
    shown = json.loads(ok(run_devid("devices", "show", serial, "--json", data_dir=hosts.c)))
    assert shown["state"] == "enrolled"
    ops = {int(c["serial"], 16): c["status"] for c in shown["certificates"] if c["profile"] == "operational"}
    assert ops == {first.serial_number: "superseded", second.serial_number: "current"}
    assert [e["event"] for e in log_events(a.log, "enroll") if e["serial"] == serial] == ["enroll"]
    assert [e for e in log_events(b.log) if e.get("serial") == serial and e["logger"] == "devid.enrollment"]

    revoked = json.loads(ok(run_devid("revoke", serial, "--json", data_dir=hosts.c)))
    assert revoked["state"] == "revoked" and revoked["already_revoked"] is False
    assert {int(c["serial"], 16) for c in revoked["newly_revoked"]} >= {first.serial_number, second.serial_number}
    # refused by A and B: renewal (operational identity) and enrollment (factory identity)
    for gw in (a, b):
        one_line_error(run_devid("renew", "--gateway", gw.uri, "--device", bundle, "--timeout", "10"),
                       "renewal failed at step connect", "revoked")
        one_line_error(run_devid("enroll", "--gateway", gw.uri, "--device", bundle, "--timeout", "10", *FIRMWARE),
                       "enrollment failed at step connect", "revoked")
        assert [e for e in log_events(gw.log, "handshake")
                if e["result"] == "refused" and f"device {serial} is revoked" in e["reason"]]
    verify_log_everywhere(hosts.a, hosts.b, hosts.c)


def test_enrollments_through_two_gateways_at_once_make_one_chain(hosts, gateways):
    a, b = gateways
    before = registry_rows(hosts.url, "SELECT COUNT(*) FROM attestation_log")[0][0]
    devs = provision(hosts.a, hosts.factory, "CO", 40)
    gws = {"a": a, "b": b}
    dirs = {"a": subset(devs[:20], hosts.tmp / "co-a"), "b": subset(devs[20:], hosts.tmp / "co-b")}
    # classic through A (nonce, evidence, /sen: server nonces in the shared table), one-request through B
    procs = {name: subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "simulate", "--gateway",
                                     gws[name].uri, "--devices", str(d), "--concurrency", "4", "--json", *FIRMWARE,
                                     *(["--flow", "classic"] if name == "a" else [])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, d in dirs.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout.decode() + stderr.decode()
        report = json.loads(stdout)
        assert report["enrolled"] == 20 and report["errors"] == 0, report
    # the two gateways were issuing at the same time: their enrollment windows overlap
    windows = {}
    for name, gw in gws.items():
        times = [e["time"] for e in log_events(gw.log, "enroll") if e.get("serial", "").startswith("CO")]
        assert len(times) == 20
        windows[name] = (min(times), max(times))
    assert windows["a"][0] < windows["b"][1] and windows["b"][0] < windows["a"][1], windows
    facts = assert_invariants(hosts.url, list(dirs.values()))
    assert facts["held"] == 40 and facts["log_entries"] >= before + 40
    reports = verify_log_everywhere(hosts.a, hosts.b, hosts.c)
    assert reports[0]["entries"] == facts["log_entries"]


# -- nonces and sessions across hosts ----------------------------------------------------------------

async def _ask(ctx, uri: str, code, path: str, **kw):
    return await asyncio.wait_for(ctx.request(aiocoap.Message(code=code, uri=uri + path, **kw)).response, 30)


def _title(response) -> str:
    assert response.opt.content_format == 257, (response.code, response.payload)
    return cbor2.loads(response.payload)[-1]


def test_a_nonce_from_a_is_single_use_on_b(hosts, gateways):
    a, b = gateways
    [bundle] = provision(hosts.a, hosts.factory, "NC", 1)
    device = H.loadgen.load_device(bundle)

    async def scenario():
        ctx_a, _ = await device_context(bundle, "127.0.0.1")
        ctx_b, _ = await device_context(bundle, "127.0.0.1")
        try:
            async def nonce_from_a() -> bytes:
                r = await _ask(ctx_a, a.uri, codes.GET, "/attest/nonce")
                assert r.code == codes.CONTENT, r
                return cbor2.loads(r.payload)["nonce"]

            async def evidence(ctx, gw, token):
                return await _ask(ctx, gw.uri, codes.POST, "/attest/evidence", payload=token, content_format=60)

            def verdict(r) -> dict:
                assert r.code == codes.CHANGED, (r.code, r.payload)
                return cbor2.loads(r.payload)

            token = H.evidence_token(device, await nonce_from_a())
            assert verdict(await evidence(ctx_b, b, token))["acceptable"] is True    # issued by A, used on B
            # replayed on B, then on A: refused (a contraindicated verdict naming the replay)
            for r in (await evidence(ctx_b, b, token), await evidence(ctx_a, a, token)):
                v = verdict(r)
                assert v["acceptable"] is False and v["revoked"] is False, v
                assert [reason["code"] for reason in v["reasons"]] == ["nonce-replayed"], v

            # the same evidence sent to A and B at once: exactly one of them accepts it
            token = H.evidence_token(device, await nonce_from_a())
            raced = [verdict(r) for r in await asyncio.gather(evidence(ctx_a, a, token), evidence(ctx_b, b, token))]
            assert sorted(v["acceptable"] for v in raced) == [False, True], raced
            [lost] = [v for v in raced if not v["acceptable"]]
            assert [reason["code"] for reason in lost["reasons"]] == ["nonce-replayed"], lost
        finally:
            await ctx_a.shutdown()
            await ctx_b.shutdown()
    asyncio.run(scenario())
    # every use is in the one log: two acceptances, three refusals of a replayed nonce
    rows = registry_rows(hosts.url, "SELECT acceptable, reasons FROM attestation_log WHERE device_serial = ? "
                                    "ORDER BY seq", (bundle.name,))
    logged = sorted((bool(r[0]), tuple(reason["code"] for reason in json.loads(r[1]))) for r in rows)
    assert logged == [(False, ("nonce-replayed",))] * 3 + [(True, ())] * 2, rows
    verify_log_everywhere(hosts.a, hosts.b)


def test_revoking_on_a_ends_the_session_on_b(hosts, gateways):
    a, b = gateways
    [bundle] = provision(hosts.a, hosts.factory, "SS", 1)
    serial = bundle.name

    async def scenario():
        ctx, _ = await device_context(bundle, "127.0.0.1")
        try:
            assert (await _ask(ctx, b.uri, codes.GET, "/whoami")).code == codes.CONTENT
            # revoked through A (its CLI, its data directory); B learns it from the registry
            revoked = await asyncio.to_thread(run_devid, "revoke", serial, "--reason", "keyCompromise", "--json",
                                              data_dir=hosts.a)
            assert json.loads(ok(revoked))["state"] == "revoked"

            async def closed_on_b():
                return [e for e in log_events(b.log, "session-closed")
                        if e["serial"] == serial and e["reason"] == "certificate or device revoked"]
            # B's revocation sweep runs every 5 s (GatewayConfig.revocation_check_interval)
            await await_for(closed_on_b, "B to end the revoked device's session", 30)

            async def refused_now() -> bool:
                try:
                    r = await _ask(ctx, b.uri, codes.GET, "/whoami")
                except Exception:        # the session is closed, and a new handshake is refused
                    return True
                return r.code != codes.CONTENT
            await await_for(refused_now, "the revoked device to be refused on B", 30)
        finally:
            await ctx.shutdown()
    asyncio.run(scenario())
    assert not [e for e in log_events(a.log, "session-closed") if e.get("serial") == serial]   # it never was on A


# -- kill -9 of one gateway --------------------------------------------------------------------------

def test_kill_9_of_a_gateway_during_simulate_violates_no_invariant(hosts, gateways):
    a, _ = gateways
    devs = provision(hosts.a, hosts.factory, "KL", 44)
    to_a, to_c = subset(devs[:20], hosts.tmp / "kl-a"), subset(devs[20:], hosts.tmp / "kl-c")
    c = H.serve(hosts.c, hosts.tmp / "host-c.log")
    try:
        # against C: a short step timeout, so that the devices left when it dies fail fast
        sims = {name: subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "simulate", "--gateway", gw.uri,
                                        "--devices", str(d), "--concurrency", "8", "--timeout", timeout, "--json",
                                        *FIRMWARE], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for name, gw, d, timeout in (("a", a, to_a, "30"), ("c", c, to_c, "3"))}
        wait_for(lambda: len([e for e in log_events(c.log, "enroll") if e.get("result") == "issued"]) >= 3,
                 "C to issue a few certificates", 120)
        assert sims["c"].poll() is None, "the simulation against C ended before C was killed"
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait(30)
        reports = {}
        for name, proc in sims.items():
            stdout, stderr = proc.communicate(timeout=300)
            assert "Traceback" not in stderr.decode()
            reports[name] = (proc.returncode, json.loads(stdout))
        assert reports["a"][0] == 0 and reports["a"][1]["enrolled"] == 20, reports["a"]
        code, report = reports["c"]
        assert code == 1 and report["errors"] > 0, report
        assert_invariants(hosts.url, [to_a, to_c])
        verify_log_everywhere(hosts.a, hosts.b, hosts.c)
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
    # C again: the devices it failed enroll (a retry is safe), and still nothing is violated
    failed = [d for d in to_c.iterdir() if not (d / "op-cert.pem").exists()]
    assert failed
    retry = subset(failed, hosts.tmp / "kl-retry")
    c = H.serve(hosts.c, hosts.tmp / "host-c-again.log")
    try:
        report = json.loads(ok(run_devid("simulate", "--gateway", c.uri, "--devices", retry, "--json",
                                         *FIRMWARE)))
        assert report["enrolled"] == len(failed), report
    finally:
        assert c.stop() == 0
    for d in failed:                        # the retried bundles' certificates, back where they belong
        shutil.copytree(retry / d.name, d, dirs_exist_ok=True)
    facts = assert_invariants(hosts.url, [to_a, to_c])
    assert facts["held"] == 44
    states = registry_rows(hosts.url, "SELECT state, COUNT(*) FROM devices WHERE serial LIKE 'KL%' GROUP BY state")
    assert states == [("enrolled", 44)]
    verify_log_everywhere(hosts.a, hosts.b, hosts.c)


# -- the registry's password -------------------------------------------------------------------------

PASSWORD = "Pw-" + os.urandom(9).hex()          # distinctive: found wherever it leaks


@pytest.fixture
def secured(tmp_path):
    """A cluster of its own whose TCP connections need PASSWORD, and a 0600 file holding it."""
    cluster = PostgresCluster(password=PASSWORD)
    try:
        cluster.start()
        secret = tmp_path / "secret" / "registry.password"
        secret.parent.mkdir()
        secret.write_text(PASSWORD + "\n")
        secret.chmod(0o600)
        yield cluster, secret
    finally:
        cluster.stop()


class Transcript:
    """Every command's output, kept to be searched for the password."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, bytes]] = []

    def run(self, *args, **kw):
        proc = run_devid(*args, **kw)
        self.texts.append((" ".join(map(str, args)), proc.stdout + proc.stderr))
        return proc

    def json(self, *args, **kw) -> dict:
        return json.loads(ok(self.run(*args, "--json", **kw)))

    def assert_secret_kept(self, *places: Path) -> int:
        """No command output and no file under `places` holds the password; the number searched."""
        searched = 0
        for what, text in self.texts:
            assert PASSWORD.encode() not in text, f"the password is in the output of devid {what}"
            searched += 1
        for place in places:
            for path in [place] if place.is_file() else place.rglob("*"):
                if path.is_file():
                    assert PASSWORD.encode() not in path.read_bytes(), f"the password is in {path}"
                    searched += 1
        return searched


def test_the_registry_password_never_appears_in_output_logs_or_files(secured, tmp_path):
    cluster, secret = secured
    url = cluster.new_schema("pw", with_password=False)
    inline = url.replace("devid@", f"devid:{PASSWORD}@", 1)         # the same registry, the password in the URL
    assert PASSWORD in inline and PASSWORD not in url
    a, b, d, factory = tmp_path / "a", tmp_path / "b", tmp_path / "d", tmp_path / "factory"
    t = Transcript()

    # without the password: refused in one line, nothing made
    one_line_error(t.run("init", "--registry", url, data_dir=a), "cannot connect to the registry")
    assert not a.exists()
    # a password in the URL is no password for devid.toml; a password file others may read is refused
    one_line_error(t.run("init", "--registry", inline, data_dir=a), "must not hold a password", ":***@")
    open_file = tmp_path / "open.password"
    open_file.write_text(PASSWORD)
    open_file.chmod(0o644)
    one_line_error(t.run("init", "--registry", url, "--registry-password-file", open_file, data_dir=a))
    assert not a.exists()

    made = t.json("init", "--registry", url, "--registry-password-file", secret, data_dir=a)
    assert made["registry"] == url
    assert tomllib.loads((a / "devid.toml").read_text())["registry"] == {"url": url, "password_file": str(secret)}
    ca_copy = tmp_path / "ca-of-a"
    shutil.copytree(a / "ca", ca_copy)
    t.json("init", "--join", url, "--ca-from", ca_copy, "--registry-password-file", secret, data_dir=b)
    assert tomllib.loads((b / "devid.toml").read_text())["registry"] == {"url": url, "password_file": str(secret)}
    # libpq's environment instead of a file: devid.toml then names no password file at all
    t.json("init", "--join", url, "--ca-from", ca_copy, data_dir=d, env={"PGPASSWORD": PASSWORD})
    assert tomllib.loads((d / "devid.toml").read_text())["registry"] == {"url": url}
    one_line_error(t.run("devices", "list", data_dir=d), "cannot connect to the registry")
    assert t.json("devices", "list", data_dir=d, env={"PGPASSWORD": PASSWORD})["devices"] == []

    for host in (a, b):
        (host / POLICY_FILE).write_text(H.bench_common.bench_policy())
    t.json("provision", "--count", 2, "--device-type", DEVICE_TYPE, "--out", factory, "--serial-prefix", "PW",
           data_dir=a)
    bundle = factory / "PW00000001"
    gws = [H.serve(host, tmp_path / f"{host.name}.log") for host in (a, b)]
    try:
        t.json("enroll", "--gateway", gws[0].uri, "--device", bundle, *FIRMWARE)
        t.json("renew", "--gateway", gws[1].uri, "--device", bundle)
        t.json("simulate", "--gateway", gws[1].uri, "--devices", subset([factory / "PW00000002"], tmp_path / "sim"),
               *FIRMWARE)
        shown = t.json("devices", "show", "PW00000001", data_dir=b)
        assert shown["state"] == "enrolled"
        assert t.json("revoke", "PW00000001", data_dir=b)["state"] == "revoked"
    finally:
        for gw in gws:
            assert gw.stop() == 0
    assert len(t.json("devices", "list", data_dir=a)["devices"]) == 2
    assert t.json("attest", "verify-log", data_dir=a)["problems"] == []
    assert t.json("attest", "log", data_dir=b)["ok"] is True
    # the password in the URL (--registry, $DEVID_REGISTRY) works, and is shown as *** when named
    listed = t.json("devices", "list", "--registry", inline, data_dir=d)
    assert len(listed["devices"]) == 2
    wrong = inline.replace(PASSWORD, PASSWORD[::-1])
    err = one_line_error(t.run("devices", "list", "--registry", wrong, data_dir=d), "cannot connect to the registry")
    assert PASSWORD[::-1] not in err and ":***@" in err
    one_line_error(t.run("devices", "list", data_dir=d, env={"DEVID_REGISTRY": wrong}), ":***@")
    assert all(PASSWORD[::-1].encode() not in text for _, text in t.texts)
    searched = t.assert_secret_kept(a, b, d, factory, *(gw.log for gw in gws))
    assert searched > 40
    assert "Traceback" not in "".join(gw.log.read_text() for gw in gws)


# -- the database goes away under a running gateway ----------------------------------------------------

def test_a_database_outage_is_5_03_with_one_log_line_and_the_gateway_recovers(secured, tmp_path):
    cluster, secret = secured
    url = cluster.new_schema("down", with_password=False)
    data = tmp_path / "data"
    ok(run_devid("init", "--registry", url, "--registry-password-file", secret, data_dir=data))
    (data / POLICY_FILE).write_text(H.bench_common.bench_policy())
    with open(data / "devid.toml", "a") as f:       # the device polls for the registry's return with nonces
        f.write("\n[budgets]\nnonce = { burst = 10000, interval = 60 }\n")
    bundles = provision(data, tmp_path / "factory", "DN", 2)
    served = H.serve(data, tmp_path / "serve.log")

    def storage_lines() -> list[dict]:
        return [e for e in log_events(served.log, "storage") if e["logger"] == "devid.gateway"]

    try:
        async def scenario():
            ctx, _ = await device_context(bundles[0], "127.0.0.1")
            try:
                assert (await _ask(ctx, served.uri, codes.GET, "/attest/nonce")).code == codes.CONTENT
                await asyncio.to_thread(cluster.stop_server)
                refused = [await _ask(ctx, served.uri, codes.GET, "/attest/nonce") for _ in range(4)]
                for r in refused:
                    assert r.code == codes.SERVICE_UNAVAILABLE, (r.code, r.payload)
                    assert _title(r) == "storage unavailable, try again later" and r.opt.max_age == 60
                # what needs no registry is still answered in the open session
                assert (await _ask(ctx, served.uri, codes.GET, "/whoami")).code == codes.CONTENT
                assert (await _ask(ctx, served.uri, codes.GET, "/.well-known/est/crts")).code == codes.CONTENT
                lines = storage_lines()
                assert len(lines) == 1, lines            # one line for the burst, not one per request
                assert lines[0]["result"] == "unavailable" and lines[0]["path"] == url
                await asyncio.to_thread(cluster.start_server)

                async def served_again():
                    r = await _ask(ctx, served.uri, codes.GET, "/attest/nonce")
                    return r.code == codes.CONTENT
                # the pool's connections to the old server fail once each, then new ones work
                await await_for(served_again, "the gateway to use the registry again", 60)
            finally:
                await ctx.shutdown()
        asyncio.run(scenario())
        # a whole enrollment works again, without a restart of the gateway
        ok(run_devid("enroll", "--gateway", served.uri, "--device", bundles[1], *FIRMWARE))
        assert [line["result"] for line in storage_lines()] == ["unavailable", "recovered"]
    finally:
        assert served.stop() == 0
    text = served.log.read_text()
    assert "Traceback" not in text and PASSWORD not in text


def test_registry_calls_fail_at_once_while_the_server_is_down(secured):
    """The gateway calls the registry from its event loop: with the server gone, a call must fail
    (StorageError "unavailable", 5.03 for a device) rather than wait for the pool's timeout,
    here ten minutes, which would freeze every session of the gateway meanwhile."""
    import threading
    from devid.gateway.store.engines import PostgresRegistry
    from devid.gateway.store.storage import FAILED, StorageError
    cluster, _ = secured
    reg = PostgresRegistry(cluster.new_schema("probe"), create=True, timeout=600)
    try:
        assert reg.get_device("X") is None
        cluster.stop_server()
        errors: list = []

        def calls():
            for _ in range(20):
                try:
                    reg.get_device("X")
                except StorageError as exc:
                    errors.append(exc)
        worker = threading.Thread(target=calls, daemon=True)
        worker.start()
        worker.join(60)                     # a deadline, not a measurement: without the fix it is 600 s each
        assert not worker.is_alive(), "a registry call waited for the pool while the server was down"
        assert len(errors) == 20 and {e.kind for e in errors} == {FAILED}
        assert all("unavailable" in str(e) and PASSWORD not in str(e) for e in errors)
        cluster.start_server()

        def works():
            try:
                return reg.get_device("X") is None
            except StorageError:
                return False
        wait_for(works, "the registry to work again after the server's return", 60)
        reg.reserve_serial_block("PB", 1)             # and writes too
        # a short outage: the call after the server's return probes it, and works
        cluster.stop_server()
        with pytest.raises(StorageError):
            reg.reserve_serial_block("PB", 1)
        cluster.start_server()
        assert reg.reserve_serial_block("PB", 1) == 2         # (the refused call reserved nothing)
    finally:
        reg.close()
