"""`devid attest ...` as a real process: log table and JSON, filters, verify-log, policy check."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from devid.attestation.service import AttestationService
from devid.gateway.cli.attest import parse_since
from devid.gateway.store.attestation_store import AttestationStore

from .attest_util import NOW, POLICY, Clock, SimDevice
from .conftest import run_devid
from .conftest import ok, one_line_error

pytestmark = pytest.mark.engines

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "attestation-policy.example.toml"


@pytest.fixture
def logged(data):
    """Six evaluations: TS1 affirming x2, TS2 contraindicated (secure boot), TS2 warning, a forged one."""
    reg = data.open_registry()
    store = AttestationStore(reg)
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
    assert lines[0].split() == ["seq", "time", "device", "type", "verdict", "accepted", "nonce", "firmware",
                                "reasons"]
    # the kind of nonce each appraisal took (server nonces here; "-" where the token did not decode)
    assert lines[2].split()[6] == "server" and lines[6].split()[6] == "-"
    assert "TS2" in lines[3] and "contraindicated" in lines[3] and "secure-boot-off" in lines[3]
    assert "ts-firmware 2.3.1" in lines[2] and NOW.strftime("%Y-%m-%dT%H:%M:%SZ") in lines[2]
    assert "debug-not-disabled-since-boot" in lines[4] and "warning" in lines[4]
    assert "cbor-malformed" in lines[6] or "evidence-structure" in lines[6]
    assert lines[-1] == "5 entries shown"


def test_log_filters_and_json(logged):
    d = logged.path
    rows = json.loads(ok(run_devid("attest", "log", "--json", data_dir=d)))["entries"]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["claims"]["swname"] == "ts-firmware" and bytes.fromhex(rows[0]["evidence"])[0] == 0xD2
    assert rows[1]["reasons"] == [{"code": "secure-boot-off", "tier": "contraindicated",
                                   "message": "secure boot is off (oemboot false) and the policy requires it"}]
    assert len(rows[0]["hash"]) == 64 and rows[1]["prev"] == rows[0]["hash"]
    seqs = lambda *a: [x["seq"] for x in json.loads(ok(run_devid("attest", "log", "--json", *a,   # noqa: E731
                                                                 data_dir=d)))["entries"]]
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


@pytest.mark.sqlite_only       # tampers with the SQLite file directly
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


# -- the refused-evidence budget and rotation ---------------------------------------------------------

@pytest.fixture
def flooded(data):
    """TS3 sends 10 junk evidence messages with a budget of 2, then acceptable evidence, then 3 more junk."""
    from devid.attestation.log_budget import LogBudget
    reg = data.open_registry()
    store = AttestationStore(reg)
    clock = Clock()
    svc = AttestationService(POLICY, store, store, clock=clock, log_budget=LogBudget(refused_per_window=2))
    dev = SimDevice(serial="TS3")
    for _ in range(10):
        svc.evaluate(b"\xd2\x84garbage", dev.identity)
        clock.advance(1)
    nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
    svc.evaluate(dev.token(nonce), dev.identity)
    for _ in range(3):
        svc.evaluate(b"\xd2\x84garbage", dev.identity)
    reg.close()
    return data


def test_log_shows_summary_entries(flooded):
    d = flooded.path
    lines = ok(run_devid("attest", "log", data_dir=d)).splitlines()
    assert "8 more refused between 2026-11-28T12:00:02Z and 2026-11-28T12:00:09Z (cbor-malformed 8)" in lines[4]
    assert lines[4].split()[:6] == ["3", "2026-11-28T12:00:10Z", "TS3", "temperature-sensor", "contraindicated", "no"]
    assert "affirming" in lines[5] and lines[6] == "4 entries shown"
    assert lines[7] == ("note: 3 more refused evidence message(s) from 1 device(s) are counted but not yet summarised "
                        "(a summary entry comes before the device's next entry, or with the next rotation)")
    rows = json.loads(ok(run_devid("attest", "log", "--json", data_dir=d)))["entries"]
    assert [r["kind"] for r in rows] == ["appraisal", "appraisal", "refused-summary", "appraisal"]
    s = rows[2]
    assert (s["count"], s["first"], s["last"], s["reason_counts"]) == \
        (8, "2026-11-28T12:00:02.000000Z", "2026-11-28T12:00:09.000000Z", {"cbor-malformed": 8})
    assert s["prev"] == rows[1]["hash"] and rows[3]["prev"] == s["hash"] and "evidence" not in s
    seqs = [x["seq"] for x in json.loads(ok(run_devid("attest", "log", "--json", "--verdict", "contraindicated",
                                                       data_dir=d)))["entries"]]
    assert seqs == [1, 2, 3]
    assert ok(run_devid("attest", "verify-log", data_dir=d)).startswith("OK: 4 entries, chain intact; head 4:")


def test_rotate_and_verify_log(logged, tmp_path):
    d = logged.path
    text = ok(run_devid("attest", "log", "rotate", "--segment-entries", "2", data_dir=d))
    lines = text.splitlines()
    assert lines[:3] == [f"sealed attestation-log-{a:012d}-{b:012d}.jsonl: entries {a}..{b} ({b - a + 1}), SHA-256 "
                         + line.rsplit(" ", 1)[1] for (a, b), line in zip(((1, 2), (3, 4), (5, 5)), lines)]
    assert lines[-1].startswith("OK: rotated 5 entries older than ")
    assert lines[-1].endswith(f"into 3 segment(s) in {d / 'attestation-log'}; the registry keeps no entries")
    out = ok(run_devid("attest", "log", data_dir=d)).splitlines()
    assert out[-2:] == ["0 entries shown", "note: entries 1..5 were rotated into 3 sealed segment(s); this command "
                        "reads only the registry ('devid attest verify-log' checks the segments)"]
    text = ok(run_devid("attest", "verify-log", data_dir=d))
    assert text.splitlines()[0] == "segment attestation-log-000000000001-000000000002.jsonl: entries 1..2 (2): verified"
    assert text.splitlines()[-1].startswith("OK: 5 entries, chain intact; head 5:")
    head = text.split("head ")[1].strip()
    ok(run_devid("attest", "verify-log", "--head", head, data_dir=d))
    report = json.loads(ok(run_devid("attest", "verify-log", "--json", data_dir=d)))
    assert report["ok"] and [s["status"] for s in report["segments"]] == ["verified"] * 3 and report["entries"] == 5
    # an operator archives the middle segment: reported, continuity still checked through its anchor
    archive = tmp_path / "archive"
    archive.mkdir()
    middle = d / "attestation-log" / "attestation-log-000000000003-000000000004.jsonl"
    shutil.move(middle, archive / middle.name)
    text = ok(run_devid("attest", "verify-log", data_dir=d))
    assert (f"segment {middle.name}: entries 3..4 (2): archived, not present (continuity checked through its "
            "anchor)") in text.splitlines()
    assert text.splitlines()[-1].startswith("OK: 3 entries, chain intact; head 5:")
    one_line_error(run_devid("attest", "verify-log", "--require-segments", data_dir=d), "1 problem")
    text = ok(run_devid("attest", "verify-log", "--segments", d / "attestation-log", "--segments", archive,
                        data_dir=d))
    assert text.count(": verified") == 3
    # a segment edited in the archive
    (archive / middle.name).write_bytes((archive / middle.name).read_bytes().replace(b'"TS2"', b'"TS1"', 1))
    proc = run_devid("attest", "verify-log", "--segments", d / "attestation-log", "--segments", archive, data_dir=d)
    assert proc.returncode == 1
    assert f"BROKEN: {middle.name}: the file changed after it was sealed" in proc.stdout.decode()
    assert proc.stderr.decode().startswith("devid: error: attestation log verification failed:")
    # nothing more to rotate; JSON
    assert "OK: nothing to rotate: no entry older than" in ok(run_devid("attest", "log", "rotate", data_dir=d))
    j = json.loads(ok(run_devid("attest", "log", "rotate", "--json", data_dir=d)))
    assert j["ok"] and j["segments"] == [] and j["registry"] is None


def test_rotate_json_and_bad_input(logged, tmp_path):
    d = logged.path
    j = json.loads(ok(run_devid("attest", "log", "rotate", "--before", "2026-11-28T14:30:00Z", "--out",
                                tmp_path / "segs", "--json", data_dir=d)))
    assert [(s["first_seq"], s["last_seq"]) for s in j["segments"]] == [(1, 3)]
    assert j["registry"] == {"first_seq": 4, "last_seq": 5, "entries": 2} and j["directory"] == str(tmp_path / "segs")
    assert (tmp_path / "segs" / j["segments"][0]["file"]).exists()
    ok(run_devid("attest", "verify-log", "--segments", tmp_path / "segs", data_dir=d))
    # elsewhere than DATA/attestation-log: found with --segments, else reported as archived
    assert "archived, not present" in ok(run_devid("attest", "verify-log", data_dir=d))
    one_line_error(run_devid("attest", "verify-log", "--require-segments", data_dir=d), "1 problem")
    (tmp_path / "a-file").write_text("x")
    for args, needle in ((("--before", "yesterday"), "invalid time 'yesterday'"),
                         (("--before", "99999999d"), "invalid time '99999999d': too far back"),
                         (("--segment-entries", "0"), "must be at least 1"),
                         (("--out", tmp_path / "a-file"), "cannot create the segment directory")):
        one_line_error(run_devid("attest", "log", "rotate", *args, data_dir=d), needle)
    one_line_error(run_devid("attest", "verify-log", "--segments", tmp_path / "nowhere", data_dir=d),
                   "nowhere: not a directory")
    proc = run_devid("attest", "log", "rotate", "--help")
    assert proc.returncode == 0 and b"--segment-entries" in proc.stdout
