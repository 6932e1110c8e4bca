"""The README's main-job command, run as a user runs it (the setup script included)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_demo_runs_the_main_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(tmp_path / "data")
    proc = subprocess.run([str(ROOT / "scripts" / "demo"), "--count", "2"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "creating one" in proc.stdout and "verdict affirming" in proc.stdout
    assert "registry totals: 1 enrolled, 1 revoked" in proc.stdout
    assert "Traceback" not in proc.stderr
