"""Failure 5 of issue 10: `kill -9` of the `devid serve --workers N` parent must not leave its
workers serving on the port. Both lines of gateway/system/lifeline.py are tested: the whole gateway
with PR_SET_PDEATHSIG, and the getppid() watch alone in a process where the prctl is left out."""

from __future__ import annotations

import pytest

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

from .conftest import free_port, run_devid

pytestmark = pytest.mark.engines


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_kill_9_of_the_serve_parent_leaves_no_worker_and_frees_the_port(tmp_path):
    data_dir = tmp_path / "data"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    port = free_port()
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                              "--workers", "2"], stdout=subprocess.PIPE, stderr=open(log, "wb"), env=env)
    workers: list[int] = []
    try:
        line = serve.stdout.readline().decode()
        assert "listening" in line, line + log.read_text()
        workers = [int(p) for p in re.search(r"pids ([\d, ]+)\)", line).group(1).split(", ")]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        assert not _bindable(port)                   # the workers hold it
        serve.send_signal(signal.SIGKILL)
        serve.wait(30)
        left = _wait_gone(workers, 60)
        assert not left, f"workers {left} outlived the killed parent"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _bindable(port):
            time.sleep(0.05)
        assert _bindable(port), "the port is still taken after the workers ended"
        # and a new gateway starts on it
        again = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen", f"127.0.0.1:{port}",
                                  "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            line = again.stdout.readline().decode()
            assert "listening" in line, line + again.stderr.read1().decode()
        finally:
            again.send_signal(signal.SIGTERM)
            assert again.wait(60) == 0
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# A parent that starts one child and waits; the child runs die_with_parent without the prctl
# (pdeathsig=False), so only the getppid() watch can end it.
PARENT = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        from devid.gateway.system.lifeline import die_with_parent
        die_with_parent(os.getppid(), signal.{sig}, grace={grace}, poll=0.1, pdeathsig=False)
        {child_setup}
        os.write(w, b"ready\\n")
        while True:
            time.sleep(1)
    print(pid, flush=True)
    os.read(r, 6)
    print("ready", flush=True)
    time.sleep(3600)
""")


def _run_parent(sig: str, grace: float, child_setup: str = "pass") -> tuple[subprocess.Popen, int]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = PARENT.format(root=root, sig=sig, grace=grace, child_setup=child_setup)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == b"ready"
    return parent, child


def test_the_getppid_watch_alone_ends_a_worker_whose_parent_was_killed():
    parent, child = _run_parent("SIGKILL", 10.0)
    try:
        assert _alive(child)
        parent.kill()
        parent.wait(30)
        assert not _wait_gone([child], 30), "the child outlived its parent without PR_SET_PDEATHSIG"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_watch_ends_a_worker_that_ignores_the_signal_after_the_grace_period():
    """SIGTERM is a request (a gateway worker shuts down cleanly on it); a worker that does not
    stop is ended grace seconds later."""
    parent, child = _run_parent("SIGTERM", 0.5, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    try:
        parent.kill()
        parent.wait(30)
        assert not _wait_gone([child], 30), "a worker ignoring SIGTERM outlived the grace period"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _ignores_sighup(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


def test_hang_ups_to_the_process_group_during_start_up_end_nothing(tmp_path):
    """A terminal's hang-up reaches every process of the group, the workers still starting among
    them: SIGHUP is blocked across their spawn and ignored until their reload handler is in place."""
    data_dir = tmp_path / "data"
    assert run_devid("init", data_dir=data_dir).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "DEVID_CA_PASSPHRASE"}
    env["DEVID_DATA"] = str(data_dir)
    log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "devid.gateway.cli", "serve", "--listen",
                              f"127.0.0.1:{free_port()}", "--workers", "2"], stdout=subprocess.PIPE,
                             stderr=open(log, "wb"), env=env, start_new_session=True)
    try:
        # from when `devid serve` ignores SIGHUP (its first line; before it, the interpreter is still
        # starting, and a hang-up ends it as it ends any program)
        deadline = time.monotonic() + 60
        while not _ignores_sighup(serve.pid) and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        os.set_blocking(serve.stdout.fileno(), False)
        out = b""
        hups = 0
        while b"listening" not in out and serve.poll() is None and time.monotonic() < deadline:
            os.killpg(serve.pid, signal.SIGHUP)          # the whole group, over and over while it starts
            hups += 1
            time.sleep(0.02)
            out += serve.stdout.read() or b""
        assert b"listening" in out and serve.poll() is None, (out.decode(), log.read_text()[-2000:])
        assert hups > 5
        workers = [int(p) for p in re.search(rb"pids ([\d, ]+)\)", out).group(1).split(b", ")]
        assert all(_alive(p) for p in workers)
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, log.read_text()[-2000:]
