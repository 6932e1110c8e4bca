"""The SQLite registry: schema, uniqueness, transactions that leave nothing half-done."""

from __future__ import annotations

import multiprocessing
import sqlite3
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.errors import DeviceRevoked, DuplicateDevice, SerialCollision, UnknownDevice
from devid.ca.store import CertStatus, DeviceState
from devid.gateway.store.registry import RegistryError, SQLiteRegistry
from devid.gateway.store.schema import MIGRATIONS, SCHEMA_VERSION

from .conftest import NOW, make_csr, register_device, sql

pytestmark = pytest.mark.engines


@pytest.mark.sqlite_only
def test_schema_is_versioned_and_wal(registry):
    assert registry.schema_version == SCHEMA_VERSION
    assert registry._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    SQLiteRegistry(path, create=True).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="newer"):
        SQLiteRegistry(path, create=True)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="cannot open"):
        SQLiteRegistry(path, create=True)


def test_duplicate_device_serial_is_refused_and_nothing_is_stored(ca, registry):
    register_device(ca, "SN1")
    key = ec.generate_private_key(ec.SECP256R1())
    device, issued = ca.new_factory_identity(key.public_key(), "SN1", "other-type", NOW)
    with pytest.raises(DuplicateDevice):
        registry.register_devices([(device, issued.record)])
    assert registry.get_certificate(issued.cert.serial_number) is None
    assert registry.get_device("SN1").device_type == "temperature-sensor"


def test_certificate_serial_uniqueness_is_enforced_by_the_database(ca, registry):
    _, first = register_device(ca, "SN1")
    key = ec.generate_private_key(ec.SECP256R1())
    device, issued = ca.new_factory_identity(key.public_key(), "SN2", "t", NOW)
    clash = replace(issued.record, serial=first.cert.serial_number)
    with pytest.raises(SerialCollision):
        registry.register_devices([(device, clash)])
    assert registry.get_device("SN2") is None      # the device insert was rolled back with it


def test_serial_collision_is_retried_with_a_fresh_serial(data, registry):
    """A CA whose random source repeats itself: the registry refuses the duplicate serial and the
    CA draws again, so issuance still succeeds with a unique serial."""
    import os
    draws = []

    def repeating(n):
        # the first three draws are identical, then real randomness
        draws.append(n)
        return b"\x7f" * n if len(draws) <= 3 else os.urandom(n)

    ca = data.authority(registry, rand_bytes=repeating)
    register_device(ca, "SN1")                      # draw 1: 0x7f7f...
    issued = ca.issue_operational(make_csr()[0], "SN1", NOW)   # draw 2 collides, draw 4 is used
    factory = [c for c in registry.certificates_for_device("SN1") if c.profile == "factory"][0]
    assert issued.cert.serial_number != factory.serial
    assert len(draws) >= 4


@pytest.mark.sqlite_only
def test_failure_mid_transaction_leaves_no_orphan(ca, registry):
    """Inject a failure between the device insert and the certificate insert (an SQL trigger that
    aborts the certificate insert): the device insert must be rolled back too."""
    registry._db.execute(
        "CREATE TEMP TRIGGER inject BEFORE INSERT ON certificates WHEN NEW.device_serial = 'BOOM' "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    pairs = []
    for serial in ("OK1", "BOOM", "OK2"):
        key = ec.generate_private_key(ec.SECP256R1())
        device, issued = ca.new_factory_identity(key.public_key(), serial, "t", NOW)
        pairs.append((device, issued.record))
    with pytest.raises(sqlite3.IntegrityError, match="injected"):
        registry.register_devices(pairs)
    assert registry.list_devices() == []
    assert registry._db.execute("SELECT COUNT(*) FROM certificates WHERE device_serial IS NOT NULL").fetchone()[0] == 0
    # the registry is still usable, and a retry without the fault succeeds
    registry.register_devices([pairs[0], pairs[2]])
    assert [d.serial for d in registry.list_devices()] == ["OK1", "OK2"]


@pytest.mark.sqlite_only
def test_failure_during_operational_issuance_keeps_previous_state(ca, registry):
    register_device(ca, "SN1")
    first = ca.issue_operational(make_csr()[0], "SN1", NOW)
    registry._db.execute(
        "CREATE TEMP TRIGGER inject AFTER UPDATE OF state ON devices "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END")
    with pytest.raises(sqlite3.IntegrityError):
        ca.issue_operational(make_csr()[0], "SN1", NOW + timedelta(days=1))
    certs = registry.certificates_for_device("SN1")
    assert len(certs) == 2                          # factory + the first operational only
    assert registry.get_certificate(first.cert.serial_number).status is CertStatus.CURRENT


def test_revocation_between_check_and_write_is_caught(ca, registry):
    """The device is revoked after the CA looked it up but before the certificate is recorded."""
    register_device(ca, "SN1")
    issued = ca.sign_device_certificate(make_csr_key(), ca.profiles["operational"], "SN1", "t", NOW)
    registry.revoke_device("SN1", "keyCompromise", NOW)
    with pytest.raises(DeviceRevoked):
        registry.record_certificate(issued.record, supersede_profile="operational", new_state=DeviceState.ENROLLED)
    assert registry.get_certificate(issued.cert.serial_number) is None


def make_csr_key():
    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_revoke_device_revokes_all_its_certificates(ca, registry):
    register_device(ca, "SN1")
    register_device(ca, "SN2")
    ca.issue_operational(make_csr()[0], "SN1", NOW)
    ca.issue_operational(make_csr()[0], "SN1", NOW)
    newly = registry.revoke_device("SN1", "keyCompromise", NOW)
    assert len(newly) == 3
    assert all(c.status is CertStatus.REVOKED and c.revocation_reason == "keyCompromise"
               for c in registry.certificates_for_device("SN1"))
    assert registry.get_device("SN1").state is DeviceState.REVOKED
    assert registry.get_device("SN2").state is DeviceState.MANUFACTURED
    assert registry.revoke_device("SN1", "superseded", NOW + timedelta(hours=1)) == []
    assert registry.get_device("SN1").revocation_reason == "keyCompromise"


def test_crl_numbers_only_grow(registry):
    assert [registry.next_crl_number("manufacturing") for _ in range(3)] == [1, 2, 3]
    assert registry.next_crl_number("operational") == 1


def _reserve(path, n, q):
    reg = SQLiteRegistry(path, create=True)
    q.put([reg.reserve_serial_block("SN", 10) for _ in range(n)])
    reg.close()


def test_serial_blocks_are_disjoint_across_processes(data):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_reserve, args=(data.db_path, 50, q)) for _ in range(3)]
    for p in procs:
        p.start()
    starts = [s for _ in procs for s in q.get(timeout=60)]
    for p in procs:
        p.join(60)
    blocks = sorted(starts)
    assert len(blocks) == 150
    assert all(b - a >= 10 for a, b in zip(blocks, blocks[1:]))


def test_revoked_among_answers_for_many_serials_at_once(ca, registry):
    issued = [register_device(ca, f"SN{i}")[1].cert.serial_number for i in range(6)]
    registry.revoke_device("SN2", "keyCompromise", NOW)
    # a device revoked by state alone (its certificates not touched) is caught too
    sql(registry, "UPDATE devices SET state = 'revoked' WHERE serial = 'SN4'")
    unknown = list(range(1, 1200))          # more than one SQL chunk of unrelated serials
    assert registry.revoked_among(unknown + issued) == {issued[2], issued[4]}
    assert registry.revoked_among([]) == set()

# -- migration 3: certificates rebuilt without UNIQUE on fingerprint ---------------------------------

def _old_database(path, version, records):
    """A registry file as devid wrote it at schema `version` (1 or 2), holding `records`
    [(DeviceRecord, [CertificateRecord, ...])], written with that schema's own SQL."""
    from devid.gateway.store import registry as registry_mod
    con = sqlite3.connect(path)
    con.executescript(";".join(s for v in range(1, version + 1) for s in MIGRATIONS[v]) +
                      f"; PRAGMA user_version = {version};")
    for device, certs in records:
        con.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (device.serial, device.device_type, device.state.value, registry_mod._ts(device.created_at),
                     registry_mod._ts(device.updated_at), None, None, None))
        for c in certs:
            con.execute(f"INSERT INTO certificates ({registry_mod._CERT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        registry_mod._cert_params(c))
    con.execute("INSERT INTO serial_sequences VALUES ('SN', 42)")
    con.execute("INSERT INTO crl_numbers VALUES ('operational', 7)")
    con.commit()
    con.close()


def _fingerprint_is_unique(con) -> bool:
    for (index,) in con.execute("SELECT name FROM pragma_index_list('certificates') WHERE \"unique\" = 1"):
        if [r[0] for r in con.execute("SELECT name FROM pragma_index_info(?)", (index,))] == ["fingerprint"]:
            return True
    return False


@pytest.mark.parametrize("version", [1, 2])
def test_old_schema_migrates_with_its_data(ca, tmp_path, version):
    devices = []
    for serial in ("SN1", "SN2"):
        key = ec.generate_private_key(ec.SECP256R1())
        device, factory = ca.new_factory_identity(key.public_key(), serial, "temperature-sensor", NOW)
        op = ca.sign_device_certificate(make_csr_key(), ca.profiles["operational"], serial, "temperature-sensor",
                                        NOW + timedelta(days=1))
        superseded = replace(ca.sign_device_certificate(make_csr_key(), ca.profiles["operational"], serial,
                                                        "temperature-sensor", NOW).record,
                             status=CertStatus.SUPERSEDED)
        devices.append((device, [factory.record, superseded, op.record]))
    path = tmp_path / f"v{version}.sqlite3"
    _old_database(path, version, devices)
    con = sqlite3.connect(path)
    assert _fingerprint_is_unique(con)
    con.close()

    reg = SQLiteRegistry(path, create=True)
    try:
        assert reg.schema_version == SCHEMA_VERSION == 10
        assert reg._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' "
                               "AND name = 'attestation_nonces_outstanding'").fetchone()
        assert not _fingerprint_is_unique(reg._db)
        assert {r[0] for r in reg._db.execute("SELECT name FROM sqlite_master WHERE type = 'index' "
                                               "AND tbl_name = 'certificates' AND sql IS NOT NULL")} == \
            {"certificates_device", "certificates_revoked", "certificates_expiry",     # (migration 8)
             "certificates_issued"}                                                   # (migration 9)
        assert reg._db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert reg._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # every row, field for field, in the order it was written
        for device, certs in devices:
            assert reg.get_device(device.serial) == device
            assert reg.certificates_for_device(device.serial) == certs
        assert reg.reserve_serial_block("SN", 1) == 42
        assert reg.next_crl_number("operational") == 8
        # the migrated registry works as before: serials unique, fingerprint no longer
        first = devices[0][1][0]
        with pytest.raises(SerialCollision):
            reg.record_certificate(replace(devices[1][1][0], serial=first.serial))
        twin = replace(first, serial=first.serial + 1)
        reg.record_certificate(twin)
        assert reg.get_certificate(twin.serial).fingerprint == first.fingerprint
        issued = ca.with_store(reg).issue_operational(make_csr()[0], "SN2", NOW + timedelta(days=2))
        statuses = [c.status for c in reg.certificates_for_device("SN2") if c.profile == "operational"]
        assert statuses == [CertStatus.SUPERSEDED, CertStatus.SUPERSEDED, CertStatus.CURRENT]
        assert reg.get_certificate(issued.cert.serial_number).der == issued.record.der
    finally:
        reg.close()
    reopened = SQLiteRegistry(path, create=True)        # migrating twice is a no-op
    assert reopened.schema_version == SCHEMA_VERSION and len(reopened.certificates_for_device("SN1")) == 4
    reopened.close()


# -- check and record in one transaction ------------------------------------------------------------

def _building(ca, calls):
    def build(device):
        calls.append(device)
        return ca.sign_device_certificate(make_csr_key(), ca.profiles["operational"], device.serial,
                                          device.device_type, NOW).record
    return build


def test_record_for_device_refuses_a_revoked_device_and_records_nothing(ca, registry):
    register_device(ca, "SN1")
    registry.revoke_device("SN1", "keyCompromise", NOW)
    before = registry.certificates_for_device("SN1")
    calls = []
    with pytest.raises(DeviceRevoked):
        registry.record_for_device("SN1", _building(ca, calls), supersede_profile="operational",
                                   new_state=DeviceState.ENROLLED)
    assert calls == []                              # refused before anything was signed
    with pytest.raises(DeviceRevoked):
        ca.issue_operational(make_csr()[0], "SN1", NOW)
    assert registry.certificates_for_device("SN1") == before
    assert registry.get_device("SN1").state is DeviceState.REVOKED
    assert sql(registry, "SELECT COUNT(*) FROM certificates WHERE profile = 'operational'")[0][0] == 0


def test_record_for_device_unknown_device(ca, registry):
    calls = []
    with pytest.raises(UnknownDevice):
        registry.record_for_device("SN404", _building(ca, calls))
    with pytest.raises(UnknownDevice):
        ca.issue_operational(make_csr()[0], "SN404", NOW)
    assert calls == [] and registry.certificates_for_device("SN404") == []


def test_record_for_device_failure_while_building_records_nothing(ca, registry):
    register_device(ca, "SN1")
    first = ca.issue_operational(make_csr()[0], "SN1", NOW)

    def build(device):
        raise RuntimeError("signing failed")
    with pytest.raises(RuntimeError):
        registry.record_for_device("SN1", build, supersede_profile="operational", new_state=DeviceState.ENROLLED)
    assert [c.serial for c in registry.certificates_for_device("SN1")][-1] == first.cert.serial_number
    assert registry.get_certificate(first.cert.serial_number).status is CertStatus.CURRENT


@pytest.mark.sqlite_only
def test_record_for_device_holds_the_write_lock_from_check_to_commit(ca, registry, data):
    """A revocation from another connection cannot land between the device check and the record:
    while the certificate is being built, the database is locked for other writers."""
    register_device(ca, "SN1")
    other = SQLiteRegistry(data.db_path, timeout=0.05, create=True)
    seen = []

    def build(device):
        seen.append(device.state)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.revoke_device("SN1", "keyCompromise", NOW)
        return _building(ca, [])(device)
    try:
        cert = registry.record_for_device("SN1", build, supersede_profile="operational",
                                          new_state=DeviceState.ENROLLED)
        assert seen == [DeviceState.MANUFACTURED]
        assert other.get_device("SN1").state is DeviceState.ENROLLED
        assert other.get_certificate(cert.serial).status is CertStatus.CURRENT
    finally:
        other.close()


@pytest.mark.sqlite_only
def test_nested_transactions_are_savepoints(registry):
    """A transaction inside another is a savepoint: its failure undoes only its own writes; the
    outer one's failure undoes everything; nothing is left open."""
    registry._db.execute("CREATE TEMP TABLE t (x)")
    with registry.transaction() as db:
        db.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(RuntimeError):
            with registry.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (2)")
                raise RuntimeError("inner fails")
        with registry.transaction() as inner:
            inner.execute("INSERT INTO t VALUES (3)")
    assert [r[0] for r in registry._db.execute("SELECT x FROM t ORDER BY x")] == [1, 3]
    with pytest.raises(RuntimeError):
        with registry.transaction() as db:
            db.execute("INSERT INTO t VALUES (4)")
            with registry.transaction() as inner:
                inner.execute("INSERT INTO t VALUES (5)")
            raise RuntimeError("outer fails")
    assert [r[0] for r in registry._db.execute("SELECT x FROM t ORDER BY x")] == [1, 3]
    assert not registry._db.in_transaction and registry._depth == 0
    with registry.transaction() as db:          # and the next transaction is a real one again
        db.execute("INSERT INTO t VALUES (6)")
    assert [r[0] for r in registry._db.execute("SELECT x FROM t ORDER BY x")] == [1, 3, 6]
