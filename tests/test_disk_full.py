"""The "disk full" part of issue 10: a full file system under the registry is reported as such
(5.03 "storage full, try again later" with Max-Age, one warning per burst in the log), not as
"registry busy", and the gateway recovers by itself when space returns.

The full file system is real: a small tmpfs mounted for the test (this needs root, as the test
suite runs here; a test that cannot mount fails). The data directory lives on it, the device
bundles do not.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sqlite3
import subprocess
from pathlib import Path

import aiocoap
import cbor2
import pytest
from aiocoap.numbers import codes

from devid.gateway.device.client import device_context
from devid.gateway.app.datadir import DataDir
from devid.gateway.device.enroll import enroll, fetch_config
from devid.gateway.service.problems import to_response
from devid.gateway.store.registry import SQLiteRegistry
from devid.gateway.system.logs import fields_of
from devid.gateway.store.storage import StorageHealth

from . import serve_helpers as H
from .conftest import NOW, make_csr


@pytest.fixture
def small_fs(tmp_path):
    """A real 8 MiB file system (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "devid-test", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full, to the last byte it takes."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def _problem(response) -> tuple[str, str, int | None]:
    assert response.opt.content_format == 257, response
    return str(response.code), cbor2.loads(response.payload)[-1], response.opt.max_age


def _storage_lines(log: Path) -> list[dict]:
    lines = []
    text = log.read_text()
    for line in text[:text.rfind("\n") + 1].splitlines():     # complete lines only: the gateway is writing
        obj = json.loads(line)          # every log line is one JSON object (docs/gateway.md#logs)
        if obj["logger"] == "devid.gateway" and obj["event"] == "storage":
            lines.append(obj)
    return lines


def test_a_full_disk_is_reported_as_such_and_the_gateway_recovers(small_fs, tmp_path, monkeypatch):
    monkeypatch.delenv("DEVID_CA_PASSPHRASE", raising=False)
    data = DataDir(small_fs / "data")
    data.init(NOW)
    bundles = H.fleet(data, tmp_path / "factory", 2)
    served = H.serve(data.path, tmp_path / "serve.log")
    uri = served.uri
    try:
        async def scenario():
            await enroll(bundles[0], uri, H.FW)              # all is well before the disk fills
            # the second device attests, then the disk fills before it asks for its certificate
            ctx, _ = await device_context(bundles[1], "127.0.0.1")
            try:
                async def ask(code, path, **kw):
                    return await asyncio.wait_for(ctx.request(aiocoap.Message(code=code, uri=uri + path, **kw))
                                                  .response, 30)
                nonce = cbor2.loads((await ask(codes.GET, "/attest/nonce")).payload)["nonce"]
                token = H.evidence_token(H.loadgen.load_device(bundles[1]), nonce)
                r = await ask(codes.POST, "/attest/evidence", payload=token, content_format=60)
                assert cbor2.loads(r.payload)["acceptable"] is True
                filler = fill(small_fs)
                csr = make_csr()[0]
                refused = [await ask(codes.POST, "/.well-known/est/sen", payload=csr, content_format=286)]
                refused += [await ask(codes.GET, "/attest/nonce") for _ in range(5)]
                for r in refused:
                    assert r.code == codes.SERVICE_UNAVAILABLE, r
                    assert _problem(r) == ("5.03 Service Unavailable", "storage full, try again later", 60)
                # reading still works: the enrolled device gets its configuration
                config = await fetch_config(bundles[0], uri)
                assert config["device"] == bundles[0].name
                lines = _storage_lines(served.log)
                assert len(lines) == 1, lines                # one line for the burst, not one per request
                assert lines[0]["result"] == "full" and lines[0]["path"] == str(data.db_path)
                # space returns: the same session gets its certificate with the verdict it had
                # (the refused issuance used nothing up), without a restart of the gateway
                filler.unlink()
                r = await ask(codes.POST, "/.well-known/est/sen", payload=csr, content_format=286)
                assert r.code == codes.CHANGED, r.payload
            finally:
                await ctx.shutdown()
            await enroll(bundles[1], uri, H.FW)              # and a whole enrollment works again
        asyncio.run(scenario())
        lines = _storage_lines(served.log)
        assert [line["result"] for line in lines] == ["full", "recovered"], lines
        assert lines[1]["refused"] >= 6
        assert "registry busy" not in served.log.read_text()
    finally:
        assert served.stop() == 0
    assert "Traceback" not in served.log.read_text()
    reg = data.open_registry()
    try:
        assert {d.serial for d in reg.list_devices() if d.state.value == "enrolled"} == {b.name for b in bundles}
    finally:
        reg.close()


def test_storage_errors_map_to_their_own_answers(small_fs, tmp_path):
    """Real SQLite errors, each mapped: full, read-only, busy."""
    # full: a database on the small file system, filled
    db = sqlite3.connect(str(small_fs / "x.sqlite3"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    fill(small_fs)
    with pytest.raises(sqlite3.OperationalError) as full:
        db.execute("INSERT INTO t VALUES (?)", (os.urandom(8000),))
    db.close()
    # read-only: a connection opened read-only
    path = tmp_path / "y.sqlite3"
    sqlite3.connect(str(path)).execute("CREATE TABLE t (x)").connection.commit()
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    with pytest.raises(sqlite3.OperationalError) as read_only:
        ro.execute("INSERT INTO t VALUES (1)")
    # busy: another connection holds the write lock
    holder = sqlite3.connect(str(path), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    waiter = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError) as busy:
        waiter.execute("BEGIN IMMEDIATE")
    holder.execute("ROLLBACK")
    for exc, title, max_age in ((full.value, "storage full, try again later", 60),
                                (read_only.value, "storage read-only, try again later", 60),
                                (busy.value, "registry busy, try again", 1),
                                (OSError(errno.ENOSPC, "No space left on device"), "storage full, try again later",
                                 60)):
        m = to_response(exc)
        assert (m.code, cbor2.loads(m.payload), m.opt.max_age) == (codes.SERVICE_UNAVAILABLE, {-1: title}, max_age), \
            exc


def test_the_registry_logs_one_line_per_burst(small_fs, caplog):
    reg = SQLiteRegistry(small_fs / "registry.sqlite3", create=True)
    log = logging.getLogger("devid.test-storage")
    reg.health = StorageHealth(log, str(reg.path))
    filler = fill(small_fs)
    caplog.set_level(logging.WARNING, logger="devid.test-storage")
    for _ in range(5):
        with pytest.raises(sqlite3.OperationalError):
            reg.reserve_serial_block("P" + "x" * 3000, 1)      # a row bigger than what is left
    assert [fields_of(r)["result"] for r in caplog.records] == ["full"]
    filler.unlink()
    assert reg.reserve_serial_block("P", 1) == 1
    assert reg.reserve_serial_block("P", 1) == 2
    results = [fields_of(r) for r in caplog.records]
    assert [r["result"] for r in results] == ["full", "recovered"]
    assert results[1]["refused"] == 5
    reg.close()
