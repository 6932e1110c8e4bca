"""Write transactions on the registry during a probe, counted in SQLite's write-ahead log.

The registry runs in WAL mode: every transaction that changes the database appends the pages it
changed to `registry.sqlite3-wal` as frames, and marks its last frame as a commit frame (the
frame header's "database size after commit" is not zero). So the commit frames in the WAL are
the committed write transactions, and the frames the pages they wrote, whatever code made them
and in whichever gateway process (no counter in the gateway: it works as well against an older
checkout, `--server-root`, or a running gateway, `--gateway`). A `BEGIN IMMEDIATE` that changed
nothing writes no frame and is not counted.

`WriteProbe.start` empties the WAL (`PRAGMA wal_checkpoint(TRUNCATE)` on a connection of its
own); `stop` reads the WAL back, checking each frame as SQLite does (the header's salts, the
running checksum; sqlite.org/fileformat.html#the_write_ahead_log). The count is exact if the WAL
was not checkpointed and restarted in between (SQLite does that by itself once it holds
`wal_autocheckpoint` pages, at least 1,000; the gateway never checkpoints explicitly): `stop`
refuses to count, with the reason, when the file holds frames beyond the valid ones (an earlier
generation) or 1,000 frames or more. Keep the probe small (a few devices). Anything else that
writes to the registry during the probe counts too (e.g. other traffic on a running gateway).
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

WAL_HEADER = 32
FRAME_HEADER = 24
MAGIC = {0x377F0682: "<", 0x377F0683: ">"}      # the checksums' byte order
RESTART_FRAMES = 1000          # SQLite's smallest automatic checkpoint (its default; devid sets 4000)


def checksum(data: bytes, s0: int, s1: int, order: str) -> tuple[int, int]:
    """SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing from (s0, s1)."""
    words = struct.unpack(f"{order}{len(data) // 4}I", data)
    m = 0xFFFFFFFF
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & m
        s1 = (s1 + words[i + 1] + s0) & m
    return s0, s1


def read_wal(path: Path) -> dict:
    """The valid frames of the WAL at `path` (none if it is missing or empty): frames, commits,
    and the frames in the file beyond them."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    if len(data) < WAL_HEADER:
        return {"frames": 0, "commits": 0, "beyond": 0}
    magic, _version, page_size, _ckpt, salt1, salt2, c0, c1 = struct.unpack(">8I", data[:WAL_HEADER])
    order = MAGIC.get(magic)
    if order is None or checksum(data[:24], 0, 0, order) != (c0, c1):
        raise ValueError(f"{path}: not a SQLite WAL file")
    size = FRAME_HEADER + page_size
    in_file = (len(data) - WAL_HEADER) // size
    s = (c0, c1)
    frames = commits = 0
    for i in range(in_file):
        off = WAL_HEADER + i * size
        _page, after_commit, f1, f2, k0, k1 = struct.unpack(">6I", data[off:off + FRAME_HEADER])
        if (f1, f2) != (salt1, salt2):
            break
        s = checksum(data[off + FRAME_HEADER:off + size], *checksum(data[off:off + 8], *s, order), order)
        if s != (k0, k1):
            break
        frames += 1
        commits += after_commit != 0
    return {"frames": frames, "commits": commits, "beyond": in_file - frames}


class WriteProbe:
    """Commits (write transactions) and frames (pages written) in the registry's WAL between
    `start` and `stop`."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = Path(db_path)
        self.wal = self.db_path.with_name(self.db_path.name + "-wal")
        self.problem: str | None = None

    def start(self) -> None:
        db = sqlite3.connect(f"{self.db_path.absolute().as_uri()}?mode=rw", uri=True, timeout=10,
                             isolation_level=None)
        try:
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            db.close()
        left = read_wal(self.wal)["frames"]
        self.problem = (f"the WAL could not be emptied before the probe (busy {busy}, {left} frames left)"
                        if busy or left else None)

    def stop(self) -> dict:
        """{"commits", "frames"} or, when they cannot be exact, {"commits": None, "frames": None,
        "problem": why}."""
        wal = read_wal(self.wal)
        problem = self.problem
        if problem is None and wal["beyond"]:
            problem = f"the WAL was checkpointed during the probe ({wal['beyond']} older frames in it)"
        if problem is None and wal["frames"] >= RESTART_FRAMES:
            problem = f"the probe wrote {wal['frames']} WAL frames, enough for a checkpoint: probe fewer devices"
        if problem:
            return {"commits": None, "frames": None, "problem": problem}
        return {"commits": wal["commits"], "frames": wal["frames"]}
