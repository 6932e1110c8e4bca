"""The attestation policy of a running gateway: read at start, read again on SIGHUP and when its
file changes, and validated before it replaces the policy in force.

Watching the file is a poll of its `stat` (device, inode, size, mtime and ctime, nanoseconds)
every `interval` seconds: no dependency, and it works where inotify does not see a change (a
network file system, a bind mount, a Kubernetes ConfigMap whose symlink is swapped). The stamp is
taken before the file is read, so a write that lands during the read is seen at the next poll.
File times move in clock ticks (a few milliseconds; seconds on some file systems), so a rewrite of
the same size within the tick of a read would keep the stamp: as git does with "racily clean"
files, a file read less than `RACY_NS` after its modification is compared by content at each poll
until that time has passed.

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
import time
from pathlib import Path
from typing import Callable

from devid.attestation.errors import PolicyError
from devid.attestation.policy import Policy, parse_policy

log = logging.getLogger("devid.gateway")
POLICY_FILE = "attestation-policy.toml"
CHECK_INTERVAL = 1.0        # seconds between two looks at the policy file's stat
RACY_NS = 2_000_000_000     # a file read within this of its mtime is compared by content too

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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy: {exc.strerror or exc}") from None


def _parse(raw: bytes, path: Path) -> Policy:
    """The policy in `raw`, validated; PolicyError names the file, the place and the problem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_policy(text, str(path))


class PolicyFile:
    """DATA/attestation-policy.toml for one gateway process. `apply` puts a new, valid policy in
    force (synchronously: a request sees the old policy or the new one, never a mix)."""

    def __init__(self, path: Path, apply: Callable[[Policy], None]) -> None:
        self.path = Path(path)
        self.apply = apply
        self.stamp: Stamp | None = None
        self.in_force: Policy | None = None
        self.digest: bytes | None = None        # SHA-256 of the bytes last read
        self.racy_until: int | None = None      # compare by content until this time (ns)
        self._pending: tuple | None = None      # (stamp, SHA-256) of a change seen, not yet taken (settled)

    def _look(self) -> bytes:
        """The file's stamp, then its bytes (PolicyError if they cannot be read)."""
        self.stamp = _stamp(self.path)
        self.digest = self.racy_until = None
        raw = _read(self.path)
        self.digest = hashlib.sha256(raw).digest()
        if self.stamp is not None and self.stamp[0] != "error":
            until = self.stamp[3] + RACY_NS
            self.racy_until = until if time.time_ns() < until else None
        return raw

    def load_at_start(self) -> Policy:
        """The policy to start with. Missing: an empty one (no device type can enroll), logged.
        Invalid: PolicyError, and the gateway does not start."""
        if _stamp(self.path) is None:
            self.stamp = None
            log.warning("policy", extra={"result": "missing", "path": str(self.path),
                                         "effect": "no device type can enroll until a policy is written"})
            self.in_force = Policy(device_types={}, source=str(self.path))
        else:
            self.in_force = _parse(self._look(), self.path)
        return self.in_force

    def changed(self) -> bool:
        """The file is not what was read last: another stamp, or (while racy) other bytes."""
        if _stamp(self.path) != self.stamp:
            return True
        if self.racy_until is None:
            return False
        if time.time_ns() >= self.racy_until:
            self.racy_until = None          # this look is the last one by content
        try:
            return hashlib.sha256(self.path.read_bytes()).digest() != self.digest
        except OSError:
            return True

    def reload(self, trigger: str) -> bool:
        """Read the file again (`trigger`: "signal" or "file", for the log line); True if a new
        policy is now in force."""
        if _stamp(self.path) is None:
            self.stamp = self.digest = self.racy_until = None
            effect = ("the previous policy stays in force" if self.in_force and self.in_force.device_types
                      else "no device type can enroll until a policy is written")
            log.warning("policy", extra={"result": "missing", "path": str(self.path), "trigger": trigger,
                                         "effect": effect})
            return False
        try:
            policy = _parse(self._look(), self.path)
        except PolicyError as exc:
            log.error("policy", extra={"result": "invalid", "path": str(self.path), "trigger": trigger,
                                       "error": str(exc), "effect": "the previous policy stays in force"})
            return False
        self.apply(policy)
        self.in_force = policy
        log.info("policy", extra={"result": "reloaded", "path": str(self.path), "trigger": trigger,
                                  "device_types": len(policy.device_types),
                                  "sha256": self.digest.hex()})
        return True

    def settled(self) -> bool:
        """The file changed and has stayed the same since the previous look: a change is taken only
        once it is whole (an editor writing in place, or `cat > file`, passes through prefixes of
        the new file that parse as policies of their own: one that lists fewer firmware versions
        would revoke devices under revoke_on_contraindicated). SIGHUP does not wait."""
        if not self.changed():
            self._pending = None
            return False
        stamp = _stamp(self.path)
        try:
            content = hashlib.sha256(self.path.read_bytes()).digest() if stamp is not None else None
        except OSError:
            content = None
        seen, self._pending = self._pending, (stamp, content)
        return seen == self._pending

    async def watch(self, interval: float = CHECK_INTERVAL) -> None:
        """Poll the file's stamp every `interval` seconds and reload when it changed and then stayed
        the same for one interval; runs until cancelled, and nothing it meets ends it."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self.settled():
                    self._pending = None
                    self.reload("file")
            except Exception:       # a bug here must not stop the watch (nor the gateway)
                log.exception("policy watch failed")
