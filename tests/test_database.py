"""The registry connection's durability levels (gateway/store/database.py), read back from SQLite."""

from __future__ import annotations

import pytest

from devid.gateway.store.database import SYNC_ENV
from devid.gateway.store.registry import SQLiteRegistry

NORMAL, FULL = 1, 2        # PRAGMA synchronous


def _level(db) -> int:
    return db.execute("PRAGMA synchronous").fetchone()[0]


def test_durable_transactions_run_with_synchronous_full_and_the_others_do_not(tmp_path, monkeypatch):
    monkeypatch.delenv(SYNC_ENV, raising=False)
    reg = SQLiteRegistry(tmp_path / "r.sqlite3", create=True)
    try:
        with reg.transaction() as db:
            assert _level(db) == NORMAL
        with reg.transaction(durable=True) as db:
            assert _level(db) == FULL
            with reg.transaction(durable=True) as inner:       # a savepoint inside: allowed
                assert _level(inner) == FULL
            with reg.transaction() as inner:                   # a plain one inside a durable one too
                assert _level(inner) == FULL
        with reg.transaction() as db:
            assert _level(db) == NORMAL
        # a durable write in a plain transaction would not be durable: refused, and undone
        with pytest.raises(RuntimeError, match="durable"):
            with reg.transaction() as db:
                db.execute("INSERT INTO serial_sequences (prefix, next) VALUES ('X', 5)")
                reg.reserve_serial_block("Y", 1)
        with reg.reading() as db:
            assert db.execute("SELECT COUNT(*) FROM serial_sequences").fetchone()[0] == 0
        # the CA-state writes are durable ones
        seen = []
        reg._db.set_trace_callback(seen.append)
        reg.reserve_serial_block("Z", 3)
        reg.next_crl_number("root")
        reg._db.set_trace_callback(None)
        assert seen.count("PRAGMA synchronous=FULL") == 1       # switched once for both
        assert seen.index("PRAGMA synchronous=FULL") < seen.index("BEGIN IMMEDIATE")
    finally:
        reg.close()


@pytest.mark.parametrize("mode, plain, durable", [("normal", NORMAL, NORMAL), ("full", FULL, FULL)])
def test_the_benchmark_switch(tmp_path, monkeypatch, mode, plain, durable):
    """DEVID_BENCH_SYNCHRONOUS, for `devid bench --durability` only: no durable commits at all
    (the baseline), or every commit durable (the alternative that was measured)."""
    monkeypatch.setenv(SYNC_ENV, mode)
    reg = SQLiteRegistry(tmp_path / "r.sqlite3", create=True)
    try:
        with reg.transaction() as db:
            assert _level(db) == plain
        with reg.transaction(durable=True) as db:
            assert _level(db) == durable
    finally:
        reg.close()


def test_a_snapshot_sees_one_state_while_another_connection_commits(tmp_path):
    path = tmp_path / "r.sqlite3"
    reg = SQLiteRegistry(path, create=True)
    other = SQLiteRegistry(path, create=True)
    try:
        with reg.snapshot() as db:
            before = db.execute("SELECT COUNT(*) FROM crl_numbers").fetchone()[0]
            other.next_crl_number("root")                  # committed by another connection
            assert db.execute("SELECT COUNT(*) FROM crl_numbers").fetchone()[0] == before
        with reg.reading() as db:                          # after the snapshot: the new state
            assert db.execute("SELECT COUNT(*) FROM crl_numbers").fetchone()[0] == before + 1
    finally:
        other.close()
        reg.close()
