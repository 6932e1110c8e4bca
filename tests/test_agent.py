"""`devid agent` (issue 17 item 5) against the real gateway (`devid serve`) on loopback, over real
DTLS, as a device runs it (a subprocess):

- the type's certificate validity and renewal threshold come from the attestation policy: the
  issued certificate has the type's validity, the configuration tells the device its threshold;
- `--once` renews a device inside its threshold and leaves one outside it alone;
- the agent keeps its old identity (byte for byte, still a matching key and certificate) when the
  gateway refuses (a revoked device) or vanishes mid-renewal (a relay that passes the DTLS
  handshake and drops everything from the first application-data record on);
- while the gateway is away the agent retries with a doubling backoff ceiling (read from its log
  lines, not from timing), renews once the gateway is back on its port, and stops on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta

import pytest

from devid.ca.identity import format_serial
from devid.gateway.app.server import POLICY_FILE

from .agent_helpers import Relay, agent, certificate, enrolled_gateway, events, files, policy, validity, wait_for
from .conftest import ok, one_line_error, run_devid
from .serve_helpers import ROOT, serve


@pytest.fixture
def enrolled(data, bundles, tmp_path):
    with enrolled_gateway(data, bundles, tmp_path) as gateway:
        yield gateway


def test_once_renews_inside_the_threshold_and_leaves_a_device_outside_it_alone(enrolled):
    data, out, served = enrolled
    due, fresh = out / "SN00000001", out / "SN00000002"
    # the policy's validity and threshold for the type: in the certificate and the configuration
    first = certificate(due)
    assert validity(first) - timedelta(days=40) <= timedelta(minutes=2)
    assert json.loads((due / "config.json").read_text())["renewal"]["window_days"] == 12

    before = files(fresh)
    doc = json.loads(ok(agent(served.uri, fresh, "--once", "--json")))
    assert doc == {"ok": True, "renewed": False, "certificate_serial": format_serial(certificate(fresh).serial_number),
                   "not_after": doc["not_after"], "threshold_days": 12, "threshold_source": "configuration",
                   "path": None}
    assert files(fresh) == before                     # 40 days left, 12 to go: not due, nothing touched

    # 41 days is more than the certificate has left: due; renewed with a fresh key, same validity
    doc = json.loads(ok(agent(served.uri, due, "--once", "--json", "--renew-before", "41d")))
    assert doc["renewed"] is True and doc["threshold_source"] == "flag" and doc["threshold_days"] == 41 and doc["path"] == "renew"
    second = certificate(due)
    assert second.serial_number != first.serial_number and second.public_key() != first.public_key()
    assert doc["certificate_serial"] == format_serial(second.serial_number)
    assert validity(second) - timedelta(days=40) <= timedelta(minutes=2)
    assert not (due / "op-next.pem").exists()
    reg = data.open_registry()
    try:
        status = {c.serial: c.status.value for c in reg.certificates_for_device("SN00000001")
                  if c.profile == "operational"}
    finally:
        reg.close()
    assert status == {first.serial_number: "superseded", second.serial_number: "current"}, status
    # the new identity works: a plain check finds it not due under the configuration's threshold
    assert "OK: not due; operational certificate" in ok(agent(served.uri, due, "--once"))


def test_the_old_identity_is_kept_when_the_gateway_refuses_or_vanishes_mid_renewal(enrolled):
    data, out, served = enrolled
    vanishing, revoked = out / "SN00000002", out / "SN00000003"

    before = files(vanishing)
    relay = Relay(served.port)
    try:
        proc = agent(f"coaps://127.0.0.1:{relay.port}", vanishing, "--once", "--renew-before", "41d",
                     "--timeout", "3")
        assert relay.cut.is_set() and relay.handshake_records > 0     # the handshake passed, the request did not
    finally:
        relay.close()
    one_line_error(proc, "renewal failed at step renew: no answer from the gateway within 3 s",
                   "(the current identity is kept)")
    assert files(vanishing) == before and not (vanishing / "op-next.pem").exists()
    # still usable: the gateway never saw the request, so the same identity renews directly
    old = certificate(vanishing)
    doc = json.loads(ok(agent(served.uri, vanishing, "--once", "--json", "--renew-before", "41d")))
    assert doc["renewed"] is True and certificate(vanishing).serial_number != old.serial_number

    ok(run_devid("revoke", "SN00000003", "--reason", "keyCompromise", data_dir=data.path))
    before = files(revoked)
    proc = agent(served.uri, revoked, "--once", "--renew-before", "41d", "--json")
    err = one_line_error(proc, "renewal failed at step connect", "revoked", "(the current identity is kept)")
    assert json.loads(proc.stdout)["ok"] is False, err
    assert files(revoked) == before
    certificate(revoked)                       # the files still hold a matching key and certificate


def test_backoff_while_the_gateway_is_away_then_renewal_then_sigterm(enrolled, tmp_path):
    data, out, served = enrolled
    bundle = out / "SN00000001"
    port = served.port
    assert served.stop() == 0                  # the gateway goes away
    before = files(bundle)
    # when it is back, its policy gives the type 60-day certificates: the renewed one is not due
    (data.path / POLICY_FILE).write_text(policy(60, 12))
    log = tmp_path / "agent.log"
    e = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "agent", "--gateway",
                             f"coaps://127.0.0.1:{port}", "--device", str(bundle), "--renew-before", "41d",
                             "--timeout", "1", "--retry-initial", "0.2", "--retry-max", "0.8", "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT)
    back = None
    try:
        failed = wait_for(lambda: len(events(log, "agent-renew-failed")) >= 4 and events(log, "agent-renew-failed"),
                          "four failed renewals")
        assert [f["attempt"] for f in failed[:4]] == [1, 2, 3, 4]
        assert [f["backoff_ceiling"] for f in failed[:4]] == [0.2, 0.4, 0.8, 0.8]      # doubling, capped
        assert all(0 <= f["retry_in"] <= f["backoff_ceiling"] and f["step"] == "connect" for f in failed)
        assert files(bundle) == before
        start = events(log, "agent-start")[0]
        assert start["threshold_days"] == 41 and start["threshold_source"] == "flag"

        back = serve(data.path, tmp_path / "serve-again.log", port=port)          # the gateway is back
        renewed = wait_for(lambda: events(log, "agent-renewed"), "the renewal")[0]
        new = certificate(bundle)
        assert renewed["certificate_serial"] == format_serial(new.serial_number)
        assert validity(new) - timedelta(days=60) <= timedelta(minutes=2)
        # not due any more: the agent sleeps until its next check
        sleep = wait_for(lambda: [s for s in events(log, "agent-sleep") if s["seconds"] > 1], "a long sleep")[0]
        assert sleep["seconds"] <= 3600 * 1.1
        assert events(log, "agent-check")[-1]["result"] == "not-due"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert events(log, "agent-stop")[-1]["renewed"] is True
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if back is not None:
            assert back.stop() == 0


def test_a_crash_at_any_point_of_the_install_leaves_a_usable_identity(enrolled, tmp_path):
    """The on-disk states a crash can leave during `install` (journal written, then 0 to 3 of the
    files replaced), and a torn journal: the agent's recovery leaves one whole identity each time."""
    data, out, served = enrolled
    bundle = out / "SN00000002"
    old = files(bundle)
    ok(agent(served.uri, bundle, "--once", "--renew-before", "41d"))
    new = files(bundle)
    new_key, new_chain = new["op-key.pem"], new["op-chain.pem"]
    assert new_key != old["op-key.pem"]
    names = ("op-key.pem", "op-cert.pem", "op-chain.pem")
    for replaced in range(4):
        state = tmp_path / f"crash-{replaced}"
        state.mkdir()
        for f in bundle.iterdir():
            if f.is_file() and f.name not in names:
                (state / f.name).write_bytes(f.read_bytes())
        for n, name in enumerate(names):
            (state / name).write_bytes((new if n < replaced else old)[name])
        (state / "op-next.pem").write_bytes(new_key + new_chain)
        proc = agent(served.uri, state, "--once", "--json", "--log", tmp_path / f"crash-{replaced}.log")
        assert json.loads(ok(proc))["renewed"] is False
        assert {n: (state / n).read_bytes() for n in names} == {n: new[n] for n in names}, replaced
        assert not (state / "op-next.pem").exists()
        certificate(state)
        assert events(tmp_path / f"crash-{replaced}.log", "agent-recovered")[0]["result"] == "completed"
    # a journal torn before it was complete (not a whole identity): removed, the old identity stays
    state = tmp_path / "torn"
    state.mkdir()
    for f in bundle.iterdir():
        if f.is_file():
            (state / f.name).write_bytes(f.read_bytes())
    for name in names:
        (state / name).write_bytes(old[name])
    (state / "op-next.pem").write_bytes((new_key + new_chain)[:len(new_key) + 100])
    ok(agent(served.uri, state, "--once", "--log", tmp_path / "torn.log"))
    assert {n: (state / n).read_bytes() for n in names} == {n: old[n] for n in names}
    assert not (state / "op-next.pem").exists()
    assert events(tmp_path / "torn.log", "agent-recovered")[0]["result"] == "discarded"
