"""The attestation policy of a running gateway: read at start, read again on SIGHUP and when its
file changes, and validated before it replaces the policy in force.

Watching the file is a poll of its `stat` (device, inode, size, mtime and ctime, nanoseconds)
every `interval` seconds: no dependency, and it works where inotify does not see a change (a
network file system, a bind mount, a Kubernetes ConfigMap whose symlink is swapped). The stamp is
taken before the file is read, so a write that lands during the read is seen at the next poll.

A file that fails to read or validate changes nothing: the policy in force stays, and one log
line says why (`policy` `invalid`). A removed file keeps the policy in force too (an editor may
remove it for a moment while saving). The stamp of every file looked at is kept, so one bad
version is logged once, not at every poll.

Reading is I/O and belongs here, in the gateway; `devid.attestation.policy.parse_policy` only
validates the text.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

from devid.attestation.errors import PolicyError
from devid.attestation.policy import Policy, parse_policy

log = logging.getLogger("devid.gateway")
POLICY_FILE = "attestation-policy.toml"
CHECK_INTERVAL = 1.0        # seconds between two looks at the policy file's stat

Stamp = tuple


def _stamp(path: Path) -> Stamp | None:
    """What changes when the file does (None: there is no file)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:          # e.g. a directory we may not search: a stamp of its own
        return ("error", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read(path: Path) -> tuple[Policy, bytes]:
    """The policy in `path`, validated, and the file's bytes; PolicyError names the problem."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc.strerror or exc}") from None
    return parse_policy(text, str(path)), raw


class PolicyFile:
    """DATA/attestation-policy.toml for one gateway process. `apply` puts a new, valid policy in
    force (synchronously: a request sees the old policy or the new one, never a mix)."""

    def __init__(self, path: Path, apply: Callable[[Policy], None]) -> None:
        self.path = Path(path)
        self.apply = apply
        self.stamp: Stamp | None = None
        self.in_force: Policy | None = None

    def load_at_start(self) -> Policy:
        """The policy to start with. Missing: an empty one (no device type can enroll), logged.
        Invalid: PolicyError, and the gateway does not start."""
        self.stamp = _stamp(self.path)
        if self.stamp is None:
            log.warning("policy", extra={"result": "missing", "path": str(self.path),
                                         "effect": "no device type can enroll until a policy is written"})
            self.in_force = Policy(device_types={}, source=str(self.path))
        else:
            self.in_force = _read(self.path)[0]
        return self.in_force

    def changed(self) -> bool:
        return _stamp(self.path) != self.stamp

    def reload(self, trigger: str) -> bool:
        """Read the file again (`trigger`: "signal" or "file", for the log line); True if a new
        policy is now in force."""
        self.stamp = _stamp(self.path)
        if self.stamp is None:
            effect = ("the previous policy stays in force" if self.in_force and self.in_force.device_types
                      else "no device type can enroll until a policy is written")
            log.warning("policy", extra={"result": "missing", "path": str(self.path), "trigger": trigger,
                                         "effect": effect})
            return False
        try:
            policy, raw = _read(self.path)
        except PolicyError as exc:
            log.error("policy", extra={"result": "invalid", "path": str(self.path), "trigger": trigger,
                                       "error": str(exc), "effect": "the previous policy stays in force"})
            return False
        self.apply(policy)
        self.in_force = policy
        log.info("policy", extra={"result": "reloaded", "path": str(self.path), "trigger": trigger,
                                  "device_types": len(policy.device_types),
                                  "sha256": hashlib.sha256(raw).hexdigest()})
        return True

    async def watch(self, interval: float = CHECK_INTERVAL) -> None:
        """Poll the file's stamp every `interval` seconds and reload when it changed; runs until
        cancelled, and nothing it meets ends it."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.changed():
                    self.reload("file")
            except Exception:       # a bug here must not stop the watch (nor the gateway)
                log.exception("policy watch failed")
