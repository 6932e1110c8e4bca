"""Provisioning with several worker processes: unique serials, every registered device with its
bundle, failures and crashes that leave nothing half-done, and the secure-element file format."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from devid.ca.errors import DuplicateDevice
from devid.ca.identity import fingerprint
from devid.gateway.app.datadir import DataDir
from devid.gateway.factory.provisioning import provision, secure_element_config, secure_element_json

from .conftest import NOW, register_device, run_devid
from .conftest import check_consistent

pytestmark = pytest.mark.engines


def _provision(data, registry, out, **kw):
    ca = data.authority(registry)
    kw.setdefault("device_type", "temperature-sensor")
    return provision(ca, out=out, manufacturing_pem=data.cert_pem("manufacturing"),
                     root_pem=data.cert_pem("root"), now=lambda: NOW, **kw)


def test_several_workers_unique_serials_and_a_bundle_per_device(data, registry, tmp_path):
    out = tmp_path / "factory"
    seen = []
    result = _provision(data, registry, out, count=61, batch=5, workers=2,
                        progress=lambda done, total: seen.append((done, total)))
    assert result.serials == [f"SN{n:08d}" for n in range(1, 62)]
    assert seen[-1] == (61, 61) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(seen) == 13                          # one progress call per committed batch of <= 5
    devices = check_consistent(data, out)
    assert len(devices) == 61
    cert_serials = [c.serial for s in devices for c in registry.certificates_for_device(s)]
    assert len(set(cert_serials)) == 61
    # a second run continues the sequence and reuses nothing
    again = _provision(data, registry, out, count=9, batch=2, workers=2)
    assert again.serials == [f"SN{n:08d}" for n in range(62, 71)]
    assert len(check_consistent(data, out)) == 70


def test_bundle_contents_match_the_registry(data, registry, tmp_path):
    out = tmp_path / "factory"
    result = _provision(data, registry, out, count=6, batch=2, workers=2, device_type="valve")
    manufacturing = data.cert_pem("manufacturing")
    for serial in result.serials:
        d = out / serial
        cert = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
        record = registry.get_certificate(cert.serial_number)
        assert record.device_serial == serial and record.profile == "factory"
        assert (d / "chain.pem").read_bytes() == (d / "cert.pem").read_bytes() + manufacturing
        assert (d / "ca.pem").read_bytes() == data.cert_pem("root")
        assert (d / "key.pem").stat().st_mode & 0o777 == 0o600
        config = json.loads((d / "secure-element-config.json").read_text())
        assert config["device_serial"] == serial and config["device_type"] == "valve"
        assert config["certificate"] == {"serial": format(cert.serial_number, "x"),
                                         "sha256_fingerprint": fingerprint(cert),
                                         "not_after": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_secure_element_json_is_the_pretty_json_of_the_config(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    for serial, device_type in (("SN00000001", "temperature-sensor"), ("a.b-C9", "x_y.z-1")):
        device, issued = ca.new_factory_identity(key.public_key(), serial, device_type, NOW + timedelta(seconds=7))
        expected = json.dumps(secure_element_config(serial, device_type, issued.cert), indent=2) + "\n"
        assert secure_element_json(device, issued.record).decode() == expected


def test_failed_batch_stops_the_run_and_leaves_nothing_half_done(data, registry, tmp_path):
    """One batch cannot be registered (its serial is taken): the run fails, no partial directory is
    left, and every device that was registered has its bundle."""
    out = tmp_path / "factory"
    register_device(data.authority(registry), "SN00000011")     # inside the block the run will reserve
    with pytest.raises(DuplicateDevice):
        _provision(data, registry, out, count=40, batch=3, workers=2)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    registered = {d.serial for d in registry.list_devices()} - {"SN00000011"}
    bundles = {p.name for p in out.iterdir()}
    assert bundles == registered
    assert "SN00000010" not in registered and "SN00000012" not in registered   # the failed batch
    for serial in registered:
        on_disk = x509.load_pem_x509_certificate((out / serial / "cert.pem").read_bytes())
        assert [c.fingerprint for c in registry.certificates_for_device(serial)] == [fingerprint(on_disk)]


def test_recovery_with_several_workers(data, registry, tmp_path):
    out = tmp_path / "factory"
    _provision(data, registry, out, count=8, batch=2, workers=2)
    os.rename(out / "SN00000003", out / ".partial-SN00000003")      # committed, not yet renamed
    orphan = out / ".partial-SN00000099"                            # written, never committed
    orphan.mkdir()
    (orphan / "cert.pem").write_bytes((out / "SN00000001" / "cert.pem").read_bytes())
    result = _provision(data, registry, out, count=8, batch=2, workers=2)
    assert (result.recovered, result.discarded) == (1, 1)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(check_consistent(data, out)) == 16


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_with_workers_leaves_no_worker_and_the_rerun_recovers(tmp_path):
    data_dir = tmp_path / "data"
    out = tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", "20000",
                             "--workers", "2", "--device-type", "t", "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        workers |= _children(proc.pid)
        if out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):
            break                                   # a batch is committed and renamed
        time.sleep(0.01)
    workers |= _children(proc.pid)
    assert proc.poll() is None, "provisioning finished before it could be killed: raise --count"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    workers = {w for w in workers if w != proc.pid}
    assert len(workers) >= 2, workers              # the resource tracker may be among them
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if _alive(w)], "a worker outlived the killed parent"
    data = DataDir(data_dir)
    reg = data.open_registry()
    committed = {d.serial for d in reg.list_devices()}
    reg.close()
    assert committed and committed <= {p.name.removeprefix(".partial-") for p in out.iterdir()}
    rerun = run_devid("provision", "--count", "30", "--workers", "2", "--device-type", "t", "--out", out,
                      data_dir=data_dir)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(check_consistent(data, out)) == len(committed) + 30
