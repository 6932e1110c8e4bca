"""File-system helpers for what must survive a crash or a power cut, and for runs that must not
share a directory.

Durability on Linux: a file's data is on disk once `fsync` of the file returns; its name is on
disk once `fsync` of its directory returns (on ext4 without a journal, or with
`data=writeback`, the file's fsync does not cover the directory entry). A rename is on disk once
the directory it was made in is fsynced.

Directory locks: `fcntl.flock` on the directory itself, so nothing is added to the directory
(factory tooling and our own benchmarks treat every entry of a provisioning output directory as
a bundle). The lock is advisory: it excludes other devid runs, not other programs. It belongs
to the open file description, so forked children keep it until they exit too, and the kernel
drops it when the last holder dies (kill -9 included): there is no stale lock to clean up.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from devid.gateway.errors import DirectoryBusy


def write_synced(path: str | Path, data: bytes, mode: int = 0o644, *, exclusive: bool = True) -> None:
    """Write `data` to `path` and fsync it before closing; `exclusive`: the file must not exist."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` all at once: a temporary file beside it (this process's own),
    written and fsynced, renamed over it, then the directory fsynced. A reader (or a crash, or a
    power cut) sees the old content or the new, never a part; on failure the temporary is gone."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_synced(tmp, data, mode, exclusive=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by name (a directory: the names in it, renames included)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_holder(path: str | Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks (Linux); None if unknown."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146516 0 EOF"; waiters are "1: -> FLOCK ..."
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            try:
                pid = int(fields[4])
            except ValueError:
                return None
            return pid or None              # 0: a holder in another pid namespace
    return None


@contextmanager
def directory_lock(path: str | Path, *, wait: float = 0.0, poll: float = 0.05) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` for the block: a directory, or a lock file
    (created, mode 0600, if missing). If another process holds it, wait up to `wait` seconds for
    it, then raise DirectoryBusy naming that process."""
    path = Path(path)
    flags = os.O_DIRECTORY if path.is_dir() else os.O_CREAT
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DirectoryBusy(path, lock_holder(path)) from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)                         # unlocks, once forked children holding it have exited
