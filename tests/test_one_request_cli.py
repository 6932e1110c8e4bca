"""The one-request enrollment as the field engineer, the simulator and the load generator run it:
real processes (`devid enroll`, `scripts/enroll`, `devid simulate`, `devid renew`,
benchmarks/loadgen.py, `devid bench`) against the real gateway (`devid serve`) on loopback.

That the configuration came in the /sen answer, and no GET /config was sent, is read from the
gateway's own accounting: the gateway runs with a budget of one GET /config per device
(devid.toml `budgets.config`), which the multipart answer does not spend. After a one-request
enrollment the device's `devid fetch-config` still gets its one GET /config (and a second one
gets 4.29); after a classic one, the first `fetch-config` is already refused. The handshakes and
the gateway's decisions are read from its log lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devid.ca.store import DeviceState

from .conftest import ok, one_line_error, run_devid
from .gateway_helpers import FW
from .serve_helpers import fleet, serve, serving

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]


@pytest.fixture
def gateway(world, tmp_path):
    """`devid serve` (one worker: one budget table) allowing each device one GET /config a day."""
    data, out = world
    with open(data.path / "devid.toml", "a") as f:
        f.write("\n[budgets]\nconfig = {burst = 1, interval = 86400}\n")
    with serving(data.path, tmp_path / "serve.log") as served:
        yield data, out, served


def log_lines(served, serial: str) -> list[dict]:
    lines = [json.loads(line) for line in served.log.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("serial") == serial]


def decisions(served, serial: str) -> list[tuple[str, str]]:
    return [(line["event"], line["result"]) for line in log_lines(served, serial)
            if line["logger"] == "devid.enrollment"]


def handshakes(served, serial: str) -> int:
    return sum(1 for line in log_lines(served, serial) if line["event"] == "handshake" and line["result"] == "ok")


def fetch_config(served, bundle: Path):
    return run_devid("fetch-config", "--gateway", served.uri, "--device", bundle, "--timeout", "10")


def test_devid_enroll_runs_one_request_in_one_handshake_and_needs_no_get_config(gateway):
    data, out, served = gateway
    bundle = out / "TS00000001"
    text = ok(run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--timeout", "10", *FIRMWARE))
    lines = text.splitlines()
    assert lines[0] == "[1/4] nonce     the session's own (32 bytes, its DTLS exporter value), no request"
    assert lines[1] == "[2/4] evidence  verdict affirming (no findings)"
    assert lines[2].startswith("[3/4] enroll    operational certificate ")
    assert lines[3] == "[4/4] config    configuration for temperature-sensor (2 trust anchors)"
    assert lines[4].startswith("OK: device TS00000001 holds operational certificate ") and len(lines) == 5
    for name in ("op-key.pem", "op-cert.pem", "op-chain.pem", "config.cbor", "config.json"):
        assert (bundle / name).stat().st_size > 0
    # one handshake; the evidence came in the CSR with the session's nonce; no nonce was asked for
    assert handshakes(served, "TS00000001") == 1
    assert decisions(served, "TS00000001") == [("evidence", "affirming"), ("enroll", "issued")]
    # the configuration rode in the enroll answer: said on the enroll line, no config line of its own
    assert [line.get("config") for line in log_lines(served, "TS00000001") if line["event"] == "enroll"] == [True]
    (evidence,) = [line for line in log_lines(served, "TS00000001") if line["event"] == "evidence"]
    assert (evidence["via"], evidence["nonce"]) == ("csr", "session")
    # the device's one GET /config of the day is still there: the enrollment sent none
    stored = (bundle / "config.cbor").read_bytes()
    text = ok(fetch_config(served, bundle))
    # asked with the ETag of the config.cbor the answer gave: 2.03 Valid, the same configuration
    assert text.startswith("OK: configuration for temperature-sensor") and text.rstrip().endswith("(unchanged)")
    assert (bundle / "config.cbor").read_bytes() == stored
    one_line_error(fetch_config(served, bundle), "fetching the configuration failed at step config: 4.29 ")

    # the classic flow, for comparison: its GET /config spends that one request
    classic = out / "TS00000002"
    doc = json.loads(ok(run_devid("enroll", "--gateway", served.uri, "--device", classic, "--json", "--flow",
                                  "classic", *FIRMWARE)))
    assert (doc["flow"], doc["nonce"], doc["verdict"]) == ("classic", "server", "affirming")
    assert list(doc["steps_ms"]) == ["connect", "nonce", "evidence", "enroll", "config"]
    assert decisions(served, "TS00000002") == [("nonce", "issued"), ("evidence", "affirming"), ("enroll", "issued"),
                                               ("config", "served")]
    one_line_error(fetch_config(served, classic), "fetching the configuration failed at step config: 4.29 ")


def test_the_json_output_and_scripts_enroll_say_which_flow_ran(gateway):
    data, out, served = gateway
    doc = json.loads(ok(run_devid("enroll", "--gateway", served.uri, "--device", out / "TS00000003", "--json",
                                  *FIRMWARE)))
    assert (doc["ok"], doc["flow"], doc["nonce"], doc["verdict"], doc["serial"]) == \
        (True, "one-request", "session", "affirming", "TS00000003")
    assert list(doc["steps_ms"]) == ["connect", "enroll", "evidence", "config"]
    # a waived device type: no evidence, no nonce, no verdict
    doc = json.loads(ok(run_devid("enroll", "--gateway", served.uri, "--device", out / "LG00000001", "--json")))
    assert (doc["flow"], doc["nonce"], doc["verdict"]) == ("one-request", None, None)
    assert list(doc["steps_ms"]) == ["connect", "enroll", "config"]
    # the field engineer's script is `devid enroll`: the one-request flow by default
    proc = subprocess.run([str(ROOT / "scripts" / "enroll"), "--gateway", served.uri, "--device",
                           str(out / "TS00000004"), "--json", *FIRMWARE], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["flow"] == "one-request"
    assert decisions(served, "TS00000004")[0] == ("evidence", "affirming")
    # a refusal names the flow and the step: evidence the policy refuses, in the CSR
    proc = run_devid("enroll", "--gateway", served.uri, "--device", out / "MT00000001", "--json",
                     "--firmware-digest", "ab" * 32, "--firmware-name", FW.name, "--firmware-version", FW.version)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and (doc["ok"], doc["flow"], doc["step"]) == (False, "one-request", "evidence")
    assert doc["reason"].startswith("verdict contraindicated: firmware-unknown")
    # an unknown flow is a usage error
    proc = run_devid("enroll", "--gateway", served.uri, "--device", out / "TS00000004", "--flow", "two-requests")
    assert proc.returncode == 2 and "invalid choice: 'two-requests'" in proc.stderr.decode()


def test_a_configuration_the_gateway_cannot_serve_stores_nothing(gateway):
    """The configuration rides in the /sen answer: a template the gateway cannot serve fails the
    one request, at step `enroll`, and the device keeps nothing (it is not enrolled by its own
    account; the classic flow's exit 3 is in test_device_cli.py)."""
    data, out, served = gateway
    bundle = out / "TS00000004"
    (data.path / "config" / "temperature-sensor.toml").write_text("[endpoints\n")
    proc = run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--timeout", "10", *FIRMWARE)
    one_line_error(proc, "enrollment failed at step enroll: 5.03 Service Unavailable configuration unavailable")
    assert proc.returncode == 1
    assert not [p.name for p in bundle.iterdir() if p.name.startswith(("op-", "config"))]


def test_simulate_and_renew_choose_their_flows(gateway, tmp_path):
    data, out, served = gateway
    sensors = tmp_path / "sensors"
    sensors.mkdir()
    for name in ("TS00000001", "TS00000002", "TS00000003"):
        shutil.copytree(out / name, sensors / name)
    doc = json.loads(ok(run_devid("simulate", "--gateway", served.uri, "--devices", sensors, "--json", *FIRMWARE)))
    assert (doc["flow"], doc["enrolled"], doc["errors"]) == ("one-request", 3, 0)
    for name in ("TS00000001", "TS00000002", "TS00000003"):
        assert handshakes(served, name) == 1
        assert ("nonce", "issued") not in decisions(served, name) and (sensors / name / "config.cbor").exists()
    # renewals: the certificate alone by default, the configuration too with --flow one-request
    doc = json.loads(ok(run_devid("simulate", "--gateway", served.uri, "--devices", sensors, "--json", "--renew")))
    assert (doc["flow"], doc["enrolled"], doc["errors"]) == ("classic", 3, 0)
    bundle = sensors / "TS00000001"
    (bundle / "config.cbor").unlink()
    text = ok(run_devid("renew", "--gateway", served.uri, "--device", bundle, "--flow", "one-request"))
    assert text.splitlines()[1] == "config: configuration for temperature-sensor (2 trust anchors)"
    assert (bundle / "config.cbor").exists()
    doc = json.loads(ok(run_devid("renew", "--gateway", served.uri, "--device", bundle, "--json")))
    assert doc["flow"] == "classic"
    assert decisions(served, "TS00000001")[-2:] == [("renew", "issued"), ("renew", "issued")]
    assert [line.get("config") for line in log_lines(served, "TS00000001") if line["event"] == "renew"][-2:] == \
        [True, None]


def test_the_load_generator_and_devid_bench_run_one_request_by_default(data, tmp_path):
    bundles = fleet(data, tmp_path / "fleet", 6)
    served = serve(data.path, tmp_path / "serve.log")
    try:
        runs = {}
        for flow, chosen in (("one-request", bundles[:3]), ("classic", bundles[3:])):
            sub = tmp_path / flow
            sub.mkdir()
            for b in chosen:
                shutil.copytree(b, sub / b.name)
            args = ["--flow", "classic"] if flow == "classic" else []
            proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "loadgen.py"), "--gateway", served.uri,
                                   "--bundles", str(sub), "--no-save", *args], capture_output=True, timeout=300)
            assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
            runs[flow] = json.loads(proc.stdout)
    finally:
        assert served.stop() == 0
    one, classic = runs["one-request"], runs["classic"]
    assert (one["flow"], one["done"], one["errors"]) == ("one-request", 3, 0)
    assert set(one["step_latency_ms"]) == {"connect", "evidence", "enroll", "config"}
    assert (classic["flow"], classic["done"], classic["errors"]) == ("classic", 3, 0)
    assert set(classic["step_latency_ms"]) == {"connect", "nonce", "evidence", "enroll", "config"}
    reg = data.open_registry(readonly=True)
    try:
        assert all(reg.get_device(b.name).state is DeviceState.ENROLLED for b in bundles)
    finally:
        reg.close()

    # `devid bench`: its own gateway and devices, the lean client, the one-request flow
    proc = run_devid("bench", "--devices", "20", "--no-baselines", "--json", "--workdir", tmp_path / "bench")
    assert proc.returncode == 0, proc.stderr.decode()
    enroll = json.loads(proc.stdout)["enroll"]
    assert (enroll["done"], enroll["errors"], enroll["flow"]) == (20, 0, "one-request")
    steps = enroll["step_latency_ms"]
    assert "nonce" not in steps and steps["enroll"]["p50"] is not None     # no nonce request was made


def test_fetch_config_with_a_stale_config_gets_the_current_one(gateway):
    data, out, served = gateway
    bundle = out / "TS00000003"
    ok(run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--timeout", "10", *FIRMWARE))
    current = (bundle / "config.cbor").read_bytes()
    (bundle / "config.cbor").write_bytes(current[:-1] + b"\x00")      # not what the gateway serves: another ETag
    doc = json.loads(ok(run_devid("fetch-config", "--gateway", served.uri, "--device", bundle, "--json")))
    assert (doc["ok"], doc["unchanged"]) == (True, False)
    assert (bundle / "config.cbor").read_bytes() == current
