"""Failure 10 of issue 10: an issued certificate must be durable in the registry before it is
written to a bundle or sent to a device, and bundle files fsynced before they are renamed into
place (docs/certificates.md, "What survives a power cut").

The order of the system calls is what decides what survives a power cut, so it is checked on
the real processes with strace: provisioning (files, directories, the registry's WAL, renames)
and the gateway (the WAL sync of the enrollment transaction, then the datagram with the
answer). kill -9 during runs of enrollments then checks that whatever a device received is in
the registry.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.identity import fingerprint
from devid.gateway.app.datadir import DataDir

from . import serve_helpers as H
from .conftest import free_port, run_devid

BUNDLE_FILES = ("key.pem", "cert.pem", "chain.pem", "ca.pem", "secure-element-config.json")


def _is_wal(c: H.Call) -> bool:
    return c.name in ("fsync", "fdatasync") and (c.fd_path or "").endswith("registry.sqlite3-wal")


def test_provisioning_syncs_files_then_registry_then_renames(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    trace = tmp_path / "provision.trace"
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    proc = subprocess.run([*H.strace_prefix(trace, "fsync,fdatasync,rename,renameat,renameat2"), sys.executable,
                           "-m", "devid.gateway.cli", "provision", "--count", "24", "--workers", "2", "--device-type", "t",
                           "--out", str(out), "--quiet"], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    out = Path(os.path.realpath(out))
    calls = H.parse_strace(trace)
    syncs = [c for c in calls if c.name in ("fsync", "fdatasync") and c.result == "0"]
    wal = [c for c in syncs if _is_wal(c)]
    out_syncs = [c for c in syncs if c.fd_path == str(out)]
    renames = {}
    for c in calls:
        if c.name.startswith("rename") and c.result == "0":
            src, dst = c.strings[:2]
            if Path(src).name.startswith(".partial-"):
                renames[Path(dst).name] = c
    reg = DataDir(data_dir).open_registry()
    devices = {d.serial for d in reg.list_devices()}
    reg.close()
    assert len(devices) == 24 and set(renames) == devices
    for serial in sorted(devices):
        partial = out / f".partial-{serial}"
        mine = {name: [c for c in syncs if c.fd_path == str(partial / name)] for name in BUNDLE_FILES}
        mine["."] = [c for c in syncs if c.fd_path == str(partial)]
        missing = [name for name, found in mine.items() if not found]
        assert not missing, f"{serial}: not fsynced: {missing}"
        last_file_sync = max(c.index for found in mine.values() for c in found)
        rename = renames[serial]
        # the files and the partial directory, then OUT (the partial directory's name), then the
        # registry's WAL (the batch's commit), then the rename, then OUT again (the rename)
        assert last_file_sync < rename.start, serial
        out_before = [c for c in out_syncs if last_file_sync < c.index < rename.start]
        assert out_before, f"{serial}: OUT not fsynced between its files and its rename"
        assert [c for c in wal if out_before[0].index < c.index < rename.start], \
            f"{serial}: the registry's WAL was not synced between its bundle files and its rename"
        assert [c for c in out_syncs if c.index > rename.index], f"{serial}: OUT not fsynced after the rename"
    # and the very first rename comes after a WAL sync
    first = min(c.start for c in renames.values())
    assert [c for c in wal if c.index < first]


@pytest.mark.sqlite_only       # SQLite's fsyncs, seen with strace
def test_gateway_syncs_the_enrollment_before_the_answer_leaves(data, tmp_path):
    bundles = H.fleet(data, tmp_path / "factory", 2)
    trace = tmp_path / "serve.trace"
    served = H.serve(data.path, tmp_path / "serve.log",
                     prefix=H.strace_prefix(trace, "fsync,fdatasync,sendto,sendmsg,sendmmsg"))
    windows = []

    async def flow():
        for bundle in bundles:
            dev = H.Device(bundle, served.uri)
            await dev.connect()
            try:
                r = await dev.nonce()
                assert r.code_text == "2.05", r.code_text
                r = await dev.evidence(cbor2.loads(r.payload)["nonce"])
                assert r.code_text == "2.04" and cbor2.loads(r.payload)["acceptable"], r.code_text
                # the window starts after the evidence answer arrived: every send of the earlier
                # steps happened before it
                key = ec.generate_private_key(ec.SECP256R1())
                t0 = time.time()
                r = await dev.enroll(key)
                t1 = time.time()
                assert r.code_text == "2.04", H.loadgen.problem_text(r)
                windows.append((t0, t1, x509.load_der_x509_certificate(r.payload)))
            finally:
                dev.close()
    try:
        asyncio.run(flow())
    finally:
        assert served.stop() == 0
    calls = H.parse_strace(trace)
    for t0, t1, cert in windows:
        inside = [c for c in calls if t0 <= c.time <= t1]
        sends = [c for c in inside if c.name.startswith("send")]
        syncs = [c for c in inside if _is_wal(c)]
        assert sends, "no datagram sent between the request and its answer"
        assert syncs, "the enrollment was answered without syncing the registry's WAL"
        assert syncs[0].index < sends[0].start, "the answer left before the WAL sync completed"
    reg = data.open_registry()
    try:
        for _, _, cert in windows:
            record = reg.get_certificate(cert.serial_number)
            assert record is not None and record.fingerprint == fingerprint(cert)
    finally:
        reg.close()


def test_kill_9_during_enrollments_never_loses_a_delivered_certificate(data, tmp_path):
    """Rounds of enrollments, the gateway killed with SIGKILL after a different number of answers
    each time (so at different points of an enrollment: mid-handshake, between commit and answer,
    ...); afterwards every operational certificate a device received is in the registry."""
    bundles = H.fleet(data, tmp_path / "factory", 36)
    port = free_port()
    delivered: list[tuple[str, x509.Certificate]] = []
    rounds = [bundles[0:12], bundles[12:24], bundles[24:36]]
    kills = 0
    for n, (group, kill_after) in enumerate(zip(rounds, (2, 5, 8))):
        served = H.serve(data.path, tmp_path / f"serve{n}.log", port=port)
        got: list[H.loadgen.Outcome] = []

        async def run_round():
            devices = [H.loadgen.load_device(b) for b in group]
            target = H.loadgen.Target.parse(served.uri)
            trust = H.loadgen.Trust(devices[0].root, target.host)
            await H.loadgen.fetch_ca_certs(target, devices[0], trust, 30)

            in_flight = asyncio.Semaphore(3)   # staggered, so that the kill finds them at different steps

            async def one(dev):
                async with in_flight:
                    try:
                        got.append(await H.loadgen.enroll_device(target, dev, trust, H.FW, timeout=3.0))
                    except H.loadgen.Failed:
                        pass
            tasks = [asyncio.create_task(one(d)) for d in devices]
            deadline = time.monotonic() + 120
            while len(got) < kill_after and time.monotonic() < deadline and not all(t.done() for t in tasks):
                await asyncio.sleep(0.001)
            served.proc.kill()                 # kill -9, whatever it is doing
            await asyncio.gather(*tasks)
        try:
            asyncio.run(run_round())
        finally:
            served.proc.kill()
            served.proc.wait(30)
        kills += 1
        assert got, "no device enrolled before the kill"
        assert len(got) < len(group), "every device enrolled before the kill: it hit nothing"
        delivered += [(o.serial, o.cert) for o in got]
    assert kills == 3
    reg = DataDir(data.path).open_registry()
    try:
        for serial, cert in delivered:
            record = reg.get_certificate(cert.serial_number)
            assert record is not None, f"{serial}: certificate {cert.serial_number:x} delivered but not registered"
            assert record.fingerprint == fingerprint(cert) and record.device_serial == serial
            assert record.profile == "operational"
    finally:
        reg.close()
