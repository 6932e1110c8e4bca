"""The operator's read queries on the registry (either engine): the fleet by pages, certificates
due for renewal, the attestation log by pages, and the overview's counts.

Every list is keyset-paged: a page is "the first `limit` rows after this key" in a total order
(devices by serial; certificates by not_after, then serial; log entries by seq, newest first),
so page N costs what page 1 costs, whatever rows were added or removed since page 1, on SQLite
and PostgreSQL alike (text keys compare byte by byte on both: COLLATE "C" on PostgreSQL).
The indexes these queries use are schema migrations 8 and 9 (`schema.py`): devices by (state,
serial) and (device_type, serial) (the latter also lists the device types, one probe per type),
current operational certificates by (not_after, serial), operational certificates by issued_at
(the overview's last hour).

Used by the operator listener (gateway/operator/) and `devid devices list --expiring-within`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from devid.attestation.log import LogEntry, format_time
from devid.ca.store import CertificateRecord, DeviceRecord, DeviceState

from devid.gateway.store.attestation_store import _LOG_COLS, _entry
from devid.gateway.store.registry import _CERT_COLS, _DEVICE_COLS, _cert, _device, _hex, _ts

DEVICE_PROFILE = "operational"      # the certificate whose expiry a device's renewal is about


@dataclass(frozen=True)
class FleetDevice:
    device: DeviceRecord
    expires: datetime | None        # not_after of its current operational certificate (None: none)


@dataclass(frozen=True)
class DueCertificate:
    certificate: CertificateRecord
    device_type: str | None


@dataclass(frozen=True)
class Overview:
    devices: dict[str, int]                 # by state
    enrollments_per_minute: list[tuple[str, int]]   # ('YYYY-MM-DDTHH:MM', n), the last hour, oldest first
    issued_last_hour: int                   # operational certificates (enrollments and renewals)
    refusals_last_hour: int                 # attestation verdicts that were not acceptable
    tiers_last_day: dict[str, int]          # verdicts by tier, the last 24 hours
    certificates_due: int                   # current operational certificates expiring within `due_within`
    certificates_overdue: int               # ... already expired
    due_within: timedelta | None            # None: each device type's renewal threshold


# the current operational certificate's expiry, per device (index certificates_device)
_EXPIRES = ("(SELECT MIN(c.not_after) FROM certificates c WHERE c.device_serial = d.serial "
            f"AND c.profile = '{DEVICE_PROFILE}' AND c.status = 'current')")


class Fleet:
    """Read-only queries over a registry (`SQLiteRegistry` or `PostgresRegistry`)."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def _page(self, select: str, where: list[str], params: list, order: str, limit: int) -> list:
        """SELECT ... [WHERE the conditions, ANDed] ORDER BY `order` LIMIT `limit`: one page's rows."""
        sql = select + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {order} LIMIT ?"
        with self.registry.reading() as db:
            return db.execute(sql, [*params, limit]).fetchall()

    def devices(self, *, state: DeviceState | None = None, device_type: str | None = None,
                expiring_before: datetime | None = None, after: str | None = None,
                limit: int = 100) -> list[FleetDevice]:
        """Devices in serial order after `after`; `expiring_before`: only those whose current
        operational certificate expires before then (overdue ones included)."""
        where, params = [], []
        if state is not None:
            where.append("d.state = ?")
            params.append(state.value)
        if device_type is not None:
            where.append("d.device_type = ?")
            params.append(device_type)
        if after is not None:
            where.append("d.serial > ?")
            params.append(after)
        if expiring_before is not None:
            where.append(f"{_EXPIRES} <= ?")
            params.append(_ts(expiring_before))
        names = _DEVICE_COLS.split(", ")
        cols = ", ".join(f"d.{c}" for c in names)
        rows = self._page(f"SELECT {cols}, {_EXPIRES} FROM devices d", where, params, "d.serial", limit)
        return [FleetDevice(_device(r[:len(names)]), _parse(r[len(names)])) for r in rows]

    def certificates_due(self, before: datetime | None = None, *, after: tuple[datetime, int] | None = None,
                         limit: int = 100, now: datetime | None = None,
                         threshold: Callable[[str], timedelta] | None = None) -> list[DueCertificate]:
        """Current operational certificates with not_after before `before` (the expired ones
        first: they are the most overdue), by (not_after, serial) after the key `after`. Without
        `before`: those within their device type's renewal `threshold` of `now`."""
        sql = (f"SELECT {', '.join('c.' + c for c in _CERT_COLS.split(', '))}, d.device_type FROM certificates c "
               "LEFT JOIN devices d ON d.serial = c.device_serial "
               f"WHERE c.profile = '{DEVICE_PROFILE}' AND c.status = 'current' AND c.not_after <= ?")
        if before is not None:
            params: list = [_ts(before)]
        else:
            assert now is not None and threshold is not None
            cut, cut_params, latest = cutoff_sql("d.device_type", now, self.device_types(), threshold, threshold(""))
            sql += f" AND c.not_after <= {cut}"
            params = [latest, *cut_params]
        if after is not None:
            sql += " AND (c.not_after > ? OR (c.not_after = ? AND c.serial > ?))"
            params += [_ts(after[0]), _ts(after[0]), _hex(after[1])]
        sql += " ORDER BY c.not_after, c.serial LIMIT ?"
        params.append(limit)
        with self.registry.reading() as db:
            rows = db.execute(sql, params).fetchall()
        return [DueCertificate(_cert(r[:12]), r[12]) for r in rows]

    def log_entries(self, *, device_serial: str | None = None, before_seq: int | None = None,
                    limit: int = 100) -> list[LogEntry]:
        """Attestation log entries still in the registry, newest first, with seq below `before_seq`."""
        where, params = [], []
        if device_serial is not None:
            where.append("device_serial = ?")
            params.append(device_serial)
        if before_seq is not None:
            where.append("seq < ?")
            params.append(before_seq)
        return [_entry(r) for r in self._page(f"SELECT {_LOG_COLS} FROM attestation_log", where, params,
                                              "seq DESC", limit)]

    def overview(self, now: datetime, due_within: timedelta | Callable[[str], timedelta] = timedelta(days=30)) -> Overview:
        """`due_within`: one window for every certificate, or a device type's renewal threshold."""
        hour, day = _ts(now - timedelta(hours=1)), format_time(now - timedelta(days=1))
        if isinstance(due_within, timedelta):
            cut, cut_params, latest = "?", [_ts(now + due_within)], _ts(now + due_within)
        else:
            cut, cut_params, latest = cutoff_sql("d.device_type", now, self.device_types(), due_within,
                                                 due_within(""))
        with self.registry.reading() as db:
            devices = dict(db.execute("SELECT state, COUNT(*) FROM devices GROUP BY state").fetchall())
            per_minute = db.execute(
                "SELECT substr(issued_at, 1, 16), COUNT(*) FROM certificates WHERE profile = ? AND issued_at >= ? "
                "GROUP BY substr(issued_at, 1, 16) ORDER BY 1", (DEVICE_PROFILE, hour)).fetchall()
            refusals = db.execute("SELECT COUNT(*) FROM attestation_log WHERE time >= ? AND acceptable = 0 "
                                  "AND summary IS NULL", (format_time(now - timedelta(hours=1)),)).fetchone()[0]
            tiers = dict(db.execute("SELECT tier, COUNT(*) FROM attestation_log WHERE time >= ? AND summary IS NULL "
                                    "GROUP BY tier", (day,)).fetchall())
            due, overdue = db.execute(
                "SELECT COUNT(*), COUNT(CASE WHEN c.not_after <= ? THEN 1 END) FROM certificates c "
                "LEFT JOIN devices d ON d.serial = c.device_serial "
                f"WHERE c.profile = '{DEVICE_PROFILE}' AND c.status = 'current' AND c.not_after <= ? "
                f"AND c.not_after <= {cut}", [_ts(now), latest, *cut_params]).fetchone()
        return Overview({s.value: int(devices.get(s.value, 0)) for s in DeviceState},
                        [(m, int(n)) for m, n in per_minute], sum(int(n) for _, n in per_minute), int(refusals),
                        {t: int(n) for t, n in tiers.items()}, int(due), int(overdue),
                        due_within if isinstance(due_within, timedelta) else None)

    def device_types(self) -> list[str]:
        return device_types(self.registry)


def device_types(registry) -> list[str]:
    """The device types in the registry, in order, by a loose index scan of devices_type_serial
    (one index probe per type: a fleet has a handful of types and millions of devices, which
    SELECT DISTINCT would read every one of)."""
    with registry.reading() as db:
        return [r[0] for r in db.execute(_TYPES)]


_TYPES = ("WITH RECURSIVE t(v) AS (SELECT MIN(device_type) FROM devices UNION ALL "
          "SELECT (SELECT MIN(device_type) FROM devices WHERE device_type > t.v) FROM t WHERE t.v IS NOT NULL) "
          "SELECT v FROM t WHERE v IS NOT NULL")


def cutoff_sql(column: str, now: datetime, types: list[str], threshold: Callable[[str], timedelta],
               default: timedelta) -> tuple[str, list, str]:
    """A per-device-type expiry cutoff: (SQL expression over `column`, its parameters, the latest
    cutoff of all). `default`: the cutoff of a type not in `types` (and of no type)."""
    cuts = {t: _ts(now + threshold(t)) for t in types}
    other = _ts(now + default)
    if not cuts:
        return "?", [other], other
    sql = f"CASE {column} " + " ".join("WHEN ? THEN ?" for _ in cuts) + " ELSE ? END"
    params: list = [x for t, c in cuts.items() for x in (t, c)] + [other]
    return sql, params, max([other, *cuts.values()])


def _parse(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text is not None else None
