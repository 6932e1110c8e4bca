"""The SQLite registry: schema, uniqueness, transactions that leave nothing half-done."""

from __future__ import annotations

import multiprocessing
import sqlite3
from dataclasses import replace
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from ca.errors import DeviceRevoked, DuplicateDevice, SerialCollision
from ca.store import CertStatus, DeviceState
from gateway.registry import SCHEMA_VERSION, RegistryError, SQLiteRegistry

from .conftest import NOW, make_csr, register_device


def test_schema_is_versioned_and_wal(registry):
    assert registry.schema_version == SCHEMA_VERSION
    assert registry._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    SQLiteRegistry(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(RegistryError, match="newer"):
        SQLiteRegistry(path)


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "r.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RegistryError, match="cannot open"):
        SQLiteRegistry(path)


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
    reg = SQLiteRegistry(path)
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
    registry._db.execute("UPDATE devices SET state = 'revoked' WHERE serial = 'SN4'")
    unknown = list(range(1, 1200))          # more than one SQL chunk of unrelated serials
    assert registry.revoked_among(unknown + issued) == {issued[2], issued[4]}
    assert registry.revoked_among([]) == set()
