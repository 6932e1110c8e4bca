"""`devid attest ...` as a real process: log table and JSON, filters, verify-log, policy check."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from attestation.service import AttestationService
from gateway.attest_cli import parse_since
from gateway.attestation_store import SQLiteAttestationStore

from .attest_util import NOW, POLICY, Clock, SimDevice
from .conftest import run_devid
from .test_cli import ok, one_line_error

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "attestation-policy.example.toml"


@pytest.fixture
def logged(data):
    """Six evaluations: TS1 affirming x2, TS2 contraindicated (secure boot), TS2 warning, a forged one."""
    reg = data.open_registry()
    store = SQLiteAttestationStore(reg)
    clock = Clock()
    svc = AttestationService(POLICY, store, store, clock=clock)
    ts1, ts2 = SimDevice(serial="TS1"), SimDevice(serial="TS2")
    for dev, changes in ((ts1, {}), (ts2, {"secure_boot": False}), (ts2, {"dbgstat": 1}), (ts1, {})):
        nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
        svc.evaluate(dev.token(nonce, iat=int(clock().timestamp()), **changes), dev.identity)
        clock.advance(3600)
    svc.evaluate(b"\xd2\x84garbage", ts1.identity)
    reg.close()
    return data


def test_log_table(logged):
    text = ok(run_devid("attest", "log", data_dir=logged.path))
    lines = text.splitlines()
    assert lines[0].split() == ["seq", "time", "device", "type", "verdict", "accepted", "firmware", "reasons"]
    assert "TS2" in lines[3] and "contraindicated" in lines[3] and "secure-boot-off" in lines[3]
    assert "ts-firmware 2.3.1" in lines[2] and NOW.strftime("%Y-%m-%dT%H:%M:%SZ") in lines[2]
    assert "debug-not-disabled-since-boot" in lines[4] and "warning" in lines[4]
    assert "cbor-malformed" in lines[6] or "evidence-structure" in lines[6]
    assert lines[-1] == "5 entries shown"


def test_log_filters_and_json(logged):
    d = logged.path
    rows = [json.loads(x) for x in ok(run_devid("attest", "log", "--json", data_dir=d)).splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["claims"]["swname"] == "ts-firmware" and bytes.fromhex(rows[0]["evidence"])[0] == 0xD2
    assert rows[1]["reasons"] == [{"code": "secure-boot-off", "tier": "contraindicated",
                                   "message": "secure boot is off (oemboot false) and the policy requires it"}]
    assert len(rows[0]["hash"]) == 64 and rows[1]["prev"] == rows[0]["hash"]
    seqs = lambda *a: [json.loads(x)["seq"] for x in ok(run_devid("attest", "log", "--json", *a,   # noqa: E731
                                                                 data_dir=d)).splitlines()]
    assert seqs("--device", "TS2") == [2, 3]
    assert seqs("--verdict", "contraindicated") == [2, 5]
    assert seqs("--verdict", "affirming", "--limit", "1") == [4]
    assert seqs("--since", (NOW + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")) == [3, 4, 5]
    assert seqs("--since", (NOW + timedelta(days=2)).strftime("%Y-%m-%d")) == []
    assert seqs("--device", "TS1", "--limit", "2") == [4, 5]


@pytest.mark.parametrize("args,needle", [
    (("attest", "log", "--verdict", "great"), "invalid choice"),
    (("attest", "log", "--since", "yesterday"), "invalid time 'yesterday'"),
    (("attest", "log", "--limit", "0"), "must be at least 1"),
    (("attest", "verify-log", "--head", "3:abc"), "invalid head"),
    (("attest", "policy", "check", "/nonexistent.toml"), "policy file not found"),
    (("attest", "policy", "check"), "attestation-policy.toml: policy file not found"),
])
def test_bad_input_is_one_line(logged, args, needle):
    one_line_error(run_devid(*args, data_dir=logged.path), needle)


def test_verify_log_ok_then_tampered(logged):
    d = logged.path
    text = ok(run_devid("attest", "verify-log", data_dir=d))
    assert text.startswith("OK: 5 entries, chain intact; head 5:")
    head = text.split("head ")[1].strip()
    ok(run_devid("attest", "verify-log", "--head", head, data_dir=d))
    # an operator (or intruder) "fixes" a verdict directly in the database
    import sqlite3
    con = sqlite3.connect(logged.db_path)
    con.execute("UPDATE attestation_log SET tier = 'affirming', acceptable = 1, reasons = '[]' WHERE seq = 2")
    con.commit()
    proc = run_devid("attest", "verify-log", data_dir=d)
    assert proc.returncode == 1
    assert proc.stdout.decode().splitlines() == ["BROKEN: entry 2 was modified: its hash does not match its content"]
    assert proc.stderr.decode() == "devid: error: attestation log verification failed: 1 problem(s)\n"
    report = json.loads(run_devid("attest", "verify-log", "--json", data_dir=d).stdout)
    assert report["ok"] is False and report["problems"][0]["seq"] == 2 and report["entries"] == 5
    # truncation of the tail is caught by the recorded head
    con.execute("UPDATE attestation_log SET tier = 'contraindicated', acceptable = 0, reasons = ? WHERE seq = 2",
                (json.dumps([{"code": "secure-boot-off", "tier": "contraindicated",
                              "message": "secure boot is off (oemboot false) and the policy requires it"}]),))
    con.execute("DELETE FROM attestation_log WHERE seq = 5")
    con.commit()
    con.close()
    ok(run_devid("attest", "verify-log", data_dir=d))
    one_line_error(run_devid("attest", "verify-log", "--head", head, data_dir=d), "1 problem")
    assert "no longer in the log" in run_devid("attest", "verify-log", "--head", head, data_dir=d).stdout.decode()


def test_policy_check(data, tmp_path):
    text = ok(run_devid("attest", "policy", "check", EXAMPLE, data_dir=data.path))
    assert text.startswith(f"OK: {EXAMPLE}: 3 device type(s)")
    assert "temperature-sensor  required     affirming  2.1.0" in text
    shutil.copy(EXAMPLE, data.path / "attestation-policy.toml")
    j = json.loads(ok(run_devid("attest", "policy", "check", "--json", data_dir=data.path)))
    assert j["device_types"]["meter"]["accept"] == "warning"
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("accept = \"warning\"", "accept = \"maybe\""))
    one_line_error(run_devid("attest", "policy", "check", bad, data_dir=data.path),
                   f"{bad}: device_types.meter.accept: expected one of 'affirming', 'warning', got 'maybe'")


def test_empty_log_and_help(data):
    assert ok(run_devid("attest", "log", data_dir=data.path)).splitlines()[-1] == "0 entries shown"
    assert ok(run_devid("attest", "verify-log", data_dir=data.path)).startswith("OK: 0 entries")
    for args in (("attest",), ("attest", "log"), ("attest", "verify-log"), ("attest", "policy", "check")):
        proc = run_devid(*args, "--help")
        assert proc.returncode == 0 and b"usage:" in proc.stdout


def test_parse_since():
    now = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    assert parse_since("90s", now) == now - timedelta(seconds=90)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("2026-11-28T13:00:00+01:00") == now
    assert parse_since("2026-11-28T12:00:00") == now
