"""`devid serve --mqtt-broker DIR`: keep a Mosquitto broker's CRL and ACL current by itself.

The broker learns of a revocation only from its CRL and of a new device only from its ACL
(docs/mqtt.md). The keeper looks at the registry every few seconds through a cheap marker
(`Registry.revocation_marker`: revoked operational certificates, the latest revocation, enrolled
devices, all from indexes) and, when it changes, writes the CRL and the ACL again
(`broker.refresh`) and sends the broker SIGHUP. It also writes them again every `full_every`
seconds (a renewal supersedes a certificate without changing the marker: the CRL lists
superseded certificates) and before the CRL has run through half its validity, since a broker
whose CRL has expired refuses every device of the CA.

Revocations made anywhere reach it (`devid revoke`, the API, an automatic revocation, another
gateway host on the same PostgreSQL registry): it watches the registry, not this process. With
`--workers N` only worker 0 keeps the broker. The refresh runs in a thread (it signs a CRL and
walks the enrolled devices); the loop only reads the marker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

from devid.gateway.app import broker
from devid.gateway.errors import ConfigError, GatewayError

log = logging.getLogger("devid.gateway")

CHECK_INTERVAL = 5.0        # s between looks at the marker
FULL_EVERY = 300.0          # s between refreshes whatever the marker says (superseded certificates)
RETRY_AFTER = 60.0          # s before trying again after a refresh failed


def check_broker_dir(out: Path) -> Path:
    """At start: the directory must be one `devid mqtt broker-config` made (one error line)."""
    out = Path(out)
    if not (out / "mosquitto.conf").is_file():
        raise ConfigError(f"--mqtt-broker {out}: no mosquitto.conf: run devid mqtt broker-config --out {out} first")
    return out


class BrokerKeeper:
    def __init__(self, data, out: Path, reload: int | str | Path | None, clock: Callable[[], datetime],
                 registry, check_interval: float = CHECK_INTERVAL, full_every: float = FULL_EVERY) -> None:
        self.data, self.out, self.reload, self.clock = data, Path(out), reload, clock
        self.registry = registry
        self.check_interval, self.full_every = check_interval, full_every
        self._marker: tuple | None = None
        self._pending: tuple | None = None       # the marker the refresh under way writes for
        self._last = float("-inf")               # monotonic time of the last refresh
        self._crl_due: datetime | None = None    # refresh once the CRL is half through its validity
        self._task: asyncio.Task | None = None
        self.refreshes = 0

    def due(self) -> str | None:
        """Why the broker's files must be written again now, or None."""
        marker = self.registry.revocation_marker("operational")
        if marker != self._marker:
            self._pending = marker
            return "start" if self._marker is None else "registry changed"
        if time.monotonic() - self._last >= self.full_every:
            self._pending = marker
            return "periodic"
        if self._crl_due is not None and self.clock() >= self._crl_due:
            self._pending = marker
            return "crl ageing"
        return None

    def refresh(self, why: str) -> dict:
        """Write the CRL and the ACL, SIGHUP the broker; the summary (also logged)."""
        now = self.clock()
        summary = broker.refresh(self.data, self.out, now=now, reload=self.reload)
        self._marker, self._last = self._pending, time.monotonic()
        next_update = datetime.fromisoformat(summary["crl_next_update"].replace("Z", "+00:00"))
        self._crl_due = now + (next_update - now) / 2
        self.refreshes += 1
        log.info("mqtt-broker", extra={
            "result": "refreshed", "trigger": why, "out": summary["out"], "crl_number": summary["crl_number"],
            "crl_entries": summary["crl_entries"], "acl_devices": summary["acl_devices"],
            "broker_pid": summary["reloaded"]})
        return summary

    async def run(self) -> None:
        while True:
            delay = self.check_interval
            try:
                why = self.due()
                if why is not None:
                    await asyncio.to_thread(self.refresh, why)
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # the CoAP service goes on whatever the broker side does
                reason = str(exc) if isinstance(exc, (GatewayError, OSError)) else type(exc).__name__
                log.error("mqtt-broker", extra={"result": "failed", "out": str(self.out), "reason": reason,
                                                "retry_seconds": RETRY_AFTER})
                delay = RETRY_AFTER         # each try signs a CRL (a number spent): not every few seconds
            await asyncio.sleep(delay)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

