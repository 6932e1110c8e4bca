"""What the issuance benchmark's modules share (benchmarks/bench_issuance.py runs them): the
checkout's root on sys.path, the targets and sizes, the progress log on stderr, the clock.

    issuance_base       this: constants, log, utcnow, sync
    issuance_facts      the machine, the code and the file system the figures were taken on
    issuance_baseline   the same work done with bare `cryptography`
    issuance_measure    timing, interleaved rounds, paired medians
    issuance_runs       the two benchmarks (issue, provision) and the cProfile run
    issuance_report     the table and the cProfile breakdown
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:          # run from a checkout without the editable install too
    sys.path.insert(0, str(ROOT))

DEVICE_TYPE = "temperature-sensor"
ISSUE_OVERHEAD_TARGET = 0.20        # devid time / baseline time - 1
PROVISION_RATE_TARGET = 1000.0      # identities/s
SLOW_CREATE_US = 50                 # fs_create_probe above this: the file system weighs on provisioning
MIN_ROUNDS = 3                      # the provisioning budget never cuts below this
ISSUE_SLICES = 8                    # interleaved blocks per issuance round
CSR_POOL = 1000                     # distinct CSR keys, and as many registered devices


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:5.1f} s] {msg}", file=sys.stderr, flush=True)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)

def sync() -> None:
    if hasattr(os, "sync"):
        os.sync()