"""The README's main-job command, run as a user runs it (the setup script included), and the
walk-through of its "Using devid" section, every command as written."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_scripts_demo_runs_the_main_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(tmp_path / "data")
    proc = subprocess.run([str(ROOT / "scripts" / "demo"), "--count", "2"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "creating one" in proc.stdout and "verdict affirming" in proc.stdout
    assert "registry totals: 1 enrolled, 1 revoked" in proc.stdout
    assert "published to devices/DEMO00000001/telemetry" in proc.stdout and "refused by the broker" in proc.stdout
    assert "Traceback" not in proc.stderr


# -- "Using devid": the walk-through, as written ------------------------------------------------------

MARKER = "<!-- walkthrough:"
PORT_LINE = re.compile(r"^GW=127\.0\.0\.1:5684(?=\s|$)")      # the one variable the section documents


def walkthrough_commands(readme: str) -> list[str]:
    """The commands of the block after the walk-through marker in "## Using devid": every line
    that starts with "$ ", with its continuation lines (a line ending in a backslash); the other
    lines are output."""
    section = readme[readme.index("\n## Using devid\n"):]
    section = section[:section.index("\n## ", 1)]
    block = section[section.index(MARKER):]
    block = block[block.index("```console\n") + len("```console\n"):]
    block = block[:block.index("```")]
    commands: list[str] = []
    continued = False
    for line in block.splitlines():
        if continued:
            commands[-1] += "\n" + line
        elif line.startswith("$ "):
            commands.append(line[2:])
        continued = (continued or line.startswith("$ ")) and line.endswith("\\")
    return commands


def _pseudo_checkout(tmp_path: Path) -> Path:
    """A checkout to run the section in: links to every top-level entry of this one (the section
    reads .venv and docs/), but none of the outputs a user's earlier runs may have left."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {"devid-data", "bench-out", ".pytest_cache"}:
            (checkout / entry.name).symlink_to(entry)
    return checkout


def _group_gone(pgid: int, timeout: float) -> bool:
    """No process is left in process group `pgid` (waited for up to `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def test_using_devid_walkthrough_ends_with_an_enrolled_device(tmp_path):
    """Every command of the README's walk-through, in order, in one bash, as a newcomer types
    them: from the checkout (here after the demo made ./devid-data, the case where `devid init`
    used to refuse), with HOME a temporary directory and GW a free port. The device ends enrolled
    and renewed in the registry, the gateway the section started is stopped by the section, and
    the checkout gets no new file."""
    commands = walkthrough_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("devid serve") and c.rstrip().split("#")[0].rstrip().endswith("&") for c in commands)
    ports = [i for i, c in enumerate(commands) if PORT_LINE.match(c)]
    assert len(ports) == 1, commands
    commands[ports[0]] = PORT_LINE.sub(f"GW=127.0.0.1:{free_port()}", commands[ports[0]])
    assert (ROOT / ".venv" / "bin" / "devid").exists(), "run ./scripts/setup first: the section uses .venv"

    checkout = _pseudo_checkout(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DEVID_CA_PASSPHRASE", "DEVID_DATA", "VIRTUAL_ENV")}
    env["HOME"] = str(home)
    # the demo ran before: ./devid-data holds a CA
    demo = subprocess.run([str(ROOT / ".venv" / "bin" / "devid"), "--data", str(checkout / "devid-data"), "init"],
                          capture_output=True, text=True, env=env, cwd=checkout, timeout=120)
    assert demo.returncode == 0, demo.stderr
    before = sorted(p.name for p in checkout.iterdir())
    demo_data = sorted(str(p.relative_to(checkout)) for p in (checkout / "devid-data").rglob("*"))

    script = tmp_path / "walkthrough.sh"
    script.write_text("\n".join(commands) + "\n")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        # its own process group: whatever the section leaves running is found (and ended) below
        proc = subprocess.Popen(["bash", "-e", "-x", str(script)], stdout=o, stderr=e, env=env, cwd=checkout,
                                start_new_session=True)
    try:
        code = proc.wait(timeout=300)
        stopped = _group_gone(proc.pid, 60)     # the section's `kill` of its gateway: a clean stop takes a moment
    finally:
        if proc.poll() is None or not _group_gone(proc.pid, 0):
            os.killpg(proc.pid, signal.SIGKILL)     # a failed run: end its gateway too
            proc.wait(30)
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert stopped, "the gateway the section started is still running after its last command"
    assert "Traceback" not in stderr
    assert "OK: device TS00000001 holds operational certificate" in stdout and "OK: renewed" in stdout
    assert "devid gateway: stopped" in stdout

    tour = home / "devid-tour"
    show = subprocess.run([str(ROOT / ".venv" / "bin" / "devid"), "--data", str(tour / "data"), "devices", "show",
                           "TS00000001", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert show.returncode == 0, show.stderr
    device = json.loads(show.stdout)
    assert device["state"] == "enrolled"
    operational = [c["status"] for c in device["certificates"] if c["profile"] == "operational"]
    assert sorted(operational) == ["current", "superseded"]          # enrolled, then renewed
    bundle = tour / "factory" / "TS00000001"
    assert json.loads((bundle / "config.json").read_text())["device"] == "TS00000001"   # the config fetched
    log = [json.loads(line) for line in (tour / "gateway.log").read_text().splitlines()]
    # the one-request flow: the evidence in the CSR, the configuration in the same answer
    decisions = [line for line in log if line["logger"] == "devid.enrollment"]
    assert [(line["event"], line["result"]) for line in decisions][:2] == [("evidence", "affirming"), ("enroll", "issued")]
    assert decisions[0]["via"] == "csr" and decisions[1]["config"] is True

    # nothing written into the checkout, nor into the demo's data directory
    assert sorted(p.name for p in checkout.iterdir()) == before
    assert sorted(str(p.relative_to(checkout)) for p in (checkout / "devid-data").rglob("*")) == demo_data
