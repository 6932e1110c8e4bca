"""A simulated power cut: what docs/certificates.md says survives one, does.

The data lives on an ext4 file system in a file, mounted through a loop device (root, as the
test suite runs here; a test that cannot mount fails). What the loop device has written to its
backing file is what a disk would hold; what is only in the page cache of the mounted file
system is not there yet. So a copy of the backing file taken while devid is frozen (SIGSTOP)
is the disk as a power cut at that instant would leave it, and mounting the copy replays the
file system's journal as a reboot would. Before the timed part, `sync -f` puts the set-up (CA,
registry) on disk, as it would be on a machine that has been running for a while.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca import keys
from devid.ca.identity import fingerprint
from devid.gateway.app.datadir import DataDir

from . import serve_helpers as H
from .conftest import NOW

BUNDLE_FILES = ["ca.pem", "cert.pem", "chain.pem", "key.pem", "secure-element-config.json"]


def _run(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)}: {proc.stderr.strip()} (the power-cut tests need root and loop devices)")


class Disk:
    """An ext4 file system in `image`, mounted at `mount`."""

    def __init__(self, image: Path, mount: Path) -> None:
        self.image, self.mount = image, mount
        self.copies: list[Disk] = []
        mount.mkdir()
        _run("mount", "-o", "loop", str(image), str(mount))

    def umount(self) -> None:
        for d in self.copies:
            d.umount()
        subprocess.run(["umount", str(self.mount)], capture_output=True)

    def sync(self) -> None:
        _run("sync", "-f", str(self.mount))

    def power_cut(self, into: Path) -> "Disk":
        """The disk as a power cut now would leave it, mounted at `into` (journal replayed)."""
        copy = into.with_suffix(".img")
        _run("cp", "--sparse=always", str(self.image), str(copy))
        self.copies.append(Disk(copy, into))
        return self.copies[-1]


@pytest.fixture
def disk(tmp_path):
    image = tmp_path / "disk.img"
    _run("truncate", "-s", "96M", str(image))
    _run("mkfs.ext4", "-q", "-F", str(image))
    d = Disk(image, tmp_path / "disk")
    try:
        yield d
    finally:
        d.umount()


def _env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    return env


def _complete(bundle: Path, record) -> bool:
    """All five files, the certificate the registry holds, the key that goes with it."""
    try:
        if sorted(p.name for p in bundle.iterdir()) != BUNDLE_FILES:
            return False
        cert = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
        key = keys.load_plain_key(bundle / "key.pem")
    except (OSError, ValueError, keys.KeyFileError):
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (fingerprint(cert) == record.fingerprint and
            key.public_key().public_bytes(serialization.Encoding.DER, spki) ==
            cert.public_key().public_bytes(serialization.Encoding.DER, spki))


def test_power_cut_during_provisioning(disk, tmp_path):
    data_dir, out = disk.mount / "data", disk.mount / "factory"
    DataDir(data_dir).init(NOW)
    disk.sync()
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", "20000", "--workers", "2",
                             "--device-type", "t", "--out", str(out), "--quiet"], env=_env(data_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and sum(1 for p in out.iterdir() if not p.name.startswith(".")) >= 200:
                break                                   # batches committed and renamed
            time.sleep(0.01)
        assert proc.poll() is None, "provisioning ended before the power cut: raise --count"
        os.killpg(proc.pid, signal.SIGSTOP)              # the instant of the power cut
        after = disk.power_cut(tmp_path / "after")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    snap_data, snap_out = after.mount / "data", after.mount / "factory"
    reg = DataDir(snap_data).open_registry()
    try:
        records = {d.serial: reg.certificates_for_device(d.serial) for d in reg.list_devices()}
    finally:
        reg.close()
    entries = {p.name: p for p in snap_out.iterdir()}
    final = {name for name in entries if not name.startswith(".")}
    assert final, "nothing provisioned survived"
    # every bundle in its final place is registered, with all its files
    for serial in final:
        assert serial in records, f"{serial}: a shipped bundle the registry does not know"
        assert _complete(entries[serial], records[serial][0]), f"{serial}: incomplete after the power cut"
    # every registered device has its complete bundle, final or still partial
    for serial, certs in records.items():
        bundle = entries.get(serial) or entries.get(f".partial-{serial}")
        assert bundle is not None and _complete(bundle, certs[0]), f"{serial}: registered, bundle lost"
    # and the next run into that directory finishes what was cut off, losing nothing
    rerun = subprocess.run([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", "3", "--device-type", "t",
                            "--out", str(snap_out), "--quiet"], env=_env(snap_data), capture_output=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    reg = DataDir(snap_data).open_registry()
    try:
        devices = {d.serial: reg.certificates_for_device(d.serial)[0] for d in reg.list_devices()}
    finally:
        reg.close()
    names = {p.name for p in snap_out.iterdir()}
    assert names == set(devices) and len(devices) == len(records) + 3
    assert all(_complete(snap_out / s, r) for s, r in devices.items())


def test_power_cut_right_after_the_gateway_answers(disk, tmp_path):
    data = DataDir(disk.mount / "data")
    data.init(NOW)
    bundles = H.fleet(data, tmp_path / "factory", 3)      # the devices' side is not on this disk
    served = H.serve(data.path, tmp_path / "serve.log")
    disk.sync()
    delivered: list[x509.Certificate] = []

    async def enroll_all():
        for bundle in bundles:
            dev = H.Device(bundle, served.uri)
            await dev.connect()
            try:
                r = await dev.nonce()
                r = await dev.evidence(cbor2.loads(r.payload)["nonce"])
                assert r.code_text == "2.04", r.code_text
                r = await dev.enroll(ec.generate_private_key(ec.SECP256R1()))
                assert r.code_text == "2.04", H.loadgen.problem_text(r)
                delivered.append(x509.load_der_x509_certificate(r.payload))
            finally:
                dev.close()
    try:
        asyncio.run(enroll_all())
        served.proc.send_signal(signal.SIGSTOP)           # the power cut, right after the last answer
        after = disk.power_cut(tmp_path / "after")
    finally:
        served.proc.kill()
        served.proc.wait(30)
    reg = DataDir(after.mount / "data").open_registry()
    try:
        for cert in delivered:
            record = reg.get_certificate(cert.serial_number)
            assert record is not None, f"certificate {cert.serial_number:x} was delivered, then lost in the power cut"
            assert record.fingerprint == fingerprint(cert) and record.profile == "operational"
    finally:
        reg.close()
