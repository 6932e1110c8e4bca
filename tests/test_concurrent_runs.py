"""Failure 7 of issue 10: two `devid provision` runs into one output directory lost keys (the
second run's recovery removed the first one's bundles in progress), and two `devid init` at once
gave tracebacks. Now a run holds a lock on the directory: a second provisioning run refuses with
one line naming the first, a second init waits and then finds the first one's CA."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from devid.ca import keys
from devid.ca.identity import fingerprint
from devid.gateway.app.datadir import DataDir

from .conftest import run_devid

pytestmark = pytest.mark.engines

BUNDLE_FILES = ["ca.pem", "cert.pem", "chain.pem", "key.pem", "secure-element-config.json"]


def _env(data_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    return env


# a devid command through the CLI's own entry point, started on a signal: Python's start-up and
# imports take longer than the racy steps, so processes merely started together barely overlap
ON_GO = ("import sys; import devid.gateway.cli.dispatch as cli; print('ready', flush=True); sys.stdin.read(1); "
         "sys.exit(cli.main({args!r}))")


def _go(procs) -> None:
    for p in procs:
        assert p.stdout.readline() == b"ready\n"
    for p in procs:
        p.stdin.write(b"g")
        p.stdin.flush()


def _provision(data_dir, out, count: int, prefix: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", str(count),
                             "--workers", "2", "--device-type", "t", "--serial-prefix", prefix, "--out", str(out),
                             "--quiet"], env=_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def check_every_device_has_its_bundle(data_dir, out) -> set[str]:
    """Every registered device has a complete bundle whose key belongs to its registered
    certificate; no bundle without a device; nothing partial left."""
    reg = DataDir(data_dir).open_registry()
    try:
        devices = {d.serial for d in reg.list_devices()}
        entries = {p.name for p in out.iterdir()}
        assert not [e for e in entries if e.startswith(".partial-")], sorted(entries)[:5]
        assert entries == devices, (sorted(devices - entries)[:5], sorted(entries - devices)[:5])
        for serial in devices:
            bundle = out / serial
            assert sorted(p.name for p in bundle.iterdir()) == BUNDLE_FILES, serial
            cert = x509.load_pem_x509_certificate((bundle / "cert.pem").read_bytes())
            [record] = reg.certificates_for_device(serial)
            assert record.fingerprint == fingerprint(cert)
            key = keys.load_plain_key(bundle / "key.pem")
            assert key.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo) == \
                cert.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return devices
    finally:
        reg.close()


def _one_line_refusal(stderr: bytes, first_pid: int | None, out) -> None:
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("devid: error: another devid provision"), text
    assert str(out) in lines[0], text
    if first_pid is not None:
        assert f"pid {first_pid}" in lines[0], text


def test_a_second_provisioning_run_into_the_same_directory_refuses_and_nothing_is_lost(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    first = _provision(data_dir, out, 3000, "AA")
    # once the first run is writing (a bundle in progress or done), start the second
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if out.exists() and any(out.iterdir()):
            break
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second could start: raise its --count"
    second = _provision(data_dir, out, 500, "BB")
    _, err2 = second.communicate(timeout=120)
    still_running = first.poll() is None
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1.decode()
    assert still_running, "the first run ended before the second one was refused: raise its --count"
    assert second.returncode == 1
    _one_line_refusal(err2, first.pid, out)
    devices = check_every_device_has_its_bundle(data_dir, out)
    assert len(devices) == 3000 and all(s.startswith("AA") for s in devices)
    # once the first run is over, the directory is free again
    proc = run_devid("provision", "--count", "7", "--device-type", "t", "--serial-prefix", "BB", "--out", out,
                     "--quiet", data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(check_every_device_has_its_bundle(data_dir, out)) == 3007


def test_two_provisioning_runs_started_together_lose_nothing(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    out.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", ON_GO.format(args=[
        "provision", "--count", "400", "--workers", "2", "--device-type", "t", "--serial-prefix", p, "--out", str(out),
        "--quiet"])], env=_env(data_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for p in ("AA", "BB")]
    _go(runs)
    results = [(r.returncode, err) for r in runs for _, err in [r.communicate(timeout=600)]]
    finished = [p for p, (code, _) in zip(("AA", "BB"), results) if code == 0]
    assert finished, [err.decode() for _, err in results]
    for code, err in results:
        if code != 0:
            assert code == 1
            _one_line_refusal(err, None, out)
    devices = check_every_device_has_its_bundle(data_dir, out)
    assert len(devices) == 400 * len(finished)
    assert {s[:2] for s in devices} == set(finished)


def test_inits_at_once_make_one_ca_and_clean_errors(tmp_path):
    """Four at once, three times: more chances for the interleavings that used to fail."""
    for attempt in range(3):
        data_dir = tmp_path / f"data{attempt}"
        procs = [subprocess.Popen([sys.executable, "-c", ON_GO.format(args=["init"])], env=_env(data_dir),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(4)]
        _go(procs)
        results = [(p.returncode, out.decode(), err.decode()) for p in procs
                   for out, err in [p.communicate(timeout=120)]]
        assert sorted(code for code, _, _ in results) == [0, 1, 1, 1], results
        for code, out, err in results:
            assert "Traceback" not in err, err
            if code == 1:
                lines = err.strip().splitlines()
                assert lines == [f"devid: error: a CA already exists in {data_dir}: refusing to overwrite it"], err
            else:
                assert out.startswith(f"created CA in {data_dir}"), out
        # one complete CA, recorded once; nothing half-made left behind
        data = DataDir(data_dir).require()
        names = sorted(p.name for p in data_dir.iterdir())
        assert names == ["ca", "devid.toml", "registry.sqlite3", "registry.sqlite3-shm", "registry.sqlite3-wal"] \
            or names == ["ca", "devid.toml", "registry.sqlite3"], names
        reg = data.open_registry()
        try:
            with reg.reading() as db:
                serials = [r[0] for r in db.execute("SELECT serial FROM certificates")]
        finally:
            reg.close()
        on_disk = {format(data.cert(n).serial_number, "x") for n in ("root", "manufacturing", "operational",
                                                                      "gateway")}
        assert sorted(serials) == sorted(on_disk)
        data.issuer("operational")          # the key on disk decrypts and matches its certificate
