"""Crash safety: a provisioning run killed with SIGKILL at a random point leaves no orphan, no
duplicate, and the next run completes what was committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


from devid.gateway.app.datadir import DataDir

from .conftest import check_consistent, run_devid


def test_sigkill_during_provisioning_then_rerun(tmp_path):
    data_dir = tmp_path / "data"
    out = tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    data = DataDir(data_dir)
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    kills = 0
    for extra_delay in (0.0, 0.15, 0.4):
        def finished():
            return {p.name for p in out.iterdir() if not p.name.startswith(".")} if out.exists() else set()
        before = finished()
        proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "provision", "--count", "20000",
                                 "--device-type", "t", "--out", str(out), "--quiet"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill once the run is under way (a first batch is committed), at a different point each time,
        # however slow the machine is
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if finished() - before:          # a batch has been committed and renamed into place
                break
            time.sleep(0.01)
        time.sleep(extra_delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(30)
    assert kills >= 1, "provisioning finished before it could be killed: raise --count"
    # every committed device has its bundle, finished or still partial: nothing committed is lost
    reg = data.open_registry()
    registered = {d.serial for d in reg.list_devices()}
    reg.close()
    committed = len(registered)
    assert committed > 0
    names = {p.name.removeprefix(".partial-") for p in out.iterdir()}
    assert registered <= names
    # a rerun finishes or discards what the killed runs left, then provisions its own devices
    proc = run_devid("provision", "--count", "5", "--device-type", "t", "--out", out, data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert not [p for p in out.iterdir() if p.name.startswith(".partial-")]
    devices = check_consistent(data, out)
    assert len(devices) == committed + 5


def test_recovery_of_partial_bundles(tmp_path):
    """The two crash windows, reproduced exactly: killed after the registry commit but before the
    rename (bundle kept), and killed before the commit (bundle discarded)."""
    data_dir = tmp_path / "data"
    out = tmp_path / "factory"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    assert run_devid("provision", "--count", "3", "--device-type", "t", "--out", out, "--quiet",
                     data_dir=data_dir).returncode == 0
    os.rename(out / "SN00000002", out / ".partial-SN00000002")        # committed, not yet renamed
    orphan = out / ".partial-SN00000099"                              # written, never committed
    orphan.mkdir()
    (orphan / "cert.pem").write_bytes((out / "SN00000001" / "cert.pem").read_bytes())
    (orphan / "key.pem").write_bytes(b"x")
    proc = run_devid("provision", "--count", "1", "--device-type", "t", "--out", out, data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "recovered 1 and discarded 1" in proc.stdout.decode()
    assert (out / "SN00000002" / "cert.pem").exists() and not orphan.exists()
    assert len(check_consistent(DataDir(data_dir), out)) == 4
