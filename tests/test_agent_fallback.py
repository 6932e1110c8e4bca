"""`devid agent` when /sren cannot help, against the real gateway (`devid serve`) on loopback over
real DTLS, the agent as a subprocess:

- a renewal the gateway committed but whose answer was lost (a relay that passes everything the
  device sends and drops the gateway's answers) leaves the device with a superseded certificate
  the gateway refuses at the handshake: the next run falls back to the attested enrollment with
  the factory identity and recovers; a revoked device stops the agent, which does not retry;
- `--attest` renews through the attested path (a new verdict in the attestation log), and a policy
  that forbids re-enrollment refuses it with one clear line, the identity kept;
- a certificate due the moment it is issued (a threshold longer than its validity) is not renewed
  again at each `--max-sleep`: the agent holds it until half its remaining validity has passed.

A certificate the gateway refuses as expired (`certificate_expired`) is not tested end to end: the
shortest validity a policy can give is one day and the gateway reads the system clock, so it
would need a faked clock. The device-side branch (a certificate expired by the device's clock is
not presented; the agent goes straight to the attested path) is tested with the agent's own clock
set ahead, in process, against the real gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from devid.ca.identity import format_serial
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.agent import AgentSettings, run
from devid.gateway.store.attestation_store import AttestationStore

from .conftest import ok, one_line_error, run_devid
from .gateway_helpers import FW
from .serve_helpers import ROOT
from .agent_helpers import Relay, agent, certificate, enrolled_gateway, events, files, policy, wait_for


@pytest.fixture
def enrolled(data, bundles, tmp_path):
    with enrolled_gateway(data, bundles, tmp_path) as gateway:
        yield gateway


def operational_status(data, serial: str) -> dict[int, str]:
    reg = data.open_registry()
    try:
        return {c.serial: c.status.value for c in reg.certificates_for_device(serial) if c.profile == "operational"}
    finally:
        reg.close()


def verdicts(data, serial: str) -> list:
    reg = data.open_registry()
    try:
        return AttestationStore(reg).log_entries(device_serial=serial)
    finally:
        reg.close()


def claim_firmware(bundle: Path) -> None:
    """What the device knows about its own firmware: what the attested path's evidence claims."""
    (bundle / "firmware.json").write_text(json.dumps({"name": FW.name, "version": FW.version,
                                                      "digest": f"sha-256:{FW.digest.hex()}"}))


class LostAnswer(Relay):
    """Passes everything the device sends; from its first application-data record on (the
    renewal request) drops what the gateway sends back: the gateway commits, the device never
    hears of it."""

    cut_requests = False


def spawn(uri: str, bundle: Path, log: Path, *extra) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    return subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "agent", "--gateway", uri, "--device",
                             str(bundle), "--timeout", "5", "--log", str(log), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT)


def test_a_lost_renewal_answer_is_recovered_through_the_factory_identity_and_revocation_stops(enrolled, tmp_path):
    data, out, served = enrolled
    bundle = out / "SN00000001"
    claim_firmware(bundle)
    old = certificate(bundle)
    before = files(bundle)
    relay = LostAnswer(served.port)
    try:
        proc = agent(f"coaps://127.0.0.1:{relay.port}", bundle, "--once", "--renew-before", "41d", "--timeout", "3")
        assert relay.cut.is_set()
    finally:
        relay.close()
    one_line_error(proc, "renewal failed at step renew: no answer from the gateway within 3 s")
    assert files(bundle) == before
    # the gateway committed: the certificate the device holds is superseded (no grace by default)
    status = operational_status(data, "SN00000001")
    assert status[old.serial_number] == "superseded" and list(status.values()).count("current") == 1
    seen = len(verdicts(data, "SN00000001"))

    log = tmp_path / "fallback.log"
    doc = json.loads(ok(agent(served.uri, bundle, "--once", "--json", "--renew-before", "41d", "--log", log)))
    assert doc["renewed"] is True and doc["path"] == "attested"
    new = certificate(bundle)
    assert doc["certificate_serial"] == format_serial(new.serial_number)
    assert operational_status(data, "SN00000001")[new.serial_number] == "current"
    fallback = events(log, "agent-fallback")
    assert len(fallback) == 1 and fallback[0]["cause"] == "refused" and "bad certificate" in fallback[0]["reason"]
    renewed = events(log, "agent-renewed")[0]
    assert renewed["path"] == "attested" and renewed["verdict"] == "affirming"
    assert renewed["previous"] == format_serial(old.serial_number)
    assert len(verdicts(data, "SN00000001")) > seen            # the gateway appraised fresh evidence
    assert "OK: not due" in ok(agent(served.uri, bundle, "--once"))    # the new identity is whole

    # a revoked device: the agent (not --once) says so and stops, without retrying
    ok(run_devid("revoke", "SN00000001", "--reason", "keyCompromise", data_dir=data.path))
    before = files(bundle)
    log = tmp_path / "revoked.log"
    proc = spawn(served.uri, bundle, log, "--renew-before", "41d", "--retry-initial", "0.1")
    try:
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "revoked" in err.strip().splitlines()[-1]
    assert events(log, "agent-revoked")[0]["step"] == "connect"
    assert not events(log, "agent-renew-failed") and not events(log, "agent-fallback")
    assert files(bundle) == before


def test_attest_renews_with_fresh_evidence_unless_the_policy_forbids_reenrollment(enrolled, tmp_path):
    data, out, served = enrolled
    bundle = out / "SN00000002"
    one_line_error(agent(served.uri, bundle, "--once", "--attest"), "--attest: no firmware.json in")
    claim_firmware(bundle)
    old = certificate(bundle)
    seen = verdicts(data, "SN00000002")
    log = tmp_path / "attest.log"
    doc = json.loads(ok(agent(served.uri, bundle, "--once", "--attest", "--json", "--renew-before", "41d",
                              "--log", log)))
    assert doc["renewed"] is True and doc["path"] == "attested"
    new = certificate(bundle)
    assert new.serial_number != old.serial_number and new.public_key() != old.public_key()
    after = verdicts(data, "SN00000002")
    assert len(after) > len(seen) and after[-1].seq > max(e.seq for e in seen)
    assert events(log, "agent-renewed")[0]["verdict"] == "affirming" and not events(log, "agent-fallback")
    assert operational_status(data, "SN00000002") == {old.serial_number: "superseded", new.serial_number: "current"}

    # the policy forbids re-enrollment: one clear line, nothing changed; /sren still works
    (data.path / POLICY_FILE).write_text(policy(40, 12).replace("renewal_threshold_days = 12",
                                                                "renewal_threshold_days = 12\nreenroll = false"))
    os.kill(served.proc.pid, signal.SIGHUP)
    wait_for(lambda: served.log.read_text().count('"reloaded"') >= 1, "the policy reload")
    before = files(bundle)
    one_line_error(agent(served.uri, bundle, "--once", "--attest", "--renew-before", "41d"),
                   "renewal failed at step enroll", "re-enrollment not allowed", "(the current identity is kept)")
    assert files(bundle) == before
    assert json.loads(ok(agent(served.uri, bundle, "--once", "--json", "--renew-before", "41d")))["path"] == "renew"


def test_a_certificate_due_when_issued_is_held_until_half_its_validity(enrolled, tmp_path, caplog):
    data, out, served = enrolled
    bundle = out / "SN00000003"
    log = tmp_path / "agent.log"
    proc = spawn(served.uri, bundle, log, "--renew-before", "41d", "--max-sleep", "0.2")
    try:
        held = wait_for(lambda: len(events(log, "agent-check")) >= 5 and events(log, "agent-check"), "five checks")
        renewed = events(log, "agent-renewed")
        assert len(renewed) == 1, renewed                       # renewed once, not at every --max-sleep
        assert [c["result"] for c in held[:2]] == ["due", "due-after-renewal"]
        assert all(c["result"] == "due-after-renewal" for c in held[1:])
        cert = certificate(bundle)
        renew_at = datetime.fromisoformat(held[1]["renew_at"].replace("Z", "+00:00"))
        half = datetime.now(timezone.utc) + (cert.not_valid_after_utc - datetime.now(timezone.utc)) / 2
        assert abs(renew_at - half) < timedelta(hours=1)        # about 20 of the 40 days from now
        sleeps = events(log, "agent-sleep")
        assert sleeps and all(0.2 <= s["seconds"] <= 0.22 for s in sleeps)   # --max-sleep plus up to 10 %
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # a certificate expired by the device's own clock (here the run's clock, 41 days ahead: the
    # gateway's cannot be moved) is not presented: the agent goes straight to the attested path
    claim_firmware(bundle)
    old = certificate(bundle)
    ahead = lambda: datetime.now(timezone.utc) + timedelta(days=41)      # noqa: E731
    with caplog.at_level(logging.INFO, logger="devid.agent"):
        outcome = asyncio.run(run(AgentSettings(served.uri, bundle, once=True, timeout=5), clock=ahead))
    assert outcome.renewed and outcome.path == "attested"
    assert certificate(bundle).serial_number == outcome.certificate.serial_number != old.serial_number
    fallback = [r for r in caplog.records if r.getMessage() == "agent-fallback"]
    assert [r.cause for r in fallback] == ["expired"]
    assert operational_status(data, "SN00000003")[outcome.certificate.serial_number] == "current"
