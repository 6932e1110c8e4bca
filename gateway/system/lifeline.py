"""Worker processes that end with their parent (provisioning workers, `serve --workers` workers).

Two independent lines, so that neither a failed prctl nor a missed signal leaves a worker behind
(a gateway worker left behind keeps serving on the port, and the next start fails with "Address
already in use"; a provisioning worker left behind writes bundles the next run is recovering):

1. `prctl(PR_SET_PDEATHSIG, signum)`: the kernel sends `signum` when the parent exits (Linux; the
   signal is tied to the thread that started the worker, which for devid is the main thread);
2. a daemon thread that checks `getppid()` every `poll` seconds: once the parent is gone the
   worker has been re-parented, and the thread sends `signum` to its own process. After `grace`
   seconds more (time for a clean shutdown on SIGTERM) it ends the process with `os._exit(1)`.
"""

from __future__ import annotations

import os
import signal
import threading
import time


def _pdeathsig(signum: int) -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):     # not Linux
        return False


def die_with_parent(parent: int, signum: int = signal.SIGKILL, *, grace: float = 10.0, poll: float = 0.5,
                    pdeathsig: bool = True) -> None:
    """Make this process end when the process `parent` (its parent at start) does.
    `pdeathsig=False` leaves out the first line (tests of the second one)."""
    if pdeathsig:
        _pdeathsig(signum)
    if os.getppid() != parent:              # the parent died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signum)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="devid-lifeline", daemon=True).start()
