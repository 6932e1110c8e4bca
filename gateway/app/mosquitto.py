"""Run a Mosquitto broker on a directory `devid mqtt broker-config` wrote: for `devid demo`, the
tests' broker fixture and `devid bench --mqtt` (a production broker is the operator's service,
docs/mqtt.md).

As root the broker runs as the `mosquitto` user (setpriv, in the foreground: the pid is the
broker's), which is why broker-config's `--owner mosquitto` gives that user's group read access;
as another user it runs as that user."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from devid.gateway.errors import ConfigError


def program(name: str) -> str | None:
    """An installed program's path (PATH, then /usr/sbin and /usr/bin), or None."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def broker_user() -> str | None:
    """The account the broker runs as when started here: `mosquitto` as root, else None (ourselves)."""
    return "mosquitto" if os.geteuid() == 0 else None


def start_mosquitto(conf: Path, port: int, log: Path, wait: float = 30.0) -> subprocess.Popen:
    """Mosquitto on `conf`, its stderr appended to `log`; back once it accepts TCP connections on
    127.0.0.1:`port`. ConfigError (with the log's tail) if it is not installed, exits or does
    not listen within `wait` seconds."""
    mosquitto = program("mosquitto")
    if mosquitto is None:
        raise ConfigError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    command = [mosquitto, "-c", str(conf)]
    if broker_user() is not None:
        setpriv = program("setpriv")
        if setpriv is None:
            raise ConfigError("setpriv (util-linux) is needed to run mosquitto as its own user")
        command = [setpriv, f"--reuid={broker_user()}", f"--regid={broker_user()}", "--init-groups", *command]
    with open(log, "ab") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"mosquitto exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.05)
    stop_process(proc)
    raise ConfigError(f"mosquitto did not listen on {port} within {wait:g} s: {_tail(log)}")


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])


def stop_process(proc: subprocess.Popen | None, grace: float = 30.0) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `grace` seconds; then reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
