"""Gauges whose truth is the registry, for `/metrics` (gateway/system/metrics.py), and the one
registry read the anomaly signals need (a device's previous verdict tier).

Computed when scraped (a collector), not counted as the gateway runs: every worker and every
gateway host of one registry shares these values, so a per-process gauge would be N copies of
one number or a guess; a read at scrape time is exact and costs nothing between scrapes.

- `devid_attestation_outstanding_nonces`: unconsumed server nonces that have not expired; one
  COUNT over the nonce expiry index (issuing a nonce purges the expired ones, so the table holds
  minutes of nonces).
- `devid_certificates_expiring{device_type}`: current operational certificates of enrolled
  devices that expire within their device type's renewal threshold (`threshold(device_type)`,
  30 days by default), expired ones included (they are overdue). One COUNT grouped by device
  type over the certificates_expiry index (current operational certificates by not_after), up
  to the latest of the types' cutoffs, each row held to its own type's: it reads the due
  certificates, not the fleet. Cached for `EXPIRING_TTL` seconds all the same, far below the
  day-scale the value moves on.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Callable

from prometheus_client.core import GaugeMetricFamily

from devid.attestation.log import format_time
from devid.gateway.store.fleet import cutoff_sql, device_types

log = logging.getLogger("devid.gateway")

DEFAULT_RENEWAL_THRESHOLD = timedelta(days=30)
EXPIRING_TTL = 60.0


def default_threshold(device_type: str) -> timedelta:
    """30 days, the seed's threshold: the gauge's fallback where no policy is at hand (the
    gateway passes its policy's `renewal_threshold`, per device type)."""
    return DEFAULT_RENEWAL_THRESHOLD


def outstanding_nonces(registry, now: datetime) -> int:
    with registry.reading() as db:
        return db.execute("SELECT COUNT(*) FROM attestation_nonces WHERE expires_at > ? AND consumed_at IS NULL",
                          (format_time(now),)).fetchone()[0]


def expiring_certificates(registry, now: datetime, threshold: Callable[[str], timedelta]) -> dict[str, int]:
    """{device type: current operational certificates of enrolled devices expiring before now +
    its threshold}, every device type in the registry present (0 when none is due). Counted in
    SQL: a range over certificates_expiry up to the latest cutoff, each row then held to its
    type's cutoff."""
    types = device_types(registry)
    cut, params, latest = cutoff_sql("d.device_type", now, types, threshold, threshold(""))
    with registry.reading() as db:
        rows = db.execute(
            # CROSS JOIN: SQLite keeps certificates (the due range) as the outer loop, rather than
            # every enrolled device; PostgreSQL takes it as the inner join it is
            "SELECT d.device_type, COUNT(*) FROM certificates c CROSS JOIN devices d "
            "WHERE d.serial = c.device_serial AND c.profile = 'operational' AND c.status = 'current' "
            "AND c.not_after < ? "
            f"AND c.not_after < {cut} AND d.state = 'enrolled' GROUP BY d.device_type",
            [latest, *params]).fetchall()
    due = {t: 0 for t in types}
    due.update({t: int(n) for t, n in rows})
    return due


def previous_tier(registry, device_serial: str, before_seq: int | None) -> str | None:
    """The tier of the device's attestation log entry before `before_seq` (all of them when None)."""
    sql = "SELECT tier FROM attestation_log WHERE device_serial = ?"
    params: list = [device_serial]
    if before_seq is not None:
        sql += " AND seq < ?"
        params.append(before_seq)
    with registry.reading() as db:
        row = db.execute(sql + " ORDER BY seq DESC LIMIT 1", params).fetchone()
    return row[0] if row else None


class RegistryGauges:
    """The collector of the two gauges above. `registry`: the registry, or a function opening it
    (opened at the first scrape: the parent of `--workers` has none until it is asked)."""

    def __init__(self, registry, clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 threshold: Callable[[str], timedelta] = default_threshold) -> None:
        self._registry = registry
        self.clock = clock
        self.threshold = threshold
        self._cached: tuple[float, dict[str, int]] | None = None
        self._lock = threading.Lock()

    def _open(self):
        if callable(self._registry):
            self._registry = self._registry()
        return self._registry

    def collect(self):
        nonces = GaugeMetricFamily("devid_attestation_outstanding_nonces",
                                   "Server nonces issued, not yet used and not expired")
        expiring = GaugeMetricFamily("devid_certificates_expiring",
                                     "Current operational certificates expiring within their device type's "
                                     "renewal threshold (expired ones included)", labels=["device_type"])
        try:
            with self._lock:
                registry = self._open()
                now = self.clock()
                nonces.add_metric([], outstanding_nonces(registry, now))
                if self._cached is None or time.monotonic() - self._cached[0] > EXPIRING_TTL:
                    self._cached = (time.monotonic(), expiring_certificates(registry, now, self.threshold))
                for device_type, count in sorted(self._cached[1].items()):
                    expiring.add_metric([device_type], count)
        except Exception as exc:        # a scrape must not fail because the registry is busy or gone
            log.warning("metrics: cannot read the registry: %s", exc)
            return
        yield nonces
        yield expiring

    def invalidate(self) -> None:
        """Forget the cached count (tests, and after a bulk change)."""
        self._cached = None
