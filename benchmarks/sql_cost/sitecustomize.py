"""SQLite's CPU in the gateway, for `devid bench --workers-scaling --sql-cost` (bench_scaling.py).

Python imports this module at start-up in the gateway processes of such a run, whose PYTHONPATH
names this directory (and in no other process). With DEVID_BENCH_SQL_COST set to a directory,
every sqlite3 connection of the process counts the thread CPU time of its `execute` and
`executemany` calls (the statement's first step, where SQLite takes its locks and reads its
pages) per kind of statement, and each close of a connection writes the process's tallies to
DIR/PID.json: {"SELECT": [calls, seconds], "BEGIN IMMEDIATE": [...], ...}. Nothing of devid is
changed: `sqlite3.connect` gets a connection class that counts.
"""

from __future__ import annotations

import os

if os.environ.get("DEVID_BENCH_SQL_COST"):
    import json
    import sqlite3
    import time

    TALLY: dict[str, list] = {}

    def _kind(sql: str) -> str:
        words = sql.split(None, 2)
        if not words:
            return "?"
        first = words[0].upper()
        return f"{first} {words[1].upper()}" if first in ("BEGIN", "PRAGMA") and len(words) > 1 else first

    def _count(sql: str, started: float) -> None:
        t = TALLY.setdefault(_kind(sql), [0, 0.0])
        t[0] += 1
        t[1] += time.thread_time() - started

    class CountingConnection(sqlite3.Connection):
        def execute(self, sql, *args):
            started = time.thread_time()
            try:
                return super().execute(sql, *args)
            finally:
                _count(sql, started)

        def executemany(self, sql, *args):
            started = time.thread_time()
            try:
                return super().executemany(sql, *args)
            finally:
                _count(sql, started)

        def close(self):
            super().close()
            with open(os.path.join(os.environ["DEVID_BENCH_SQL_COST"], f"{os.getpid()}.json"), "w") as f:
                json.dump(TALLY, f)

    _connect = sqlite3.connect

    def connect(*args, **kwargs):
        kwargs.setdefault("factory", CountingConnection)
        return _connect(*args, **kwargs)

    sqlite3.connect = connect
