"""`devid serve --mqtt-broker DIR`: keep a Mosquitto broker's CRL and ACL current by itself.

The broker learns of a revocation only from its CRL and of a new device only from its ACL
(docs/mqtt.md). The keeper looks at the registry every few seconds through a marker
(`Registry.revocation_marker`: revoked operational certificates, the latest revocation, enrolled
devices) and the configuration templates' modification times, and when they changed runs
`broker.refresh`, which writes the CRL and the ACL again only where their content changed and
then sends the broker SIGHUP. A revocation is acted on at the next look; a change of enrolled
devices or templates alone at most every `debounce` seconds (a rollout enrolls devices every
second, and each Mosquitto reload re-reads the whole ACL). It also runs a refresh every
`full_every` seconds whatever the marker says (a renewal supersedes a certificate without
changing it: the CRL lists superseded certificates) and once the CRL is half through its
validity, since a broker whose CRL has expired refuses every device of the CA.

Revocations made anywhere reach it (`devid revoke`, the API, an automatic revocation, another
gateway host on the same PostgreSQL registry): it watches the registry, not this process. With
`--workers N` only worker 0 keeps the broker. The looks and the refreshes run in one thread of
their own with a registry connection of their own: the DTLS event loop only awaits them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Callable

from devid.gateway.app import broker
from devid.gateway.errors import ConfigError, GatewayError

log = logging.getLogger("devid.gateway")

CHECK_INTERVAL = 5.0        # s between looks at the marker
DEBOUNCE = 30.0             # s at least between refreshes for enrollments or templates alone
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
                 check_interval: float = CHECK_INTERVAL, full_every: float = FULL_EVERY,
                 debounce: float = DEBOUNCE, sleep=asyncio.sleep) -> None:
        self.data, self.out, self.reload, self.clock = data, Path(out), reload, clock
        self.check_interval, self.full_every, self.debounce = check_interval, full_every, debounce
        self._sleep = sleep
        self._revocations: tuple | None = None   # what the last refresh saw: revocations
        self._rest: tuple | None = None          # ... enrolled devices and the templates
        self._pending: tuple = (None, None)
        self._last = float("-inf")               # monotonic time of the last refresh
        self._crl_due: datetime | None = None    # refresh once the CRL is half through its validity
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devid-broker")
        self._registry = None                    # opened in that thread, used only there
        self.refreshes = 0

    # -- in the keeper's thread ----------------------------------------------------------------

    def _templates(self) -> tuple:
        directory = self.data.path / "config"
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in directory.glob("*.toml")))
        except OSError:
            return ()

    def due(self) -> str | None:
        """Why the broker's files must be looked at again now, or None."""
        if self._registry is None:
            self._registry = self.data.open_registry()
        revoked, latest, enrolled = self._registry.revocation_marker("operational")
        revocations, rest = (revoked, latest), (enrolled, self._templates())
        self._pending = (revocations, rest)
        since = time.monotonic() - self._last
        if self._revocations is None:
            return "start"
        if revocations != self._revocations:
            return "revocation"
        if rest != self._rest and since >= self.debounce:
            return "registry changed"
        if since >= self.full_every:
            return "periodic"
        if self._crl_due is not None and self.clock() >= self._crl_due:
            return "crl ageing"
        return None

    def refresh(self, why: str) -> dict:
        """`broker.refresh` (the CRL and the ACL where changed, SIGHUP if anything was written);
        the summary, also logged."""
        now = self.clock()
        try:
            summary = broker.refresh(self.data, self.out, now=now, reload=self.reload, registry=self._registry)
        finally:
            self._last = time.monotonic()       # a failed try waits too (RETRY_AFTER, in run)
        self._revocations, self._rest = self._pending
        next_update = datetime.fromisoformat(summary["crl_next_update"].replace("Z", "+00:00"))
        self._crl_due = now + (next_update - now) / 2
        self.refreshes += 1
        log.info("mqtt-broker", extra={
            "result": "refreshed", "trigger": why, "out": summary["out"], "crl_written": summary["crl_written"],
            "crl_number": summary["crl_number"], "crl_entries": summary["crl_entries"],
            "acl_written": summary["acl_written"], "acl_devices": summary["acl_devices"],
            "broker_pid": summary["reloaded"]})
        return summary

    def _step(self) -> None:
        why = self.due()
        if why is not None:
            self.refresh(why)

    def _close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    # -- on the event loop ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self.check_interval
            try:
                await loop.run_in_executor(self._thread, self._step)
            except asyncio.CancelledError:
                raise
            except Exception as exc:        # the CoAP service goes on whatever the broker side does
                reason = str(exc) if isinstance(exc, (GatewayError, OSError)) else type(exc).__name__
                log.error("mqtt-broker", extra={"result": "failed", "out": str(self.out), "reason": reason,
                                                "retry_seconds": RETRY_AFTER})
                delay = RETRY_AFTER         # not every few seconds: the cause is rarely gone that fast
            await self._sleep(delay)

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
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)
