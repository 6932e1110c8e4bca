"""`devid serve` reloads its attestation policy on SIGHUP and when the file changes (issue 12
item 10): against the real `devid serve` process, one worker and two, with real enrollments over
DTLS by `devid enroll`. Every wait is on a logged event (docs/gateway.md#logs), never a sleep.
The unit tests at the end hold the file watch's rules on a real file without a gateway."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from devid.attestation.policy import parse_policy
from devid.gateway.app.policy_reload import PolicyFile, _stamp
from devid.gateway.app.server import POLICY_FILE
from devid.gateway.device.enroll import Firmware
from devid.gateway.factory.provisioning import provision

from .conftest import NOW, run_devid
from .gateway_helpers import FW as FW_A

FW_B = Firmware("sha-256", hashlib.sha256(b"sensor firmware 3.2.0").digest(), "sensor-fw", "3.2.0")


def policy_text(*firmware: Firmware, broken: bool = False) -> str:
    text = "version = 1\n[device_types.temperature-sensor]\n"
    for fw in firmware:
        digest = fw.digest.hex()[:-2] if broken and fw is firmware[-1] else fw.digest.hex()
        text += (f'[[device_types.temperature-sensor.firmware]]\nname = "{fw.name}"\nversion = "{fw.version}"\n'
                 f'digest = "sha-256:{digest}"\n')
    return text


def replace_file(path: Path, text: str) -> None:
    """As a careful operator (or config management) does: a new file renamed into place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Served:
    """A running `devid serve --log-file LOG`, and its log lines read so far."""

    proc: subprocess.Popen
    uri: str
    log: Path
    lines: list = field(default_factory=list)

    def read(self) -> list[dict]:
        text = self.log.read_text()
        complete = text[:text.rfind("\n") + 1]
        self.lines = [json.loads(line) for line in complete.splitlines()]
        return self.lines

    def mark(self) -> int:
        return len(self.read())

    def wait_for(self, want, after: int, count: int = 1, timeout: float = 60.0) -> list[dict]:
        """The first `count` log lines after line `after` for which `want(line)` holds, waited
        for (polled) until `timeout`; the gateway must keep running meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.read()[after:] if want(line)]
            if len(found) >= count:
                return found[:count]
            assert self.proc.poll() is None, f"devid serve exited ({self.proc.returncode}): {self.lines[-5:]}"
            assert time.monotonic() < deadline, f"no such log line within {timeout} s: {self.lines[after:][-10:]}"
            time.sleep(0.05)

    def policy_events(self, result: str, trigger: str, after: int, workers: int) -> list[dict]:
        """One `policy` line of `result` and `trigger` from every worker."""
        seen: dict[int, dict] = {}

        def want(line):
            if line["event"] == "policy" and line["result"] == result and line.get("trigger") == trigger:
                seen.setdefault(line.get("worker", 0), line)
            return len(seen) == workers
        self.wait_for(want, after)
        return list(seen.values())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


@pytest.fixture
def gateway(data, tmp_path):
    """Start `devid serve` on the test data directory (127.0.0.1, a kernel-chosen port) once the
    test has written its policy: `gateway(workers)`; stopped (SIGTERM, exit status 0) after."""
    started: list[Served] = []

    def start(workers: int = 1) -> Served:
        log = tmp_path / f"gateway-{len(started)}.log"
        env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
        env["DEVID_DATA"] = str(data.path)
        proc = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", "127.0.0.1:0",
                                 "--workers", str(workers), "--log-file", str(log)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        served = Served(proc, "", log)
        started.append(served)
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline().decode() if ready else ""
        m = re.search(r"coaps://127\.0\.0\.1:(\d+)", line)
        assert m, f"devid serve did not start: {line!r} {proc.stderr.read1().decode() if ready else ''}"
        served.uri = f"coaps://127.0.0.1:{m.group(1)}"
        return served
    yield start
    for served in started:
        code = served.stop()
        err = served.proc.stderr.read().decode()
        assert code == 0 and err == "", (code, err)
        assert "Traceback" not in served.log.read_text()


@pytest.fixture
def devices(data, ca, tmp_path):
    """Temperature sensors, provisioned (factory bundles), handed out one at a time."""
    out = tmp_path / "factory"
    provision(ca, count=24, device_type="temperature-sensor", out=out, serial_prefix="RL", now=lambda: NOW,
              manufacturing_pem=data.cert_pem("manufacturing"), root_pem=data.cert_pem("root"))
    return iter(sorted(out.iterdir()))


def enroll(served: Served, bundle: Path, fw: Firmware) -> tuple[subprocess.CompletedProcess, dict]:
    """`devid enroll` of one device with firmware `fw`: the command's result and the gateway's
    `evidence` decision for it."""
    mark = served.mark()
    proc = run_devid("enroll", "--gateway", served.uri, "--device", bundle, "--firmware-digest", fw.digest.hex(),
                     "--firmware-name", fw.name, "--firmware-version", fw.version)
    line, = served.wait_for(lambda l: l["event"] == "evidence" and l.get("serial") == bundle.name, mark)
    return proc, line


def decisions_on_every_worker(served: Served, devices, fw: Firmware, workers: int) -> dict[int, tuple]:
    """Enroll new devices with `fw` until each worker has decided on one (the kernel picks the
    worker of each new peer address, SO_REUSEPORT): {worker: (devid enroll's result, evidence line)}."""
    decided: dict[int, tuple] = {}
    for attempt in range(20):
        proc, line = enroll(served, next(devices), fw)
        decided.setdefault(line.get("worker", 0), (proc, line))
        if len(decided) == workers:
            return decided
    pytest.fail(f"20 enrollments reached only workers {sorted(decided)}")


def assert_refused(proc, line) -> None:
    assert proc.returncode != 0, proc.stdout.decode()
    assert "enrollment failed" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    assert line["result"] == "contraindicated" and "firmware-unknown" in line["reasons"], line


def assert_enrolled(proc, line) -> None:
    assert proc.returncode == 0, proc.stderr.decode()
    assert line["result"] == "affirming" and line["acceptable"] is True, line
    assert "OK: device" in proc.stdout.decode()


def device_state(data, serial: str) -> str:
    proc = run_devid("devices", "show", serial, "--json", data_dir=data.path, check=True)
    return json.loads(proc.stdout)["state"]


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_reloads_the_policy_in_every_worker(data, gateway, devices, workers):
    policy = data.path / POLICY_FILE
    policy.write_text(policy_text(FW_A))
    served = gateway(workers)
    proc, line = enroll(served, next(devices), FW_B)
    assert_refused(proc, line)                      # firmware B is not in the policy

    mark = served.mark()
    replace_file(policy, policy_text(FW_A, FW_B))
    served.proc.send_signal(signal.SIGHUP)          # to the parent: it passes it on to its workers
    events = served.policy_events("reloaded", "signal", mark, workers)
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()
    assert all(e["sha256"] == digest and e["device_types"] == 1 and e["level"] == "INFO"
               and e["logger"] == "devid.gateway" and e["path"] == str(policy) for e in events), events

    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_enrolled(proc, line)
        assert device_state(data, line["serial"]) == "enrolled"

    # SIGHUP reads the file again even when nothing changed (no file event can stand in for it)
    mark = served.mark()
    served.proc.send_signal(signal.SIGHUP)
    assert {e["sha256"] for e in served.policy_events("reloaded", "signal", mark, workers)} == {digest}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_changed_policy_file_is_reloaded_without_a_signal(data, gateway, devices, workers):
    policy = data.path / POLICY_FILE
    policy.write_text(policy_text(FW_A, FW_B))
    served = gateway(workers)
    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_enrolled(proc, line)

    mark = served.mark()
    policy.write_text(policy_text(FW_A))            # edited in place: firmware B withdrawn
    served.policy_events("reloaded", "file", mark, workers)
    # written in place, the file may have been read half-written once (then logged as invalid):
    # what counts is the last word of every worker
    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_refused(proc, line)
        assert device_state(data, line["serial"]) == "manufactured"

    mark = served.mark()
    replace_file(policy, policy_text(FW_A, FW_B))   # renamed into place: back again
    served.policy_events("reloaded", "file", mark, workers)
    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_enrolled(proc, line)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_policy_file_keeps_the_policy_in_force(data, gateway, devices, workers):
    policy = data.path / POLICY_FILE
    policy.write_text(policy_text(FW_A))
    served = gateway(workers)

    mark = served.mark()
    replace_file(policy, policy_text(FW_A, FW_B, broken=True))     # B's digest one byte short
    events = served.policy_events("invalid", "file", mark, workers)
    for e in events:
        assert e["level"] == "ERROR" and e["effect"] == "the previous policy stays in force", e
        assert "firmware[2].digest: expected 64 hex digits for sha-256, got 62 characters" in e["error"], e
    mark = served.mark()
    served.proc.send_signal(signal.SIGHUP)          # asked explicitly: the same refusal
    served.policy_events("invalid", "signal", mark, workers)

    # the old policy still decides: B refused, A enrolls, on every worker
    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_refused(proc, line)
    for proc, line in decisions_on_every_worker(served, devices, FW_A, workers).values():
        assert_enrolled(proc, line)

    mark = served.mark()
    policy.unlink()                                 # a removed file changes nothing either
    for e in served.policy_events("missing", "file", mark, workers):
        assert e["level"] == "WARNING" and e["effect"] == "the previous policy stays in force", e
    proc, line = enroll(served, next(devices), FW_A)
    assert_enrolled(proc, line)

    mark = served.mark()
    replace_file(policy, policy_text(FW_A, FW_B))   # corrected: now it is taken
    served.policy_events("reloaded", "file", mark, workers)
    for proc, line in decisions_on_every_worker(served, devices, FW_B, workers).values():
        assert_enrolled(proc, line)


def test_no_policy_at_start_then_one_written_is_taken(data, gateway, devices):
    """The gateway started without a policy (no device type can enroll) takes the first one written."""
    served = gateway(1)
    assert served.wait_for(lambda l: l["event"] == "policy" and l["result"] == "missing", 0)
    mark = served.mark()
    run_devid("enroll", "--gateway", served.uri, "--device", next(devices), "--firmware-digest", FW_A.digest.hex(),
              "--firmware-name", FW_A.name, "--firmware-version", FW_A.version)
    # the one-request flow's /sen: refused before its evidence is looked at
    line, = served.wait_for(lambda l: l["event"] == "enroll" and l["result"] == "refused", mark)
    assert line["reason"] == "device type not in policy", line

    mark = served.mark()
    replace_file(data.path / POLICY_FILE, policy_text(FW_A))
    served.policy_events("reloaded", "file", mark, 1)
    assert_enrolled(*enroll(served, next(devices), FW_A))


# -- the file watch's rules, on a real file (no gateway) --------------------------------------------

@pytest.fixture
def watched(tmp_path, caplog):
    path = tmp_path / POLICY_FILE
    path.write_text(policy_text(FW_A))
    applied = []
    caplog.set_level(logging.INFO, logger="devid.gateway")
    pf = PolicyFile(path, applied.append)
    first = pf.load_at_start()

    def events():
        return [(r.result, getattr(r, "trigger", None)) for r in caplog.records if r.msg == "policy"]
    return pf, path, applied, first, events


def test_a_rewrite_is_seen_even_with_the_same_size_and_mtime(watched):
    """`cp -p` style: written in place, same size, the old mtime restored; the ctime still tells."""
    pf, path, applied, first, events = watched
    before = path.stat()
    new = policy_text(FW_B)
    assert len(new) == before.st_size
    path.write_text(new)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert pf.changed()
    assert pf.reload("file") and applied[-1].for_type("temperature-sensor").firmware[0].version == "3.2.0"
    assert not pf.changed()
    assert events() == [("reloaded", "file")]


def test_one_bad_version_is_logged_once_and_changes_nothing(watched):
    pf, path, applied, first, events = watched
    path.write_text("version = 1\n[device_types.temperature-sensor]\nfirmwar = []\n")
    assert pf.changed() and not pf.reload("file")
    assert not pf.changed()                         # the same bad file: not read (nor logged) again
    assert applied == [] and pf.in_force is first
    path.write_bytes(b"\xff\xfe")
    assert pf.changed() and not pf.reload("file")
    assert events() == [("invalid", "file"), ("invalid", "file")]


def test_the_error_line_names_the_place(watched, caplog):
    pf, path, applied, first, events = watched
    path.write_text("version = 1\n[device_types.temperature-sensor]\nfirmwar = []\n")
    pf.reload("signal")
    record, = [r for r in caplog.records if getattr(r, "result", None) == "invalid"]
    assert record.levelno == logging.ERROR and record.trigger == "signal"
    assert record.error == (f"{path}: device_types.temperature-sensor.firmwar: unknown key (did you mean "
                            "'firmware'?)")
    path.write_bytes(b"version = 1\n\xff")
    pf.reload("signal")
    assert "not UTF-8 text" in [r for r in caplog.records if getattr(r, "result", None) == "invalid"][-1].error


def test_a_removed_file_keeps_the_policy_and_its_return_is_taken(watched):
    pf, path, applied, first, events = watched
    path.unlink()
    assert pf.changed() and not pf.reload("file")
    assert pf.in_force is first and applied == []
    path.write_text(policy_text(FW_A, FW_B))
    assert pf.changed() and pf.reload("file")
    assert applied[-1] == parse_policy(policy_text(FW_A, FW_B), str(path)) and pf.in_force is applied[-1]
    assert events() == [("missing", "file"), ("reloaded", "file")]


def test_a_rewrite_within_the_clock_tick_of_a_read_is_seen_by_its_content(watched):
    """A same-size rewrite in the tick of the last read keeps the stat stamp (file times move in
    ticks): such a "racy" file is compared by content until the tick is surely over."""
    pf, path, applied, first, events = watched
    assert pf.racy_until is not None                # read right after it was written
    path.write_text(policy_text(FW_B))              # the same size
    pf.stamp = _stamp(path)                         # the stamp the poll saw, as if unchanged
    assert pf.changed()
    assert pf.reload("file") and applied[-1].for_type("temperature-sensor").firmware[0].version == "3.2.0"
    assert not pf.changed()                         # same bytes: no reload at every poll


def test_a_change_is_taken_only_once_the_file_has_settled(watched):
    """An editor writing in place passes through prefixes that parse as policies of their own: the
    watch takes a change only when the file looked the same at two polls in a row."""
    pf, path, applied, first, events = watched
    whole = policy_text(FW_A, FW_B)
    path.write_text(whole[:whole.index("[[device_types.temperature-sensor.firmware]]", len(whole) // 2)])
    assert pf.changed() and not pf.settled()        # first sight of the prefix: wait
    path.write_text(whole)                          # the writer finishes before the next poll
    assert not pf.settled()                         # changed again since: wait again
    assert pf.settled() and pf.reload("file")       # the same at two polls: taken, whole
    assert [f.version for f in applied[-1].for_type("temperature-sensor").firmware] == \
        [f.version for f in parse_policy(whole, str(path)).for_type("temperature-sensor").firmware]
    assert not pf.settled() and events() == [("reloaded", "file")]
