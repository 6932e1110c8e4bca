"""The facts a figure of the issuance benchmark needs beside it: the machine (CPU, Python,
cryptography, OpenSSL, SQLite), the devid commit measured, and how fast the file system creates
files (fs_create_probe)."""

from __future__ import annotations

import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

import cryptography

from issuance_base import ROOT


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding `path` (from /proc/mounts; 'unknown' elsewhere)."""
    try:
        best, fstype = "", "unknown"
        target = str(path.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def code_facts() -> dict:
    """Which devid was measured: the commit, and the source files changed since it."""
    import subprocess
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        commit = run("rev-parse", "--short", "HEAD")
        dirty = [line.split(maxsplit=1)[1]
                 for line in run("status", "--porcelain", "--", "ca", "gateway").splitlines() if line.strip()]
        return {"devid_commit": commit, "devid_uncommitted": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"devid_commit": "unknown", "devid_uncommitted": []}


def machine_facts(workdir: Path) -> dict:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend
        openssl = backend.openssl_version_text()
    except Exception:                                     # pragma: no cover - informational only
        openssl = "unknown"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "cryptography": cryptography.__version__,
        "openssl": openssl,
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "nproc": affinity,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "workdir_fs": _fs_type(workdir),
        **code_facts(),
    }


def fs_create_probe(parent: Path, files: int = 500) -> float:
    """Microseconds to create, write and close one small file (a new directory every 5 files).

    On ext4 mounted without a journal, the inode allocator skips inodes deleted in the last 60 s
    (360 s while their inode table block is dirty) by scanning past each of them: right after many
    deletions (a previous run's cleanup, someone's test suite) file creation can be 10-50x slower.
    The probe, run at start and end, shows whether that, or any other file system slowness, was
    in play. Its files are left in place until the final cleanup.
    """
    d = Path(tempfile.mkdtemp(prefix="fsprobe-", dir=parent))
    payload = b"x" * 700
    t0 = time.perf_counter()
    for i in range(files):
        if i % 5 == 0:
            sub = d / f"d{i}"
            os.mkdir(sub)
        fd = os.open(sub / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    return (time.perf_counter() - t0) / files * 1e6
