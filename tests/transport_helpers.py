"""The load generator's lean DTLS session as a device transport for the flow tests
(test_device_client.py, test_one_request.py): one session to the gateway, its exchange and its
exporter value, closed at the end."""

from __future__ import annotations

import asyncio
import sys
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import loadgen  # noqa: E402
import loadgen_dtls  # noqa: E402

TIMEOUT = 15.0


@asynccontextmanager
async def over_lean(bundle: Path, uri: str, operational: bool = False):
    """(exchange, the session's exporter value as this end computed it) over the load
    generator's session, the gateway's chain checked up to the root."""
    dev = loadgen.load_device(bundle, operational)
    target = loadgen.Target.parse(uri)
    trust = loadgen.Trust(dev.root, target.host, full_chain=True)
    session = loadgen_dtls.Session(asyncio.get_running_loop(), target.peer, target.family, trust.context(dev), dev,
                                   trust, TIMEOUT)
    await loadgen_dtls.connect(session, TIMEOUT)
    try:
        yield loadgen_dtls.exchange(session, TIMEOUT), session.exporter
    finally:
        session.close()
