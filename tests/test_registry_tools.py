"""`devid registry migrate` (a SQLite registry into an empty PostgreSQL one: every table, one
verified transaction, the source left as it was) and `devid registry check` (the invariants, on
either engine: passes on a healthy registry, names the check a tampering breaks)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from devid.attestation.log_budget import LogBudget
from devid.attestation.service import AttestationService
from devid.gateway.cli.attest import _trusted
from devid.gateway.factory.provisioning import provision
from devid.gateway.store.attestation_store import AttestationStore
from devid.gateway.store.engines import open_registry
from devid.gateway.store.log_rotation import LOCK_FILE, SEGMENT_DIR, rotate
from devid.gateway.store.registry_copy import TABLES

from .attest_util import POLICY, Clock, SimDevice
from .conftest import NOW, make_csr, ok, one_line_error, run_devid, sql

JUNK = b"\xd2\x84garbage"
START = NOW - timedelta(days=2)
CHECKS = 10         # what `devid registry check` runs on a data directory


def populate(data, tmp_path: Path) -> dict:
    """Devices provisioned from a serial block, enrolled, two renewed, one revoked, one certificate
    revoked alone, CRL numbers, attestation log entries (appraisals, refusals, summaries, verdict
    uses) of which the oldest are rotated into sealed segments, and an outstanding nonce."""
    reg = data.open_registry()
    try:
        ca = data.authority(reg)
        provision(ca, count=5, device_type="temperature-sensor", out=tmp_path / "factory", serial_prefix="TS",
                  now=lambda: NOW, manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  workers=1)
        serials = [f"TS{i:08d}" for i in range(1, 6)]
        ops = {}
        for s in serials[:4]:
            ops[s] = ca.issue_operational(make_csr()[0], s, NOW).record
        for s in serials[:2]:
            ca.issue_operational(make_csr()[0], s, NOW + timedelta(hours=1))
        reg.revoke_device(serials[2], "keyCompromise", NOW + timedelta(hours=2))
        reg.revoke_certificate(ops[serials[3]].serial, "superseded", NOW + timedelta(hours=2))
        for issuer in ("operational", "operational", "manufacturing"):
            reg.next_crl_number(issuer)

        store = AttestationStore(reg)
        clock = Clock(START)
        svc = AttestationService(POLICY, store, store, clock=clock, log_budget=LogBudget(refused_per_window=2))
        devices = [SimDevice(serial=s) for s in serials[:3]]
        for i in range(24):
            dev = devices[i % 3]
            if i % 4 == 0:
                svc.evaluate(JUNK, dev.identity)
            else:
                nonce = svc.issue_nonce(dev.serial, dev.fingerprint).value
                svc.evaluate(dev.token(nonce, iat=int(clock().timestamp())), dev.identity)
                if i % 3 == 1:
                    assert svc.take_verdict(dev.serial) is not None
            clock.advance(3600)
        svc.issue_nonce(devices[0].serial, devices[0].fingerprint)     # outstanding
        rotated = rotate(store, data.path / SEGMENT_DIR, data.issuer("gateway"), _trusted(data, store),
                         before=START + timedelta(hours=12), now=clock(), verdict_window=POLICY.verdict_window,
                         lock=data.path / LOCK_FILE, segment_entries=5)
        assert rotated.segments, "the scenario rotates entries into segments"
        for _ in range(4):          # beyond the device's budget of refused evidence: a tally row
            svc.evaluate(JUNK, devices[1].identity)
        return {"serials": serials, "segments": len(rotated.segments)}
    finally:
        reg.close()


def counts(location) -> dict[str, int]:
    reg = open_registry(location, readonly=True)
    try:
        return {table: sql(reg, f"SELECT COUNT(*) FROM {table}")[0][0] for table, _, _ in TABLES}
    finally:
        reg.close()


def pg_rows(url) -> dict[str, int]:
    """Rows per table of the schema `url` names, whatever is there (nothing: {})."""
    import psycopg
    with psycopg.connect(url) as con:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables "
                                            "WHERE table_schema = current_schema()")]
        return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables if t != "devid_schema"}


def files_digest(data) -> dict[str, str]:
    """The SQLite registry (its file and what its WAL holds: a reader may leave an empty one) and
    devid.toml."""
    wal = data.path / "registry.sqlite3-wal"
    return {p.name: hashlib.sha256(p.read_bytes() if p.exists() else b"").hexdigest()
            for p in (data.db_path, wal, data.config_path)}


def js(proc) -> dict:
    out = ok(proc)
    assert len(out.splitlines()) == 1
    return json.loads(out)


def views(data, *registry) -> dict:
    """What an operator sees: the devices, a renewed and a revoked one, the log, its verification."""
    args = [*registry, "--data", data.path]
    return {"devices": js(run_devid("devices", "list", "--json", *args)),
            "TS1": js(run_devid("devices", "show", "TS00000001", "--json", *args)),
            "TS3": js(run_devid("devices", "show", "TS00000003", "--json", *args)),
            "log": js(run_devid("attest", "log", "--json", *args)),
            "verify": js(run_devid("attest", "verify-log", "--json", *args))}


@pytest.fixture
def populated(data, tmp_path, postgres):
    info = populate(data, tmp_path)
    return data, info


@pytest.mark.sqlite_only
def test_migrate_copies_every_table_and_the_copy_passes_every_check(populated, postgres):
    data, info = populated
    before = files_digest(data)
    source_counts = counts(data.db_path)
    assert all(source_counts.values()), str(source_counts)         # the scenario fills every table
    check = js(run_devid("registry", "check", "--json", "--data", data.path))
    assert check["engine"] == "sqlite" and len(check["checks"]) == CHECKS and all(c["ok"] for c in check["checks"])
    seen = views(data)

    url = postgres.new_schema("mig")
    proc = run_devid("registry", "migrate", "--to", url, "--json", "--data", data.path)
    doc = js(proc)
    assert doc["ok"] and doc["switched"] is False and doc["config"] is None
    assert {t: v["rows"] for t, v in doc["tables"].items()} == source_counts
    assert all(v["ok"] and v["target_rows"] == v["rows"] for v in doc["tables"].values())
    head = seen["verify"]
    assert (doc["log"]["head_seq"], doc["log"]["head_hash"]) == (head["head_seq"], head["head_hash"])
    assert doc["log"]["segments"] == info["segments"]
    assert proc.stderr.decode() == ""          # --json: no progress
    assert counts(url) == source_counts
    assert files_digest(data) == before          # the SQLite registry and devid.toml as they were

    check = js(run_devid("registry", "check", "--json", "--registry", url, "--data", data.path))
    assert check["engine"] == "postgresql" and all(c["ok"] for c in check["checks"]), check
    assert views(data, "--registry", url) == seen


@pytest.mark.sqlite_only
def test_migrate_text_output_progress_and_switch_with_a_password_file(populated, postgres, tmp_path):
    data, _ = populated
    reg = data.open_registry()
    try:                                # enough devices for the progress lines of a big registry
        provision(data.authority(reg), count=1200, device_type="meter", out=tmp_path / "meters", serial_prefix="MT",
                  now=lambda: NOW, manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"),
                  workers=1)
    finally:
        reg.close()
    secret = "pw-in-a-file-7f3a"
    pwfile = tmp_path / "pgpass"
    pwfile.write_text(secret + "\n")
    pwfile.chmod(0o600)
    url = postgres.new_schema("sw")
    proc = run_devid("registry", "migrate", "--to", url, "--switch", "--registry-password-file", pwfile,
                     "--data", data.path)
    out, err = ok(proc), proc.stderr.decode()
    assert err.splitlines() == ["copied devices: 1205 rows", "copied certificates: 1215 rows"]   # the big tables
    assert "identical" in out and "OK: copied" in out and "now names" in out
    toml = data.config_path.read_text()
    assert f'url = "{url}"' in toml and f'password_file = "{pwfile}"' in toml
    for text in (out, err, toml):
        assert secret not in text
    # this data directory now uses PostgreSQL, without --registry
    shown = js(run_devid("registry", "check", "--json", "--data", data.path))
    assert shown["engine"] == "postgresql" and shown["registry"] == url
    assert js(run_devid("devices", "list", "--json", "--data", data.path))["devices"]
    # migrating again: this data directory no longer uses its SQLite registry
    one_line_error(run_devid("registry", "migrate", "--to", postgres.new_schema("again"), "--data", data.path),
                   "already names a PostgreSQL registry")


@pytest.mark.sqlite_only
def test_a_password_in_the_url_is_used_never_shown_and_never_written(populated, postgres):
    data, _ = populated
    secret = "pw-in-the-url-9c1e"
    url = postgres.new_schema("pw").replace("devid@", f"devid:{secret}@")
    before = files_digest(data)
    proc = run_devid("registry", "migrate", "--to", url, "--switch", "--data", data.path)
    err = one_line_error(proc, "--switch", "must not hold a password")
    assert secret not in err and secret not in proc.stdout.decode()
    assert files_digest(data) == before
    assert pg_rows(url) == {}                    # refused before anything was written

    proc = run_devid("registry", "migrate", "--to", url, "--json", "--data", data.path)
    doc = js(proc)
    assert secret not in proc.stdout.decode() + proc.stderr.decode()
    assert "***" in doc["to"]
    assert files_digest(data) == before
    proc = run_devid("registry", "check", "--registry", url, "--data", data.path)
    assert "OK: all" in ok(proc) and secret not in proc.stdout.decode() + proc.stderr.decode()


@pytest.mark.sqlite_only
def test_a_target_that_is_not_empty_is_refused_and_left_as_it_was(populated, postgres):
    data, _ = populated
    url = postgres.new_schema("full")
    js(run_devid("registry", "migrate", "--to", url, "--json", "--data", data.path))
    held = counts(url)
    reg = open_registry(url, readonly=True)
    try:
        log_before = sql(reg, "SELECT seq, hash FROM attestation_log ORDER BY seq")
    finally:
        reg.close()
    proc = run_devid("registry", "migrate", "--to", url, "--data", data.path)
    one_line_error(proc, "is not empty", "nothing was written")
    proc = run_devid("registry", "migrate", "--to", url, "--json", "--data", data.path)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and doc["ok"] is False and "is not empty" in doc["error"]
    assert counts(url) == held
    reg = open_registry(url, readonly=True)
    try:
        assert sql(reg, "SELECT seq, hash FROM attestation_log ORDER BY seq") == log_before
    finally:
        reg.close()


@pytest.mark.sqlite_only
def test_migrate_refuses_while_another_process_has_the_registry_open(populated, postgres):
    data, _ = populated
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
                               "db.execute('SELECT COUNT(*) FROM devices').fetchone(); print('open', flush=True); "
                               "sys.stdin.read()", str(data.db_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"open\n"
        url = postgres.new_schema("busy")
        err = one_line_error(run_devid("registry", "migrate", "--to", url, "--data", data.path),
                             f"is open in process {holder.pid}", "stop the gateway", "nothing was copied")
        assert "Traceback" not in err
        assert pg_rows(url) == {}
    finally:
        holder.stdin.close()
        holder.wait(30)
    js(run_devid("registry", "migrate", "--to", url, "--json", "--data", data.path))


@pytest.mark.sqlite_only
def test_a_broken_log_in_the_source_is_not_migrated(populated, postgres):
    data, _ = populated
    db = sqlite3.connect(data.db_path)
    db.execute("UPDATE attestation_log SET reasons = '[]' WHERE seq = (SELECT MAX(seq) FROM attestation_log)")
    db.commit()
    db.close()
    url = postgres.new_schema("broken")
    one_line_error(run_devid("registry", "migrate", "--to", url, "--data", data.path),
                   "chain does not verify in the copy", "rolled back")
    assert not any(pg_rows(url).values())


def test_the_copy_knows_every_table_and_column_of_both_engines(tmp_path, postgres):
    lite = open_registry(tmp_path / "r.sqlite3", create=True)
    pg = open_registry(postgres.new_schema("cols"), create=True)
    try:
        with lite.reading() as db:
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            lite_cols = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in names}
        with pg.reading() as db:
            pg_names = {r[0] for r in db.execute("SELECT table_name FROM information_schema.tables "
                                                 "WHERE table_schema = current_schema()")} - {"devid_schema"}
            pg_cols = {t: [r[0] for r in db.execute("SELECT column_name FROM information_schema.columns WHERE "
                                                    "table_schema = current_schema() AND table_name = ? "
                                                    "ORDER BY ordinal_position", (t,))] for t in pg_names}
    finally:
        lite.close()
        pg.close()
    assert {t for t, _, _ in TABLES} == names == pg_names
    for table, columns, _ in TABLES:
        listed = sorted(c.strip() for c in columns.split(","))
        assert listed == sorted(lite_cols[table]) == sorted(c for c in pg_cols[table] if c != "rowid"), table


# -- registry check: healthy, then tampered, on both engines --------------------------------------------

def failed_checks(data) -> tuple[set[str], dict]:
    proc = run_devid("registry", "check", "--json", "--data", data.path)
    doc = json.loads(proc.stdout)
    assert "Traceback" not in proc.stderr.decode()
    if doc["ok"]:
        assert proc.returncode == 0
        return set(), doc
    assert proc.returncode == 1 and "registry check failed" in doc["error"]
    assert len(proc.stderr.decode().strip().splitlines()) == 1
    return {c["name"] for c in doc["checks"] if not c["ok"]}, doc


@pytest.mark.engines
def test_check_passes_on_a_healthy_registry_and_names_what_tampering_broke(data, tmp_path, registry_url):
    info = populate(data, tmp_path)
    assert failed_checks(data)[0] == set()
    proc = run_devid("registry", "check", "--data", data.path)
    out = ok(proc)
    assert "OK: all 10 checks passed" in out and "FAILED" not in out
    reg = data.open_registry()
    try:
        def tampered(statement, params=()):
            with reg.transaction() as db:
                db.execute(statement, params)

        # a second current operational certificate for a renewed device
        ts1 = info["serials"][0]
        old = sql(reg, "SELECT serial FROM certificates WHERE device_serial = ? AND status = 'superseded'", (ts1,))
        tampered("UPDATE certificates SET status = 'current' WHERE serial = ?", (old[0][0],))
        names, doc = failed_checks(data)
        assert names == {"at most one current certificate per device and profile"}
        [c] = [c for c in doc["checks"] if not c["ok"]]
        assert c["problems"] == 1 and ts1 in c["examples"][0]
        proc = run_devid("registry", "check", "--data", data.path)
        assert proc.returncode == 1 and "FAILED: at most one current" in proc.stdout.decode()
        one_line_error(proc, "registry check failed: 1 of 10 checks")
        tampered("UPDATE certificates SET status = 'superseded' WHERE serial = ?", (old[0][0],))

        # an edited log entry (in the registry, after the rotated segments)
        last = sql(reg, "SELECT MAX(seq) FROM attestation_log")[0][0]
        reasons = sql(reg, "SELECT reasons FROM attestation_log WHERE seq = ?", (last - 1,))[0][0]
        tampered("UPDATE attestation_log SET reasons = ? WHERE seq = ?", ('["edited"]', last - 1))
        assert failed_checks(data)[0] == {"attestation log chain intact (segments and registry)"}
        tampered("UPDATE attestation_log SET reasons = ? WHERE seq = ?", (reasons, last - 1))

        # a certificate row whose DER is another certificate's
        a, b = sql(reg, "SELECT serial, der FROM certificates WHERE profile = 'operational' ORDER BY serial LIMIT 2")
        tampered("UPDATE certificates SET der = ? WHERE serial = ?", (bytes(b[1]), a[0]))
        names, doc = failed_checks(data)
        assert names == {"certificate rows match their DER (serial, SHA-256 fingerprint)",
                         "no duplicate certificate serials (across issuers)"}
        tampered("UPDATE certificates SET der = ? WHERE serial = ?", (bytes(a[1]), a[0]))

        # a revoked device whose certificate is not revoked; a verdict use of a refused appraisal
        ts3 = info["serials"][2]
        tampered("UPDATE certificates SET status = 'current' WHERE device_serial = ? AND profile = 'factory'", (ts3,))
        refused = sql(reg, "SELECT MAX(seq) FROM attestation_log WHERE acceptable = 0 AND summary IS NULL")[0][0]
        tampered("INSERT INTO attestation_verdict_uses (seq, used_at, purpose) VALUES (?, ?, ?)",
                 (refused, "2026-11-28T12:00:00Z", "enrollment"))
        tampered("UPDATE crl_numbers SET number = 0 WHERE issuer = 'manufacturing'")
        tampered("UPDATE serial_sequences SET next = 3 WHERE prefix = 'TS'")
        assert failed_checks(data)[0] == {"every certificate of a revoked device is revoked",
                                          "verdict uses name acceptable appraisal entries",
                                          "CRL numbers positive",
                                          "serial blocks ahead of every device serial issued from them"}
    finally:
        reg.close()


@pytest.mark.sqlite_only
def test_a_registry_older_than_its_deployment_rows_gets_them_and_another_host_can_join(populated, postgres, tmp_path):
    data, _ = populated
    reg = data.open_registry()
    try:
        data.psk_secret(create=True, registry=reg)      # records the PSK secret's check (review 18c L1)
    finally:
        reg.close()
    db = sqlite3.connect(data.db_path)
    # as a registry made before schema 7 has none, but for the PSK secret's check, recorded since
    db.execute("DELETE FROM deployment WHERE key <> 'psk_secret_check'")
    db.commit()
    db.close()
    url = postgres.new_schema("dep")
    doc = js(run_devid("registry", "migrate", "--to", url, "--switch", "--json", "--data", data.path))
    assert doc["deployment_recorded"] is True and doc["tables"]["deployment"]["rows"] == 1
    second = tmp_path / "host2"
    ok(run_devid("init", "--join", url, "--ca-from", data.path / "ca", "--data", second))
    here = js(run_devid("devices", "list", "--json", "--data", data.path))
    there = js(run_devid("devices", "list", "--json", "--data", second))
    assert here == there and len(here["devices"]) == 5
    assert all(c["ok"] for c in js(run_devid("registry", "check", "--json", "--data", second))["checks"])


@pytest.mark.sqlite_only
def test_a_migrated_registry_is_served_and_its_log_goes_on(populated, postgres, tmp_path):
    from .serve_helpers import FW, fleet, serving
    data, _ = populated
    [bundle] = fleet(data, tmp_path / "fleet", 1)
    url = postgres.new_schema("served")
    moved = js(run_devid("registry", "migrate", "--to", url, "--switch", "--json", "--data", data.path))
    firmware = ["--firmware-digest", FW.digest.hex(), "--firmware-name", FW.name, "--firmware-version", FW.version]
    with serving(data.path, tmp_path / "serve.log") as served:
        enrolled = js(run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--timeout", "10", *firmware,
                                "--json"))
        renewed = js(run_devid("renew", "--gateway", served.uri, "--device", bundle, "--timeout", "10", "--json"))
    assert enrolled["serial"] == renewed["serial"] == bundle.name
    shown = js(run_devid("devices", "show", bundle.name, "--json", "--data", data.path))
    assert shown["state"] == "enrolled" and [c["status"] for c in shown["certificates"]] == \
        ["current", "superseded", "current"]
    verified = js(run_devid("attest", "verify-log", "--json", "--data", data.path))
    assert verified["head_seq"] > moved["log"]["head_seq"] and verified["problems"] == []
    assert all(c["ok"] for c in js(run_devid("registry", "check", "--json", "--data", data.path))["checks"])
    reg = open_registry(data.db_path, readonly=True)          # the SQLite registry saw none of it
    try:
        assert sql(reg, "SELECT state FROM devices WHERE serial = ?", (bundle.name,)) == [("manufactured",)]
    finally:
        reg.close()
